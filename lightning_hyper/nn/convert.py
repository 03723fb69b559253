"""Turn an existing CNN into a SphereNet or a DCNet in one call: ``convert(model, operator=...)``.

Every ``nn.Conv1d/2d/3d`` and ``nn.Linear`` (exact types, not subclasses that already changed the
forward) is replaced in place by the Sphere / Decoupled layer with the same hyperparameters, and its
``weight`` / ``bias`` are copied (so a pretrained plain CNN initializes the new network, DCNet §4.4.3).
By default the output classifier (the last ``nn.Linear`` of the model, or ``classifier``) and 1x1
convolutions (ResNet projection shortcuts) stay plain, as in both papers' code.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Iterable

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from lightning_hyper.nn.decoupled import (
    DecoupledConv1d,
    DecoupledConv2d,
    DecoupledConv3d,
    DecoupledLinear,
    canonical_magnitude,
)
from lightning_hyper.nn.sphere import SphereConv1d, SphereConv2d, SphereConv3d, SphereLinear

__all__ = ["OPERATORS", "convert", "resolve_operator"]

#: Operator families accepted by :func:`convert` (a decoupled magnitude name also selects "decoupled").
OPERATORS: tuple[str, ...] = ("sphere", "decoupled")

_TARGETS = {
    "sphere": {nn.Conv1d: SphereConv1d, nn.Conv2d: SphereConv2d, nn.Conv3d: SphereConv3d, nn.Linear: SphereLinear},
    "decoupled": {
        nn.Conv1d: DecoupledConv1d, nn.Conv2d: DecoupledConv2d, nn.Conv3d: DecoupledConv3d, nn.Linear: DecoupledLinear,
    },
}


def resolve_operator(operator: str, kwargs: dict[str, Any], allow_conv: bool = False) -> str:
    """Return the operator family (``"sphere"``, ``"decoupled"``, or ``"conv"`` if ``allow_conv``).

    A decoupled magnitude name (``"tanh"``, ``"BallConv"``...) means ``"decoupled"`` and is stored as
    ``kwargs["magnitude"]`` (``kwargs`` is modified in place).
    """
    if allow_conv and operator == "conv":
        if kwargs:
            raise ValueError(f"operator='conv' (plain layers) takes no operator kwargs, got {sorted(kwargs)}")
        return "conv"
    if not isinstance(operator, str):
        raise ValueError(
            f"operator={operator!r} is not supported; accepted values: {(['conv'] if allow_conv else []) + list(OPERATORS)}"
        )
    op = operator.lower()
    if op in OPERATORS:
        return op
    try:  # convert(model, operator="tanh") == convert(model, operator="decoupled", magnitude="tanh")
        magnitude = canonical_magnitude(op)
    except ValueError:
        raise ValueError(
            f"operator={operator!r} is not supported; accepted values: "
            f"{(['conv'] if allow_conv else []) + list(OPERATORS)} or a decoupled magnitude name ['sphere', 'ball', 'tanh', 'linear', 'seg', 'log', 'mix', 'BallConv', ...]"
        ) from None
    if "magnitude" in kwargs and canonical_magnitude(kwargs["magnitude"]) != magnitude:
        raise ValueError(f"operator={operator!r} conflicts with magnitude={kwargs['magnitude']!r}")
    kwargs["magnitude"] = magnitude
    return "decoupled"


def _last_linear_name(model: nn.Module) -> str | None:
    name = None
    for n, m in model.named_modules():
        if type(m) is nn.Linear:
            name = n
    return name


def _new_layer(old: nn.Module, cls: type[nn.Module], kwargs: dict[str, Any]) -> nn.Module:
    factory = {"device": old.weight.device, "dtype": old.weight.dtype}
    if isinstance(old, nn.Linear):
        new = cls(old.in_features, old.out_features, bias=old.bias is not None, **factory, **kwargs)
    else:
        new = cls(
            old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation, old.groups,
            bias=old.bias is not None, padding_mode=old.padding_mode, **factory, **kwargs,
        )
    with torch.no_grad():
        new.weight.copy_(old.weight)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    new.train(old.training)
    return new


def convert(
    model: nn.Module,
    operator: str = "sphere",
    *,
    exclude: Iterable[str] = (),
    include: Iterable[str] | None = None,
    keep_classifier: bool = True,
    classifier: str | None = None,
    convert_1x1: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Replace the Conv/Linear layers of ``model`` in place by hyperspherical / decoupled ones.

    Args:
        model: any ``nn.Module``; modified in place and returned.
        operator: ``"sphere"`` (SphereConv1d/2d/3d, SphereLinear; kwargs such as ``angle_fn``, ``k``) or
            ``"decoupled"`` (DecoupledConv1d/2d/3d, DecoupledLinear; kwargs such as ``magnitude``, ``angular``,
            ``alpha``), or a magnitude name (``"tanh"``, ``"BallConv"``...) as a shortcut for ``"decoupled"``.
        exclude: module-name globs (``fnmatch``) to leave untouched.
        include: if given, only module names matching one of these globs are converted.
        keep_classifier: leave the output classifier plain (default True): the module named
            ``classifier`` if given, else the last ``nn.Linear`` in ``model.named_modules()`` order.
        convert_1x1: also convert 1x1 convolutions (projection shortcuts; SphereResNet "v1" style).
        **kwargs: passed to every new layer (validated there, with errors listing accepted values).

    Weights and biases are copied; device, dtype, padding mode and train/eval mode are kept.
    Returns ``model``. Raises ValueError if nothing was converted or an ``include``/``classifier``
    name matches nothing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    kwargs = dict(kwargs)
    op = resolve_operator(operator, kwargs)
    targets = _TARGETS[op]
    exclude = list(exclude)
    include = None if include is None else list(include)
    names = dict(model.named_modules())
    if classifier is not None and classifier not in names:
        raise ValueError(f"classifier={classifier!r} is not a module name of the model")
    skip_head = (classifier or _last_linear_name(model)) if keep_classifier else None

    plan: list[tuple[str, nn.Module]] = []
    for name, module in names.items():
        if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError(f"layer {name!r} is lazy and not initialized yet; run one forward pass before convert")
        if type(module) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear) or name == skip_head:
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if not isinstance(module, nn.Linear) and not convert_1x1 and all(k == 1 for k in module.kernel_size):
            continue
        if type(module) not in targets:
            raise ValueError(
                f"operator={op!r} has no layer for {type(module).__name__} ({name!r}); "
                f"supported: {[t.__name__ for t in targets]} -- exclude it with exclude=[{name!r}]"
            )
        plan.append((name, module))
    if include is not None:
        for p in include:
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                raise ValueError(f"include pattern {p!r} matches no module of the model")
    if not plan:
        raise ValueError("convert found no Conv/Linear layer to replace (check include/exclude/keep_classifier)")
    for name, module in plan:
        new = _new_layer(module, targets[type(module)], kwargs)
        parent_name, _, attr = name.rpartition(".")
        parent = names[parent_name] if parent_name else model
        if name == "":
            raise ValueError("convert cannot replace the root module itself; wrap it in nn.Sequential")
        setattr(parent, attr, new)
    return model
