"""Name -> class registry for classifier heads, so configs can say ``head: asoftmax``.

A head is an ``nn.Module`` built as ``cls(in_features, num_classes, **kwargs)`` whose
``forward(features, labels=None)`` returns logits; it owns its class weights as ``.weight``
(rows = classes). Heads that need labels during training set ``needs_labels = True``.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

HEADS: dict[str, type[nn.Module]] = {}


def register_head(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: register a head under ``name``."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        if name in HEADS and HEADS[name] is not cls:
            raise ValueError(f"head name {name!r} is already registered")
        HEADS[name] = cls
        return cls

    return deco


def build_head(name: str, in_features: int, num_classes: int, **kwargs) -> nn.Module:
    """Instantiate the head registered as ``name`` (``"linear"`` is ``nn.Linear``; pass ``bias=False``
    for the thesis's bias-free classifier)."""
    import lightning_hyper.nn  # noqa: F401  (registers the library's heads)

    if name == "linear":
        return nn.Linear(in_features, num_classes, **kwargs)
    if name not in HEADS:
        raise ValueError(f"head={name!r} is unknown; accepted values: {sorted(['linear', *HEADS])}")
    return HEADS[name](in_features, num_classes, **kwargs)


__all__ = ["HEADS", "build_head", "register_head"]
