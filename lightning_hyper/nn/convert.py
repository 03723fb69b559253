"""Turn an existing network into a SphereNet or a DCNet in one call: ``convert(model, operator=...)``.

The layers come from :func:`~lightning_hyper.nn.selection.select_neurons` (``include``, ``exclude``,
``layer_types``, ``output_layer``, ``trainable_only``, ``example_input``). Every selected module of exactly
``nn.Conv1d/2d/3d``, ``nn.Linear`` or torch-geometric ``Linear`` (not subclasses that already changed the
forward) is replaced in place by the Sphere / Decoupled layer with the same hyperparameters, holding the
old layer's own ``weight`` / ``bias`` Parameters (so a pretrained plain CNN initializes the new network,
DCNet §4.4.3, and ties, ``requires_grad`` and optimizer references survive). By default the output layer
and 1x1 convolutions (ResNet projection shortcuts) stay plain, as in both papers' code. :func:`plan_convert`
shows what would be replaced and what stays plain, and why.
"""
from __future__ import annotations

import sys
from typing import Any
from collections.abc import Sequence

from torch import nn
from torch.nn.utils import parametrize

from lightning_hyper.nn.decoupled import (
    DecoupledConv1d,
    DecoupledConv2d,
    DecoupledConv3d,
    DecoupledLinear,
    canonical_magnitude,
)
from lightning_hyper.nn.transform import (
    output_layer_from_flag,
    CANNOT,
    UNSET,
    TransformPlan,
    TransformArgs,
    conflict,
    deprecated,
    module_slots,
    nothing_selected,
    plan_transform,
)
from lightning_hyper.nn.selection import NeuronGroup
from lightning_hyper.nn.sphere import SphereConv1d, SphereConv2d, SphereConv3d, SphereLinear

__all__ = ["OPERATORS", "convert", "plan_convert", "resolve_operator"]

#: what convert replaces
CONVERT_SUPPORTED = "exactly nn.Linear, nn.Conv1d/2d/3d (kernel > 1 unless convert_1x1) and torch_geometric Linear"

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
            f"operator={operator!r} is not supported; accepted values: "
            f"{(['conv'] if allow_conv else []) + list(OPERATORS)}"
        )
    op = operator.lower()
    if op in OPERATORS:
        return op
    try:  # convert(model, operator="tanh") == convert(model, operator="decoupled", magnitude="tanh")
        magnitude = canonical_magnitude(op)
    except ValueError:
        raise ValueError(
            f"operator={operator!r} is not supported; accepted values: "
            f"{(['conv'] if allow_conv else []) + list(OPERATORS)} or a decoupled magnitude name "
            "['sphere', 'ball', 'tanh', 'linear', 'seg', 'log', 'mix', 'BallConv', ...]"
        ) from None
    if "magnitude" in kwargs and canonical_magnitude(kwargs["magnitude"]) != magnitude:
        raise ValueError(f"operator={operator!r} conflicts with magnitude={kwargs['magnitude']!r}")
    kwargs["magnitude"] = magnitude
    return "decoupled"


def _pyg_linear() -> type | None:
    if "torch_geometric" not in sys.modules:  # a model holding its layers has imported it
        return None
    try:
        from torch_geometric.nn.dense.linear import Linear
    except Exception:  # pragma: no cover - broken torch-geometric install
        return None
    return Linear


def _target(module: nn.Module, targets: dict[type, type]) -> type | None:
    """The replacement class of ``module`` (exact type match; a torch-geometric ``Linear`` maps to the
    family's Linear), or ``None``."""
    cls = targets.get(type(module))
    if cls is None:
        pyg = _pyg_linear()
        if pyg is not None and type(module) is pyg:
            cls = targets[nn.Linear]
    return cls


def _convert_cannot(group: NeuronGroup, op: str, targets: dict[type, type], convert_1x1: bool,
                    parents: dict[int, nn.Module]) -> str | None:
    """Why ``convert`` leaves a group of :func:`select_neurons` plain (``None``: it replaces its module)."""
    module = group.module
    if isinstance(module, nn.MultiheadAttention):
        return CANNOT + f"attention projection weight: no {op} attention operator"
    if isinstance(parents.get(id(module)), nn.MultiheadAttention):
        return (CANNOT + "MultiheadAttention.out_proj: the attention reads out_proj.weight directly "
                "(F.multi_head_attention_forward), so a replaced layer would be bypassed")
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return CANNOT + f"recurrent gate weight: no {op} RNN/LSTM/GRU operator"
    if parametrize.is_parametrized(module):
        return CANNOT + "parametrized weight (e.g. OPT); convert needs a plain weight (remove_opt first)"
    cls = _target(module, targets)
    if cls is None:
        bases = [b.__name__ for b in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(module, b)]
        if bases:
            return (CANNOT + f"{type(module).__name__} subclasses {bases[0]} and may compute differently; only "
                    "exact Linear / Conv1d/2d/3d / torch-geometric Linear are replaced")
        return CANNOT + f"type {type(module).__name__} has no {op} counterpart"
    if isinstance(module, nn.modules.conv._ConvNd) and not convert_1x1 and all(k == 1 for k in module.kernel_size):
        return "1x1 convolution (projection shortcut; convert_1x1=True converts it)"
    return None


