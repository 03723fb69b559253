"""Gradient descent on the hyperspherical energy of a set of neurons (OPT's refinement of ``V``, thesis §7.3.7).

:func:`minimize_energy` is the loop; :func:`lightning_hyper.nn.opt.refine_v` applies it to an OPT layer's fixed
neurons ``V`` (spec ``opt.md`` §6.1).
"""
from __future__ import annotations

import torch
from torch import Tensor

from lightning_hyper.functional.checks import check_choice, check_number
from lightning_hyper.functional.energy import hyperspherical_energy

__all__ = ["REFINE_OBJECTIVES", "minimize_energy"]

#: ``"mhe"``: energy over the full sphere; ``"hs_mhe"``: half-space energy (also separates near-collinear pairs).
REFINE_OBJECTIVES = ("mhe", "hs_mhe")


def minimize_energy(neurons: Tensor, objective: str = "hs_mhe", steps: int = 5000, lr: float = 1.0, s: float = 2.0,
                    dtype: torch.dtype | None = None) -> tuple[Tensor, float, float]:
    """Plain gradient descent (``SGD(lr)``, no momentum, ``steps`` iterations) on the mean-over-pairs Riesz-``s``
    hyperspherical energy of the rows of ``neurons`` ``(n, d)`` (:func:`~lightning_hyper.functional.
    hyperspherical_energy`; ``objective="hs_mhe"``: half space). The energy depends on directions only, so every row
    keeps its norm. Runs in ``dtype`` (default: the input's). Returns ``(refined rows in the input's dtype, energy
    before, energy after)``; the input is not modified."""
    check_choice("objective", objective, REFINE_OBJECTIVES, owner="minimize_energy")
    check_number("steps", steps, low=0, low_inclusive=True, integer=True, owner="minimize_energy")
    half = objective == "hs_mhe"
    rows = neurons.detach()
    norms = rows.norm(dim=1, keepdim=True)
    x = rows.to(dtype or rows.dtype).clone().requires_grad_(True)
    opt = torch.optim.SGD([x], lr=lr)

    def energy() -> Tensor:
        return hyperspherical_energy(x, s=s, half_space=half, reduction="mean")

    with torch.enable_grad():
        with torch.no_grad():
            before = float(energy())
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            energy().backward()
            opt.step()
        with torch.no_grad():
            after = float(energy())
    with torch.no_grad():
        new = x.detach().to(rows.dtype)
        new = new / new.norm(dim=1, keepdim=True).clamp_min(1e-12) * norms
    return new, before, after
