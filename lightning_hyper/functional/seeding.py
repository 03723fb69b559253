"""One way to derive seeds: SplitMix64 over a tuple of integers.

``derive_seed(seed, step, *keys)`` depends on nothing but its integers (not on Python's ``hash``, the process
or the rank), so every DDP rank and a resumed run draw the same numbers::

    >>> derive_seed(0, 1) == derive_seed(0, 1) != derive_seed(0, 2)
    True
    >>> 0 <= derive_seed(2**70, -5) < 2**63
    True
"""
from __future__ import annotations

import torch

__all__ = ["derive_seed", "seeded_generator"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from ``keys`` (any Python ints, negative or huge ones included)."""
    h = 0
    for v in keys:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h & 0x7FFF_FFFF_FFFF_FFFF


def seeded_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`derive_seed` of ``keys``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(*keys))
    return gen
