"""lightning_hyper: deep hyperspherical learning for PyTorch Lightning.

Layers (data flows one way): ``functional`` (pure math) -> ``nn`` (torch modules)
-> ``callbacks`` / ``models`` (Lightning glue) -> ``cli``; ``data`` holds DataModules.
Subpackages are imported lazily so ``import lightning_hyper`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = ("functional", "nn", "callbacks", "models", "data", "cli", "metrics", "viz")

__all__ = ["__version__", *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