def _route_around_fused_kernels(module: nn.Module, args: Any) -> None:
    """A no-op forward pre-hook on a converted layer inside a ``TransformerEncoderLayer``.

    In eval mode without gradients, ``TransformerEncoderLayer.forward`` runs the fused kernel
    ``torch._transformer_encoder_layer_fwd``, which reads ``linear1/2.weight`` as plain Linear weights and
    never calls the converted modules. torch takes the fused path only if no submodule of the layer has a
    forward hook (``"forward pre-/hooks are attached to the module"``), so this hook keeps the layer on its
    module-by-module path. It travels with the converted module (``state_dict``, ``deepcopy``, pickling)."""
    return None


def _new_layer(old: nn.Module, cls: type[nn.Module], kwargs: dict[str, Any]) -> nn.Module:
    """A ``cls`` layer with ``old``'s hyperparameters that holds ``old``'s own weight and bias Parameters
    (the same objects: ties, ``requires_grad`` and optimizer references are kept)."""
    factory = {"device": old.weight.device, "dtype": old.weight.dtype}
    bias = getattr(old, "bias", None)
    if isinstance(old, nn.modules.conv._ConvNd):
        new = cls(
            old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation, old.groups,
            bias=bias is not None, padding_mode=old.padding_mode, **factory, **kwargs,
        )
    else:  # nn.Linear or torch-geometric Linear
        in_f, out_f = old.weight.shape[1], old.weight.shape[0]
        new = cls(in_f, out_f, bias=bias is not None, **factory, **kwargs)
    if tuple(new.weight.shape) != tuple(old.weight.shape):  # pragma: no cover - a layer class with another layout
        raise ValueError(f"convert: {cls.__name__} has weight shape {tuple(new.weight.shape)}, the layer it replaces "
                         f"{tuple(old.weight.shape)}")
    new.weight = old.weight
    if bias is not None:
        new.bias = bias
    if not any(p.requires_grad for p in old.parameters(recurse=False)):
        given = {id(v) for v in kwargs.values() if isinstance(v, nn.Parameter)}  # e.g. a network-wide shared_k
        for p in new.parameters(recurse=False):  # a frozen layer stays frozen, the new operator's own parameters too
            if id(p) not in given:
                p.requires_grad_(False)
    new.train(old.training)
    return new


def plan_convert(
    model: nn.Module,
    operator: str = "sphere",
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    layer_types: str | type | Sequence[str | type] | None = None,
    output_layer: str | None = None,
    trainable_only: bool = True,
    example_input: Any = None,
    convert_1x1: bool = False,
) -> TransformPlan:
    """What :func:`convert` with the same selection arguments would replace, without changing ``model``:
    a plan with ``.groups`` (:class:`~lightning_hyper.nn.selection.NeuronGroup`, the core's names and
    order), ``.names``, ``.skipped`` (``(name, reason)`` rows) and ``.table()``. See :func:`convert`."""
    kwargs: dict[str, Any] = {}
    op = resolve_operator(operator, kwargs)
    targets = _TARGETS[op]
    parents: dict[int, nn.Module] = {}
    for _, parent in model.named_modules(remove_duplicate=False) if isinstance(model, nn.Module) else ():
        for child in parent._modules.values():
            if child is not None:
                parents.setdefault(id(child), parent)
    args = TransformArgs(include, exclude, layer_types, output_layer, trainable_only, example_input)
    return plan_transform("convert", model, args,
                          lambda g: _convert_cannot(g, op, targets, convert_1x1, parents), CONVERT_SUPPORTED)


