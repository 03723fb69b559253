"""Which weights of a model hold neurons: the one neuron-selection core (DESIGN.md, contract 1).

:func:`select_neurons` walks ``model.named_modules()`` and returns one :class:`NeuronGroup` per
weight (or part of a packed weight) whose rows are neurons. Every consumer (callbacks, ``apply_opt``,
``convert``, the CLI, plots) takes its layers from here and reads ``group.neurons()`` at call time.

Covered layers and their names (``<m>`` = the module name in ``named_modules()``):

============================================  =====================================  ==================
layer                                         group name(s)                          neurons
============================================  =====================================  ==================
``Linear`` / ``LazyLinear`` (materialized),   ``<m>``                                rows of ``weight``
torch-geometric ``Linear`` (inside GCNConv,
GATConv, SAGEConv, GINConv's MLP, ...),
library heads (``hyperspherical_layer``)
``Conv{1,2,3}d``                              ``<m>``                                output channels
``ConvTranspose{1,2,3}d``                     ``<m>``                                output channels
``Bilinear``                                  ``<m>``                                ``out``, d = in1·in2
``MultiheadAttention`` (packed)               ``<m>.in_proj_weight:q`` / ``:k`` /    rows [0:E], [E:2E],
                                              ``:v``; ``<m>.out_proj`` (a Linear)    [2E:3E]
``MultiheadAttention`` (kdim/vdim ≠ E)        ``<m>.q_proj_weight``, ``k_..``, ``v_..``
``LSTM`` / ``GRU`` (and ``*Cell``)            ``<m>.weight_ih_l0:i`` ... (gates i,f,g,o; r,z,n; also
                                              ``weight_hh_l{k}``, ``_reverse``); ``<m>.weight_hr_l{k}``
``RNN`` / ``RNNCell``                         ``<m>.weight_ih_l0``, ``<m>.weight_hh_l0``
``Embedding`` / ``EmbeddingBag``              ``<m>`` — only when ``layer_types`` names them
============================================  =====================================  ==================

Grouped convolutions (``groups = G > 1``) give one group whose ``neurons()`` is ``(G, N/G, d)``: each
group of channels is its own sphere. Groups of a single neuron (depthwise, ``out_channels == groups``)
are skipped.

**Skipped weights** are reported as :class:`SkippedLayer` rows ``(name, reason)`` (``return_skipped=True``
or :func:`explain_selection`), with reasons ``"frozen"``, ``"tie duplicate of <name>"`` (the same
Parameter, or the same module registered under two names: kept once, under its first name in
``named_modules`` order), ``"depthwise"``, ``"lazy, not materialized"``, ``"unreadable weight type <T>"``
(a module of unknown type with a ≥2-D parameter ``weight*`` of its own; also one warning per call) and
``"excluded"`` (by ``include`` / ``exclude`` / ``layer_types``).

**The output layer** (role ``"output"``; every other group is ``"hidden"``) is chosen as follows:

1. ``output_layer=`` (a group or module name, or ``"none"``), else the model's ``output_layer_name``
   attribute, if set.
2. Else, with ``example_input``: the model is run once on it (``torch.no_grad()``, eval mode, the
   attention fast path off so that ``TransformerEncoderLayer``'s submodules run as modules; every
   module's training flag is restored afterwards). The output module is the neuron-holding module whose
   forward *finished last*. Its output groups are: all its groups; for a ``MultiheadAttention``, its
   ``out_proj`` (``F.multi_head_attention_forward`` calls it functionally, so its own hook never fires);
   for an RNN, the groups of its top layer; for a torch-geometric ``Linear`` that is a direct child of a
   ``MessagePassing`` conv (``SAGEConv.lin_l`` / ``lin_r``, ``GraphConv.lin_rel`` / ``lin_root``), every
   such direct child that ran in that conv's last call (parallel branches summed into the output).
   The forward pass also materializes lazy modules.
3. Else (no ``example_input``): the last Linear-like layer (``nn.Linear``, torch-geometric ``Linear``, a
   library head with a 2-D weight) in ``named_modules()`` order, expanded as in 2. This is wrong for a
   model whose modules are not defined in execution order (a generator whose first Linear is defined
   last) or whose classifier is a convolution (SqueezeNet): pass ``example_input`` there.

The output layer is found among all readable layers, before ``include``/``exclude``/``layer_types``
and freezing; if it is filtered out, no selected group has role ``"output"``.
"""
from __future__ import annotations

