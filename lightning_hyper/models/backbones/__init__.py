"""Backbones: plain ``torch.nn`` feature extractors (input -> (B, out_features)).

Every backbone exposes ``out_features`` and is registered under a short name so that
``HypersphericalClassifier(backbone="cnn9")`` and YAML configs can pick it.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a backbone factory (a class or a function) under ``name``."""

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in BACKBONES and BACKBONES[name] is not factory:
            raise ValueError(f"backbone name {name!r} is already registered")
        BACKBONES[name] = factory
        return factory

    return deco


def build_backbone(name: str, **kwargs) -> nn.Module:
    """Instantiate the backbone registered as ``name`` with ``kwargs``."""
    _import_all()
    if name not in BACKBONES:
        raise ValueError(f"backbone={name!r} is unknown; accepted values: {sorted(BACKBONES)}")
    return BACKBONES[name](**kwargs)


def _import_all() -> None:
    """Import the backbone modules so that their ``register_backbone`` calls run."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


__all__ = ["BACKBONES", "build_backbone", "register_backbone"]