def convert(
    model: nn.Module,
    operator: str = "sphere",
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    layer_types: str | type | Sequence[str | type] | None = None,
    output_layer: str | None = None,
    trainable_only: bool = True,
    example_input: Any = None,
    convert_1x1: bool = False,
    keep_classifier: Any = UNSET,
    classifier: Any = UNSET,
    **kwargs: Any,
) -> nn.Module:
    """Replace the Conv/Linear layers of ``model`` in place by hyperspherical / decoupled ones.

    **Which layers.** :func:`~lightning_hyper.nn.selection.select_neurons` chooses them (``include``,
    ``exclude``, ``layer_types``, ``output_layer``, ``trainable_only``, ``example_input`` mean what they mean
    there; group names are the core's). Of its groups, ``convert`` replaces modules of exactly
    ``nn.Linear``, ``nn.Conv1d/2d/3d`` and torch-geometric ``Linear`` (``GCNConv.lin``, ``SAGEConv.lin_l``
    ...; replaced by the family's Linear). It leaves plain, with a reason (one warning per call for what it
    cannot convert; all rows in :func:`plan_convert`): the output layer, 1x1 convolutions (unless
    ``convert_1x1``), attention weights (packed q/k/v and ``MultiheadAttention.out_proj``, which the
    attention reads directly), RNN/LSTM/GRU gates, ConvTranspose, Bilinear, subclasses of Linear/ConvNd
    (their forward may differ) and parametrized (OPT) weights; the core leaves out depthwise convolutions,
    frozen layers and tie duplicates.

    **What is kept.**

    - *Weights*: the new layer holds the old layer's own ``weight`` and ``bias`` Parameter objects (not
      copies), so values, ``requires_grad``, parameter ties (a decoder tied to an embedding stays tied) and
      references held by an existing optimizer are kept. Device, dtype, padding mode, train/eval mode too.
    - *Frozen layers* are not converted (``trainable_only=True``). With ``trainable_only=False`` they are,
      and stay frozen: the new operator's own parameters (e.g. a learnable ``k``) are frozen as well.
    - *Module reuse*: a module registered under several names is replaced once, by one new module placed
      at every name.
    - *Predictions in eval / no-grad mode*: a converted layer inside a ``TransformerEncoderLayer`` gets a
      no-op forward pre-hook, which makes torch skip its fused fast path (that kernel reads
      ``linear1/2.weight`` as plain Linear weights and would bypass the converted layers), and a
      ``TransformerEncoder`` holding such layers gets ``use_nested_tensor = False``. DCNet's linear
      magnitude with ``weighted="linear"`` and ``eps=0`` reproduces the original network exactly.

    The whole plan is checked (lazy layers, the root module) before any layer is replaced.

    Args:
        model: any ``nn.Module``; modified in place and returned.
        operator: ``"sphere"`` (SphereConv1d/2d/3d, SphereLinear; kwargs such as ``angle_fn``, ``k``) or
            ``"decoupled"`` (DecoupledConv1d/2d/3d, DecoupledLinear; kwargs such as ``magnitude``, ``angular``,
            ``alpha``), or a magnitude name (``"tanh"``, ``"BallConv"``...) as a shortcut for ``"decoupled"``.
        include, exclude: group/module-name glob(s) (``fnmatch``); a string is one pattern (never its
            characters).
        layer_types: class names or types to keep (e.g. ``"Conv2d"``).
        output_layer: the output layer's name (left plain), or ``"none"`` to convert it too. Default: the
            model's ``output_layer_name``, else the last layer the forward pass on ``example_input`` runs,
            else the last Linear-like layer.
        trainable_only: leave frozen layers plain (default) or convert them too (they stay frozen).
        example_input: one batch, to find the output layer by forward order (and materialize lazy layers).
        convert_1x1: also convert 1x1 convolutions (projection shortcuts; SphereResNet "v1" style).
        keep_classifier: deprecated; ``False`` is ``output_layer="none"``.
        classifier: deprecated name of ``output_layer``.
        **kwargs: passed to every new layer (validated there, with errors listing accepted values).

    Returns ``model``. Raises ValueError if nothing was converted, a pattern or ``output_layer`` matches
    nothing, or a selected layer is lazy; TypeError if ``include`` names only layers it cannot convert.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    kwargs = dict(kwargs)
    op = resolve_operator(operator, kwargs)
    targets = _TARGETS[op]
    alias = None
    if keep_classifier is not UNSET:
        output_layer = output_layer_from_flag("convert", "keep_classifier", keep_classifier, output_layer,
                                              "output_layer=None (detect and keep it plain) or "
                                              "output_layer='none' (convert it too)")
    if classifier is not UNSET:
        deprecated("convert", "classifier", "output_layer=", classifier)
        if output_layer is not None and keep_classifier is UNSET:
            raise conflict("convert", "classifier", "output_layer")
        if classifier is not None and keep_classifier is not False:
            output_layer, alias = classifier, classifier
    try:
        plan = plan_convert(model, op, include=include, exclude=exclude, layer_types=layer_types,
                            output_layer=output_layer, trainable_only=trainable_only, example_input=example_input,
                            convert_1x1=convert_1x1)
    except ValueError as err:
        if alias is not None and "output_layer=" in str(err):
            raise ValueError(f"convert: classifier={alias!r} (deprecated name of output_layer) is not a module "
                             f"name of the model with neurons: {err}") from None
        raise
    if not plan.groups:
        raise nothing_selected("convert", model, plan, "Conv/Linear layer")
    slots = module_slots(model)
    modules = list(dict.fromkeys(g.module for g in plan.groups))
    for module in modules:
        if id(module) not in slots:
            raise ValueError("convert cannot replace the root module itself; wrap it in nn.Sequential")
    replaced: dict[int, nn.Module] = {}
    for module in modules:
        new = _new_layer(module, _target(module, targets), kwargs)
        for parent, attr, _ in slots[id(module)]:
            parent._modules[attr] = new
        replaced[id(module)] = new
    _keep_module_path(model, {id(m) for m in replaced.values()})
    return model


def _keep_module_path(model: nn.Module, new_ids: set[int]) -> None:
    """Route torch's fused Transformer kernels around converted layers (see :func:`_route_around_fused_kernels`)."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            for sub in module.modules():
                if id(sub) in new_ids and _route_around_fused_kernels not in sub._forward_pre_hooks.values():
                    sub.register_forward_pre_hook(_route_around_fused_kernels)
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(id(s) in new_ids for s in module.modules()):
            module.use_nested_tensor = False  # the nested-tensor path feeds NestedTensors to the converted layers