import fnmatch
import itertools
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

from lightning_hyper.functional.distributed import gather_rows, is_dtensor, local_rows
from lightning_hyper.functional.neurons import as_neurons

__all__ = ["NeuronGroup", "SkippedLayer", "explain_selection", "select_neurons", "selection_table"]

_GATES = {"LSTM": "ifgo", "GRU": "rzn", "LSTMCell": "ifgo", "GRUCell": "rzn"}
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


# ---------------------------------------------------------------------------- public types
@dataclass(frozen=True, eq=False)
class NeuronGroup:
    """One set of neurons of a model: a weight, or one part of a packed weight (attention q/k/v, RNN gates).

    Attributes:
        name: unique name (the module name, or ``"<module>.<parameter>[:<part>]"``).
        role: ``"hidden"`` or ``"output"``.
        module: the module that owns the weight.
        parameter_name: the attribute read at every :meth:`neurons` call (``getattr(module, parameter_name)``,
            so ``torch.nn.utils.parametrize`` parametrizations such as OPT apply).
        groups: ``G``: 1, or the number of channel groups of a grouped convolution (one sphere each).
        part: ``"q"``/``"k"``/``"v"``, a gate letter, or ``None``.
        rows: ``(start, stop)`` rows of the raw weight for a packed part, else ``None``.
        module_name: the module's name in ``named_modules()``.
        layout: ``"rows"`` (dim 0 = neurons) or ``"transposed"`` (ConvTranspose: dim 1 = output channels).

    Shapes:
        - :meth:`neurons`: :math:`(N, d)` if ``groups == 1``, else :math:`(G, N/G, d)`.
    """

    name: str
    role: str
    module: nn.Module = field(repr=False)
    parameter_name: str
    groups: int = 1
    part: str | None = None
    rows: tuple[int, int] | None = None
    module_name: str = ""
    layout: str = "rows"

    def weight(self) -> Tensor:
        """The effective raw weight (or packed part of it), read now; gradients flow to the parameter.
        A sharded weight (FSDP2 / tensor-parallel ``DTensor``) is this layer's full weight, all-gathered on
        every rank (a collective: every rank must read it; :func:`~lightning_hyper.functional.distributed.
        gather_rows`)."""
        w = _read_weight(self.module, self.parameter_name)
        if self.rows is not None:
            w = w[self.rows[0]:self.rows[1]]
        return w

    def local_neurons(self) -> tuple[Tensor, Any] | None:
        """``(this rank's neuron rows (n_r, d), process group)`` of a row-sharded weight (FSDP2's ``Shard(0)``)
        of a plain layer (one neuron per weight row, no packed part, no channel groups); else ``None``."""
        w = getattr(self.module, self.parameter_name)
        if self.layout != "rows" or self.groups != 1 or self.rows is not None:
            return None
        local = local_rows(w)
        if local is None:
            return None
        rows, group = local
        return rows.reshape(rows.shape[0], -1), group

    def neurons(self) -> Tensor:
        """The effective neurons, read at call time (a view of the weight where possible).

        Shapes:
            - output: :math:`(N, d)`, or :math:`(G, N/G, d)` for a grouped convolution.
        """
        return self._as_neurons(self.weight())

    def _as_neurons(self, weight: Tensor) -> Tensor:
        if self.layout == "transposed":
            n = _transposed(weight, self.groups)  # as_neurons(module)'s layout, without its pyg import
        else:
            n = as_neurons(weight)
        if self.groups > 1:
            n = n.reshape(self.groups, n.shape[0] // self.groups, n.shape[1])
        return n

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of :meth:`neurons` (computed without autograd; a sharded weight is not gathered)."""
        if _sharded_sources(self.module, self.parameter_name):
            # from the global shapes: no collective (the selection table prints on rank zero only)
            w = _read_weight(self.module, self.parameter_name, meta=True)
            if self.rows is not None:
                w = w[self.rows[0]:self.rows[1]]
            return tuple(self._as_neurons(w).shape)
        with torch.no_grad():
            return tuple(self.neurons().shape)

    def parameters(self) -> list[nn.Parameter]:
        """The leaf parameters the neurons are computed from (the parametrization's ``original`` and the
        parametrization's own parameters for a parametrized weight; every parameter of the module for a
        computed weight such as ``HierarchicalLinear.weight``)."""
        return _sources(self.module, self.parameter_name)


class SkippedLayer(NamedTuple):
    """A weight that holds neurons (or might) but was not selected: ``(name, reason)``.

    Reasons: ``"frozen"``, ``"tie duplicate of <name>"``, ``"depthwise"``, ``"lazy, not materialized"``,
    ``"unreadable weight type <T>"``, ``"excluded"``.
    """

    name: str
    reason: str


# ---------------------------------------------------------------------------- internals
@dataclass(eq=False)
class _Candidate:
    name: str
    module_name: str
    module: nn.Module
    parameter_name: str
    part: str | None = None
    rows: tuple[int, int] | None = None
    groups: int = 1
    layout: str = "rows"
    linear_like: bool = False
    status: str | None = None  # None = still selected, else the skip reason


class _Order:
    """Forward-pass order of every module: counter values at the start and end of its last call."""

    def __init__(self) -> None:
        self.start: dict[int, int] = {}
        self.end: dict[int, int] = {}


def _pyg(name: str) -> type | None:
    """A torch-geometric class if torch-geometric is already imported (a model holding its layers imports it)."""
    if "torch_geometric" not in sys.modules:
        return None
    try:
        if name == "Linear":
            from torch_geometric.nn.dense.linear import Linear as cls
        else:
            from torch_geometric.nn.conv import MessagePassing as cls
    except Exception:  # pragma: no cover - broken torch-geometric install
        return None
    return cls


def _sources(module: nn.Module, pname: str) -> list[nn.Parameter]:
    if parametrize.is_parametrized(module, pname):
        return list(module.parametrizations[pname].parameters())
    p = module._parameters.get(pname)
    if p is not None:
        return [p]
    return list(module.parameters())


def _sharded_sources(module: nn.Module, pname: str) -> dict[str, Tensor]:
    """The ``DTensor`` (FSDP2-sharded) leaf parameters the weight ``pname`` is read from, by name in ``module``."""
    if not any(is_dtensor(p) for p in module.parameters()):
        return {}
    ids = {id(p) for p in _sources(module, pname)}
    return {n: p for n, p in module.named_parameters() if id(p) in ids and is_dtensor(p)}


class _Call(nn.Module):
    """``forward()`` = ``fn(inner)``: lets ``torch.func.functional_call`` swap the leaves ``fn`` reads."""

    def __init__(self, inner: nn.Module, fn: Any) -> None:
        super().__init__()
        self.inner, self.fn = inner, fn

    def forward(self) -> Any:
        return self.fn(self.inner)


def call_whole(module: nn.Module, fn: Any) -> Any:
    """``fn(module)`` with every FSDP2-sharded (``DTensor``) parameter of ``module`` replaced by its full tensor
    (all-gathered on every rank: a collective; differentiable, the gradient averaged back onto the shards), so
    code that reads a module's parameters (an OPT rotation, a DTH2L head's geometry) sees whole tensors. Without
    sharded parameters it is ``fn(module)``."""
    sharded = {n: p for n, p in module.named_parameters() if is_dtensor(p)}
    if not sharded:
        return fn(module)
    return torch.func.functional_call(_Call(module, fn), _prefixed({n: gather_rows(p) for n, p in sharded.items()}),
                                      ())


def _read_weight(module: nn.Module, pname: str, meta: bool = False) -> Tensor:
    """``getattr(module, pname)``, whole. A weight sharded by FSDP2 (``DTensor``) is all-gathered on every rank
    (a collective; its gradient is averaged back onto the shards, ``functional/distributed.py``); a parametrized
    (OPT) or computed weight whose leaves are sharded is computed from the gathered leaves. ``meta``: computed
    from meta copies of the sharded leaves instead (its shape, with no collective)."""
    sharded = _sharded_sources(module, pname)
    if not sharded:
        return getattr(module, pname)
    own = module._parameters.get(pname)
    if own is not None and not parametrize.is_parametrized(module, pname):
        return torch.empty(own.shape, dtype=own.dtype, device="meta") if meta else gather_rows(own)
    if meta:
        swap = {n: torch.empty(p.shape, dtype=p.dtype, device="meta") for n, p in sharded.items()}
        swap.update({n: b.to("meta") for n, b in module.named_buffers()})
        with torch.no_grad():
            try:
                return torch.func.functional_call(_Call(module, lambda m: getattr(m, pname)), _prefixed(swap), ())
            except Exception:
                first = next(iter(sharded.values()))
                return torch.empty(first.shape, dtype=first.dtype, device="meta")
    full = {n: gather_rows(p) for n, p in sharded.items()}
    return torch.func.functional_call(_Call(module, lambda m: getattr(m, pname)), _prefixed(full), ())


def _prefixed(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"inner.{n}": t for n, t in tensors.items()}


def _tie_key(module: nn.Module, pname: str) -> tuple:
    """What identifies a weight: its Parameter (or the parametrization's ``original``), else the module."""
    if parametrize.is_parametrized(module, pname):
        plist = module.parametrizations[pname]
        return ("param", id(plist.original if hasattr(plist, "original") else plist.original0))
    p = module._parameters.get(pname)
    return ("param", id(p)) if p is not None else ("module", id(module), pname)


def _transposed(w: Tensor, groups: int) -> Tensor:
    """ConvTranspose weight ``(in, out/G, *k)`` -> ``(out, in/G·Πk)``, as :func:`as_neurons` of the layer."""
    in_ch, out_per_group = w.shape[0], w.shape[1]
    w = w.reshape(groups, in_ch // groups, out_per_group, *w.shape[2:]).transpose(1, 2)
    return w.reshape(groups * out_per_group, -1)


def _join(module_name: str, pname: str) -> str:
    return f"{module_name}.{pname}" if module_name else pname


def _type_matches(module: nn.Module, module_name: str, types: list[str | type], parents: dict[str, nn.Module]) -> bool:
    """Class (or base class) name / type match; an MHA's ``out_proj`` also matches ``MultiheadAttention``."""
    classes = [type(module)]
    parent_name, _, attr = module_name.rpartition(".")
    parent = parents.get(parent_name) if module_name else None
    if attr == "out_proj" and isinstance(parent, nn.MultiheadAttention):
        classes.append(type(parent))
    for t in types:
        for cls in classes:
            if isinstance(t, str) and any(c.__name__ == t for c in cls.__mro__):
                return True
            if isinstance(t, type) and issubclass(cls, t):
                return True
    return False


def _weight_or_none(module: nn.Module, pname: str) -> Any:
    try:
        if _sharded_sources(module, pname):  # FSDP2: its shape only, no collective
            return _read_weight(module, pname, meta=True)
        return getattr(module, pname)
    except Exception:  # a computed weight that fails (e.g. a lazy dependency)
        return None


def _describe(name: str, module: nn.Module, want_embeddings: bool) -> list[_Candidate] | str | None:
    """The candidate groups of one module (not recursing), ``"unreadable"``, or ``None`` (no neurons)."""
    def cand(pname: str, part: str | None = None, rows: tuple[int, int] | None = None, *, own: bool = False,
             **kw: Any) -> _Candidate:
        gname = name if own else _join(name, pname) + (f":{part}" if part else "")
        c = _Candidate(gname, name, module, pname, part, rows, **kw)
        if not parametrize.is_parametrized(module, pname) and is_lazy(module._parameters.get(pname)):
            c.status = "lazy, not materialized"
        return c

    pyg_linear = _pyg("Linear")
    if isinstance(module, nn.MultiheadAttention):
        if module._qkv_same_embed_dim:
            E = module.embed_dim
            return [cand("in_proj_weight", p, (i * E, (i + 1) * E)) for i, p in enumerate("qkv")]
        return [cand(f"{p}_proj_weight") for p in "qkv"]
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        if isinstance(module, nn.RNNBase):
            gates = _GATES.get(module.mode, "")
            pnames = [p for p in module._flat_weights_names if p.startswith("weight")]
        else:
            gates = _GATES.get(next((c.__name__ for c in type(module).__mro__ if c.__name__ in _GATES), ""), "")
            pnames = ["weight_ih", "weight_hh"]
        H = module.hidden_size
        out = []
        for pname in pnames:
            if pname.startswith("weight_hr") or not gates:
                out.append(cand(pname))
            else:
                out += [cand(pname, g, (i * H, (i + 1) * H)) for i, g in enumerate(gates)]
        return out
    if isinstance(module, nn.modules.conv._ConvNd):
        transposed = bool(getattr(module, "transposed", False))
        c = cand("weight", own=True, groups=module.groups, layout="transposed" if transposed else "rows")
        if c.status is None and module.groups > 1 and module.out_channels == module.groups:
            c.status = "depthwise"
        return [c]
    if isinstance(module, (nn.Linear, nn.Bilinear)) or (pyg_linear is not None and isinstance(module, pyg_linear)):
        return [cand("weight", own=True, linear_like=not isinstance(module, nn.Bilinear))]
    if isinstance(module, _EMBEDDINGS):
        return [cand("weight", own=True)] if want_embeddings else None
    if getattr(module, "hyperspherical_layer", False):
        w = _weight_or_none(module, "weight")
        if isinstance(w, Tensor) and (is_lazy(w) or w.dim() >= 2):
            return [cand("weight", own=True, linear_like=is_lazy(w) or w.dim() == 2)]
    own = list(module._parameters.items())
    if parametrize.is_parametrized(module):
        own += [(p, _weight_or_none(module, p)) for p in module.parametrizations.keys()]
    for pname, p in own:
        if pname.startswith("weight") and isinstance(p, Tensor) and (is_lazy(p) or p.dim() >= 2):
            return "unreadable"
    return None


def _as_patterns(value: Any, arg: str, allow_types: bool = False) -> list:
    if value is None:
        return []
    if isinstance(value, str) or (allow_types and isinstance(value, type) and issubclass(value, nn.Module)):
        return [value]
    ok = (str, type) if allow_types else (str,)
    accepted = ("a class name such as 'Conv2d', an nn.Module subclass, or a list of them" if allow_types
                else "a glob string such as 'features.*' or a list of glob strings")
    if isinstance(value, (list, tuple, set, frozenset)) and all(
            isinstance(v, ok) and (not isinstance(v, type) or issubclass(v, nn.Module)) for v in value):
        return list(value)
    raise TypeError(f"{arg}={value!r} is not supported: expected {accepted}, or None for no filter; "
                    f"got {type(value).__name__}. Fix: pass e.g. {arg}=['{'Linear' if allow_types else 'fc*'}']")


def _preview(names: Sequence[str], k: int = 20) -> str:
    names = list(dict.fromkeys(names))
    more = f" ... (+{len(names) - k} more)" if len(names) > k else ""
    return ", ".join(repr(n) for n in names[:k]) + more


def _call(model: nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, tuple):
        return model(*example_input)
    if isinstance(example_input, dict):
        return model(**example_input)
    return model(example_input)


def _run_forward(model: nn.Module, example_input: Any) -> _Order:
    """Run ``model`` once on ``example_input`` and record every module's call order."""
    order = _Order()
    counter = itertools.count()

    def pre(module: nn.Module, args: Any) -> None:
        order.start[id(module)] = next(counter)

    def post(module: nn.Module, args: Any, output: Any) -> None:
        order.end[id(module)] = next(counter)

    modules = list(model.modules())
    flags = [(m, m.training) for m in modules]
    handles = []
    mha = getattr(torch.backends, "mha", None)
    fast = mha.get_fastpath_enabled() if mha is not None else None
    try:
        for m in modules:
            try:
                handles.append(m.register_forward_pre_hook(pre))
                handles.append(m.register_forward_hook(post))
            except RuntimeError:  # e.g. a TorchScript submodule: it takes no hooks, its layers go unseen
                continue
        model.eval()
        if mha is not None:
            mha.set_fastpath_enabled(False)  # fused kernels would skip the submodules' hooks
        with torch.no_grad():
            try:
                _call(model, example_input)
            except Exception as err:
                raise RuntimeError(
                    f"example_input: the forward pass of {type(model).__name__} failed ({type(err).__name__}: "
                    f"{err}). Pass a tensor (model(x)), a tuple of positional arguments (model(*args)) or a "
                    "dict of keyword arguments (model(**kwargs)), on the model's device") from err
    finally:
        for h in handles:
            h.remove()
        if mha is not None:
            mha.set_fastpath_enabled(fast)
        model.train(flags[0][1])  # modules created during the call (lazy submodules) follow the root
        for m, flag in flags:
            m.training = flag
    return order


def _final_stage(c: _Candidate, eligible: list[_Candidate], parents: dict[str, nn.Module],
                 order: _Order | None) -> list[_Candidate]:
    """The output groups of output module ``c.module`` (see the module docstring, rule 2)."""
    module, mname = c.module, c.module_name
    same = [e for e in eligible if e.module is module]
    if isinstance(module, nn.MultiheadAttention):
        out_proj = [e for e in eligible if e.module is getattr(module, "out_proj", None)]
        return out_proj or same
    if isinstance(module, nn.RNNBase):
        top = module.num_layers - 1
        return [e for e in same if e.parameter_name.endswith((f"_l{top}", f"_l{top}_reverse"))] or same
    pyg_linear, mp = _pyg("Linear"), _pyg("MessagePassing")
    parent_name = mname.rpartition(".")[0]
    parent = parents.get(parent_name) if mname else None
    if pyg_linear is not None and mp is not None and isinstance(module, pyg_linear) and isinstance(parent, mp):
        siblings = [e for e in eligible if isinstance(e.module, pyg_linear) and e.module_name
                    and e.module_name.rpartition(".")[0] == parent_name]
        if order is not None and id(parent) in order.start:
            siblings = [e for e in siblings if order.end.get(id(e.module), -1) > order.start[id(parent)]]
        return siblings or same
    return same


def _output_groups(model: nn.Module, cands: list[_Candidate], parents: dict[str, nn.Module], order: _Order | None,
                   output_layer: str | None) -> list[_Candidate]:
    eligible = [c for c in cands if c.status is None]
    wanted, arg = output_layer, "output_layer"
    if wanted is None and getattr(model, "output_layer_name", None) is not None:
        wanted, arg = model.output_layer_name, f"{type(model).__name__}.output_layer_name"
        if not isinstance(wanted, str):
            raise TypeError(f"{arg}={wanted!r} is not supported: expected a layer name (str) or 'none'")
    if wanted == "none":
        return []
    if wanted is not None:
        exact = [c for c in eligible if c.name == wanted]
        if exact:
            return exact
        by_module = [c for c in eligible if c.module_name == wanted]
        if by_module:
            return _final_stage(by_module[0], eligible, parents, None)
        raise ValueError(f"{arg}={wanted!r} is not a layer with neurons of {type(model).__name__}; available "
                         f"names: {_preview([c.name for c in eligible] + [c.module_name for c in eligible])}; "
                         "or 'none' for no output layer")
    if order is not None:
        fired = [c for c in eligible if id(c.module) in order.end]
        if fired:
            last = max(fired, key=lambda c: order.end[id(c.module)])
            return _final_stage(last, eligible, parents, order)
        if eligible:
            warnings.warn(f"select_neurons: no layer with neurons ran on example_input in {type(model).__name__}'s "
                          "forward; the output layer is the last Linear-like layer in named_modules order",
                          UserWarning, stacklevel=3)
    linear = [c for c in cands if c.linear_like and c.status in (None, "lazy, not materialized")]
    if not linear:
        return []
    return _final_stage(linear[-1], eligible + [linear[-1]], parents, None)


# ---------------------------------------------------------------------------- API
def select_neurons(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    layer_types: str | type | Sequence[str | type] | None = None,
    output_layer: str | None = None,
    trainable_only: bool = True,
    example_input: Any = None,
    *,
    return_skipped: bool = False,
) -> list[NeuronGroup] | tuple[list[NeuronGroup], list[SkippedLayer]]:
    """The neuron groups of ``model``, in ``named_modules()`` order (see the module docstring for coverage,
    names, skip reasons and the output-layer rule).

    Args:
        model: any ``nn.Module`` (plain torch, torchvision, torch-geometric, a LightningModule).
        include: ``fnmatch`` glob(s) on the group name or its module name; only matching groups are kept.
        exclude: glob(s) of groups to leave out (``exclude="attn"`` drops every part of ``attn``).
        layer_types: class names (or ``nn.Module`` subclasses) to keep, matched against the class and its
            bases (``"Linear"`` also keeps torch-geometric ``Linear`` and ``SphereLinear``); an MHA's
            ``out_proj`` also matches ``"MultiheadAttention"``. ``"Embedding"`` / ``"EmbeddingBag"`` are
            needed to select embeddings at all.
        output_layer: name of the output layer (a group or module name), or ``"none"``; default: the model's
            ``output_layer_name`` attribute, else found from ``example_input``, else the last Linear-like layer.
        trainable_only: leave out weights whose parameters all have ``requires_grad=False``.
        example_input: input of one forward pass, to find the output layer by execution order: a tensor
            (``model(x)``), a tuple (``model(*args)``), a dict (``model(**kwargs)``) or any other object
            (``model(obj)``, e.g. a torch-geometric ``Batch``).
        return_skipped: also return the :class:`SkippedLayer` rows.

    Returns:
        ``[NeuronGroup, ...]``, or ``(groups, skipped)`` with ``return_skipped=True``.

    Raises:
        TypeError: an argument of the wrong type. ValueError: a pattern, type or name that matches nothing.

    Shapes:
        - ``group.neurons()``: :math:`(N, d)`, or :math:`(G, N/G, d)` for grouped convolutions.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model={type(model).__name__} is not supported: expected a torch.nn.Module")
    includes = _as_patterns(include, "include")
    excludes = _as_patterns(exclude, "exclude")
    types = _as_patterns(layer_types, "layer_types", allow_types=True)
    if output_layer is not None and not isinstance(output_layer, str):
        raise TypeError(f"output_layer={output_layer!r} is not supported: expected a layer name (str), 'none' "
                        "or None (detect it)")
    for arg, value in (("trainable_only", trainable_only), ("return_skipped", return_skipped)):
        if not isinstance(value, bool):
            raise TypeError(f"{arg}={value!r} is not supported: expected True or False")

    order = _run_forward(model, example_input) if example_input is not None else None

    parents = dict(model.named_modules(remove_duplicate=False))
    cands: list[_Candidate] = []
    unreadable: list[tuple[str, nn.Module]] = []
    first_seen: dict[int, list[_Candidate]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        want_emb = bool(types) and isinstance(module, _EMBEDDINGS) and _type_matches(module, name, types, parents)
        described = _describe(name, module, want_emb)
        if described is None:
            continue
        if id(module) in first_seen:  # the same module registered again: a tie
            firsts = first_seen[id(module)]
            if described == "unreadable" or not firsts:
                continue
            for c, first in zip(described, firsts):
                c.status = f"tie duplicate of {first.name}"
            cands += described
            continue
        if described == "unreadable":
            first_seen[id(module)] = []
            unreadable.append((name, module))
            cands.append(_Candidate(name, name, module, "weight",
                                    status=f"unreadable weight type {type(module).__name__}"))
            continue
        first_seen[id(module)] = described
        cands += described

    # every pattern must match something (a group or its module, selected or not)
    names = [c.name for c in cands] + [c.module_name for c in cands]
    hint = ""
    if not types and any(isinstance(m, _EMBEDDINGS) for m in model.modules()):
        hint = " (Embedding layers are selected only with layer_types=['Embedding'])"
    for arg, patterns in (("include", includes), ("exclude", excludes)):
        for p in patterns:
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                raise ValueError(f"{arg}: pattern {p!r} matches no layer with neurons of {type(model).__name__}; "
                                 f"available names: {_preview(names) or '(none)'}{hint}")
    if types:
        present = sorted({type(m).__name__ for m in model.modules() if isinstance(_describe("", m, True), list)})
        for t in types:
            if not any(_type_matches(c.module, c.module_name, [t], parents) for c in cands):
                raise ValueError(f"layer_types: {getattr(t, '__name__', t)!r} matches no layer with neurons of "
                                 f"{type(model).__name__}; types present: {present}")

    outputs = {id(c) for c in _output_groups(model, cands, parents, order, output_layer)}

    for c in cands:
        if c.status is not None:
            continue
        if types and not _type_matches(c.module, c.module_name, types, parents):
            c.status = "excluded"
        elif includes and not any(fnmatch.fnmatchcase(c.name, p) or fnmatch.fnmatchcase(c.module_name, p)
                                  for p in includes):
            c.status = "excluded"
        elif any(fnmatch.fnmatchcase(c.name, p) or fnmatch.fnmatchcase(c.module_name, p) for p in excludes):
            c.status = "excluded"
        elif trainable_only and not any(p.requires_grad for p in _sources(c.module, c.parameter_name)):
            c.status = "frozen"
    seen: dict[tuple, str] = {}
    for c in cands:
        if c.status is not None:
            continue
        key = (_tie_key(c.module, c.parameter_name), c.part)
        if key in seen:
            c.status = f"tie duplicate of {seen[key]}"
        else:
            seen[key] = c.name

    groups = [NeuronGroup(c.name, "output" if id(c) in outputs else "hidden", c.module, c.parameter_name, c.groups,
                          c.part, c.rows, c.module_name, c.layout) for c in cands if c.status is None]
    skipped = [SkippedLayer(c.name, c.status) for c in cands if c.status is not None]
    if unreadable:
        listed = ", ".join(f"{n!r} ({type(m).__name__})" for n, m in unreadable)
        warnings.warn(f"select_neurons: cannot read the neurons of {listed}: a weight of an unknown layer type; "
                      "they are skipped. Known: Linear, ConvNd, ConvTransposeNd, Bilinear, MultiheadAttention, "
                      "RNN/LSTM/GRU (and cells), Embedding, torch-geometric Linear, modules with "
                      "hyperspherical_layer = True and a 2-D weight", UserWarning, stacklevel=2)
    return (groups, skipped) if return_skipped else groups


def explain_selection(model: nn.Module, **kwargs: Any) -> list[SkippedLayer]:
    """What :func:`select_neurons` (same arguments) leaves out and why: ``[(name, reason), ...]``."""
    kwargs.pop("return_skipped", None)
    return select_neurons(model, return_skipped=True, **kwargs)[1]


def selection_table(groups: Sequence[NeuronGroup], skipped: Sequence[tuple[str, str]] = ()) -> str:
    """A compact text table of a selection, for printing once: ``name, role, N, d, groups`` per group
    (``N`` = neurons per group), then the skipped rows ``name  reason`` (rows skipped as ``"excluded"`` are
    summarized on one line: they are what the user asked to leave out)."""
    rows = [("name", "role", "N", "d", "groups")]
    for g in groups:
        shape = g.shape
        rows.append((g.name, g.role, str(shape[-2]), str(shape[-1]), str(g.groups)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    shown = [(str(s[0]), str(s[1])) for s in skipped if s[1] != "excluded"]
    excluded = [str(s[0]) for s in skipped if s[1] == "excluded"]
    if shown or excluded:
        lines.append(f"skipped ({len(skipped)}):")
        width = max([len(n) for n, _ in shown] + [8])
        lines += [f"  {n.ljust(width)}  {r}" for n, r in shown]
        if excluded:
            lines.append(f"  {'excluded'.ljust(width)}  {len(excluded)} by include/exclude/layer_types: "
                         f"{_preview(excluded, 8)}")
    return "\n".join(lines)

check_patterns = _as_patterns  # public name of the include / exclude / layer_types check (callbacks)
