"""Orthogonal Over-Parameterized Training (OPT) as a ``torch.nn.utils.parametrize`` parametrization.

Thesis "Deep Representation Learning on Hypersphere" (W. Liu), Chapter 7 / Appendix F; spec ``opt.md``.
A layer with ``n`` neurons of dimension ``d`` (rows of ``as_neurons(weight)``: Linear ``(out, in)``,
ConvNd ``(out, in/groups·Πk)`` in PyTorch's ``(C_in, kh, kw)`` flatten order, torch-geometric
``Linear``) gets the weight

    ``W = R V``,  ``V ∈ R^{d×n}`` a fixed random buffer (the layer's initial weight, columns = neurons),
    ``R = orth(P) ∈ O(d)`` built from a learnable ``P`` by the chosen method,

so ``WᵀW = VᵀV``: every pairwise angle, norm and hyperspherical energy of the neurons stays at its
initial value for the whole run (thesis Eq. 7.2). ``P`` is stored as the parametrization's
``original`` (``layer.parametrizations.weight.original``), so any optimizer over
``model.parameters()`` trains it; biases stay ordinary parameters.

Entry point: :func:`apply_opt`. Variants (``method``):

* exact maps from :mod:`lightning_hyper.functional.orthogonal`: ``"gram_schmidt"`` (``gs``),
  ``"householder"`` (``hr``), ``"lowdin"`` (``ls``), ``"cayley"`` (``cp``), ``"matrix_exp"`` (``exp``);
* ``"ogd"``: ``R = P`` itself, kept orthogonal by :class:`~lightning_hyper.optim.StiefelCayleySGD` (§7.3.5;
  the optimizer lives in :mod:`lightning_hyper.optim` and is re-exported here) — attach it to the
  main optimizer with :func:`attach_ogd` and leave the rotations out of the main optimizer
  (:func:`split_opt_parameters`);
* ``"relaxed"`` (``or``): ``R = P`` free, pushed towards orthogonality by the
  ``OrthogonalRegularizer`` callback (§7.3.6); ``"unconstrained"`` (``upt``): ``R = P`` free (ablation, §7.5.1).

Options: PE-OPT block-diagonal ``R`` (``blocks``, ``shared_blocks``; Appendix F.5), stochastic OPT
(``sopt``: a random ``d'``-subset of coordinates rotated per episode, re-drawn by :func:`sopt_resample`),
and the refinement of ``V`` before training (``refine="mhe" | "hs_mhe"``: gradient descent on the
hyperspherical energy of ``V``'s neurons, §7.3.7) via :func:`refine_v`.
"""
from __future__ import annotations

import fnmatch
import math
import warnings
from typing import Any
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_hyper.functional.orthogonal import (
    ORTHOGONAL_MAPS,
    apply_block_rotation,
    apply_subset_rotation,
    block_diagonal,
    cayley_apply,
    embed_subset_rotation,
    orthogonality_error,
    resolve_method,
    sample_subset,
)
from lightning_hyper.functional.checks import check_choice, check_number
from lightning_hyper.nn.transform import (
    output_layer_from_flag,
    CANNOT,
    UNSET as _UNSET,
    TransformPlan,
    TransformArgs,
    conflict,
    deprecated,
    foreign_owners,
    nothing_selected,
    parameter_owners,
    plan_transform,
)
from lightning_hyper.optim.refine import REFINE_OBJECTIVES, minimize_energy
from lightning_hyper.optim.stiefel import StiefelCayleySGD, attach_ogd

__all__ = [
    "OPT_METHODS",
    "canonical_method",
    "OPTParametrization",
    "OPTSizeWarning",
    "StiefelCayleySGD",
    "absorb_rotation",
    "apply_opt",
    "attach_ogd",
    "get_opt",
    "opt_layers",
    "orthogonality_errors",
    "plan_opt",
    "refine_v",
    "remove_opt",
    "rotation_parameters",
    "sopt_resample",
    "split_opt_parameters",
]

#: maps where ``R = P`` directly (no orthogonalization in the forward pass)
_DIRECT = ("ogd", "relaxed", "unconstrained")
OPT_METHODS = (*ORTHOGONAL_MAPS, *_DIRECT)
_DIRECT_ALIASES = {"or": "relaxed", "upt": "unconstrained"}
R_INITS = ("normal", "identity", "orthogonal")


def canonical_method(method: str) -> str:
    """The canonical name of an OPT method (accepts the spec's short names gs/hr/ls/cp/exp/or/upt)."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, got {type(method).__name__}")
    low = method.lower()
    if low in _DIRECT:
        return low
    if low in _DIRECT_ALIASES:
        return _DIRECT_ALIASES[low]
    try:
        return resolve_method(low)
    except ValueError:
        raise ValueError(
            f"method={method!r} is not supported; accepted values: {list(OPT_METHODS)} "
            "(aliases gs, hr, ls, cp, exp, or, upt)"
        ) from None


def _pyg_linear() -> type | None:
    try:
        from torch_geometric.nn.dense.linear import Linear
    except Exception:  # pragma: no cover
        return None
    return Linear


def _supported(module: nn.Module) -> bool:
    pyg = _pyg_linear()
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return False
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return True
    return pyg is not None and isinstance(module, pyg)


def _random_orthogonal(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator | None) -> Tensor:
    """Haar-distributed orthogonal matrices: ``Q₊`` of an i.i.d. Gaussian matrix (spec §2.4)."""
    A = torch.randn(shape, dtype=torch.float64, generator=generator)
    Q, Rr = torch.linalg.qr(A)
    Q = Q * torch.where(Rr.diagonal(dim1=-2, dim2=-1) >= 0, 1.0, -1.0).unsqueeze(-2)
    return Q.to(dtype)


class OPTParametrization(nn.Module):
    """``weight = (R(P) · V)ᵀ`` reshaped to the layer's weight shape; ``P`` is the parametrization's input.

    Args:
        weight: the layer's current weight; its neurons become the fixed ``V`` (``d × n``).
        method: see :data:`OPT_METHODS` (short aliases accepted).
        r_init: initialization of ``P``: ``"normal"`` (N(0, 1), thesis F.3 — default for the exact maps),
            ``"identity"`` (``R = I`` at the start — default for ``ogd`` and S-OPT) or ``"orthogonal"``
            (a Haar-random orthogonal ``P`` — default for ``relaxed``/``unconstrained``, which blow up
            activations by ~√d from a Gaussian ``P`` when no BN follows; spec §3, §11.17).
        blocks, shared_blocks: PE-OPT: ``R = Diag(R⁽¹⁾..R⁽ᵏ⁾)`` with ``k = blocks`` equal blocks,
            independent (``P`` is ``(k, d/k, d/k)``) or one shared block (``P`` is ``(d/k, d/k)``).
        sopt, sopt_dim: S-OPT: only the ``sopt_dim`` coordinates in the buffer ``indices`` are
            rotated, ``W[I] = R' V[I]``; ``P`` is ``(d', d')``.
        fix_v: ``False`` makes ``V`` a trainable parameter (Table 7.1's FN=N ablation).
        normalize_v: scale each neuron of ``V`` to unit norm once (§6.2).
        dtype: compute ``R`` in this dtype (e.g. ``torch.float64``), then cast back.
        generator: random source for ``P`` and the S-OPT subset.
        method_kwargs: extra keyword arguments of the orthogonalization map (e.g. ``full=False``).
    """

    def __init__(self, weight: Tensor, method: str = "cayley", *, r_init: str | None = None, blocks: int = 1,
                 shared_blocks: bool = False, sopt: bool = False, sopt_dim: int | None = None, fix_v: bool = True,
                 normalize_v: bool = False, dtype: torch.dtype | None = None,
                 generator: torch.Generator | None = None, method_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        if weight.dim() < 2:
            raise ValueError(f"weight must have at least 2 dimensions (neurons, ...), got shape {tuple(weight.shape)}")
        self.method = canonical_method(method)
        self.method_kwargs = dict(method_kwargs or {})
        if self.method in _DIRECT and self.method_kwargs:
            raise ValueError(f"method={self.method!r} takes no method kwargs, got {sorted(self.method_kwargs)}")
        self.weight_shape = tuple(weight.shape)
        n = weight.shape[0]
        d = int(math.prod(weight.shape[1:]))
        self.n, self.d = n, d
        if not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"blocks={blocks!r} is not supported; accepted values: a positive integer dividing d={d}")
        if blocks > 1 and d % blocks:
            raise ValueError(f"blocks={blocks} does not divide the neuron dimension d={d}")
        if sopt and blocks > 1:
            raise ValueError("sopt=True and blocks > 1 cannot be combined; choose S-OPT or PE-OPT")
        self.blocks, self.shared_blocks, self.sopt = blocks, bool(shared_blocks), bool(sopt)
        if sopt:
            sopt_dim = max(1, round(0.25 * d)) if sopt_dim is None else sopt_dim
            if not isinstance(sopt_dim, int) or not 0 < sopt_dim <= d:
                raise ValueError(f"sopt_dim={sopt_dim!r} is not supported; accepted values: an integer in [1, d={d}]")
            self.register_buffer("indices", sample_subset(d, sopt_dim, generator, weight.device))
        self.orth_dtype = dtype
        if r_init is None:
            r_init = "identity" if (self.method == "ogd" or sopt) else (
                "orthogonal" if self.method in ("relaxed", "unconstrained") else "normal")
        if r_init not in R_INITS:
            raise ValueError(f"r_init={r_init!r} is not supported; accepted values: {list(R_INITS)}")
        if self.method == "ogd" and r_init == "normal":
            raise ValueError(
                "method='ogd' needs an orthogonal starting point: r_init must be 'identity' or 'orthogonal'"
            )
        self.r_init = r_init

        V = weight.detach().reshape(n, d).mT.clone()
        if normalize_v:
            V = V / V.norm(dim=0, keepdim=True).clamp_min(1e-12)
        if fix_v:
            self.register_buffer("V", V)
        else:
            self.V = nn.Parameter(V)
        self._p_init = self._initial_parameter(r_init, weight.dtype, generator)
        self._registered = False
        if r_init == "identity" or sopt:
            eye = torch.eye(self.p_shape[-1], dtype=self.V.dtype, device=self.V.device)
            err = float((self.rotation(self.identity_parameter()) - eye).abs().max())
            if err > 1e-4:
                raise ValueError(f"method={self.method!r} with {self.method_kwargs} does not map P = I to R = I "
                                 f"(error {err:.2g}); identity init and S-OPT need such a map")

    # ------------------------------------------------------------------ shapes and init
    @property
    def p_shape(self) -> tuple[int, ...]:
        """Shape of the learnable ``P``."""
        if self.sopt:
            k = self.indices.numel()
            return (k, k)
        if self.blocks > 1:
            b = self.d // self.blocks
            return (b, b) if self.shared_blocks else (self.blocks, b, b)
        return (self.d, self.d)

    def identity_parameter(self) -> Tensor:
        """A ``P`` with ``R(P) = I`` for every method (the identity matrix)."""
        shape = self.p_shape
        eye = torch.eye(shape[-1], dtype=self.V.dtype, device=self.V.device)
        return eye.expand(shape).clone()

    def _initial_parameter(self, r_init: str, dtype: torch.dtype, generator: torch.Generator | None) -> Tensor:
        shape = self.p_shape
        if r_init == "identity":
            return self.identity_parameter().to(dtype)
        if r_init == "orthogonal":
            return _random_orthogonal(shape, dtype, generator).to(self.V.device)
        return torch.randn(shape, dtype=dtype, generator=generator).to(self.V.device)

    # ------------------------------------------------------------------ the map
    def rotation(self, P: Tensor) -> Tensor:
        """``R = orth(P)`` (blocks ``(k, b, b)``, a shared ``(b, b)`` block or the S-OPT ``(d', d')`` block)."""
        if tuple(P.shape) != self.p_shape:
            raise ValueError(f"R dimension mismatch: P has shape {tuple(P.shape)}, expected {self.p_shape} "
                             f"for a layer with neurons of dimension d={self.d}")
        if self.method in _DIRECT:
            return P
        X = P if self.orth_dtype is None else P.to(self.orth_dtype)
        R = ORTHOGONAL_MAPS[self.method](X, **self.method_kwargs)
        return R.to(P.dtype)

    def full_rotation(self, P: Tensor) -> Tensor:
        """The dense ``d × d`` rotation acting on ``V`` (for monitoring and tests)."""
        R = self.rotation(P)
        if self.sopt:
            return embed_subset_rotation(R, self.indices, self.d)
        if self.blocks > 1:
            return block_diagonal(R, self.blocks)
        return R

    def effective(self, P: Tensor) -> Tensor:
        """``W = R V`` with neurons as columns, ``(d, n)``."""
        if self.method == "cayley" and not self.method_kwargs and self.n <= self.p_shape[-1]:
            return self._cayley_effective(P)  # fewer right-hand sides than R's columns: solve against V
        R = self.rotation(P)
        V = self.V
        if self.sopt:
            return apply_subset_rotation(R, V, self.indices)
        if self.blocks > 1:
            return apply_block_rotation(R, V)
        return R @ V

    def _cayley_effective(self, P: Tensor) -> Tensor:
        """Cayley fast path: ``R V = 2 (I − S)^{-1} V − V`` (see :func:`cayley_apply`), never forming ``R``."""
        if tuple(P.shape) != self.p_shape:
            raise ValueError(f"R dimension mismatch: P has shape {tuple(P.shape)}, expected {self.p_shape} "
                             f"for a layer with neurons of dimension d={self.d}")
        X = P if self.orth_dtype is None else P.to(self.orth_dtype)
        V = self.V.to(X.dtype)
        if self.sopt:
            sub = cayley_apply(X, V.index_select(0, self.indices)).to(self.V.dtype)
            return self.V.index_copy(0, self.indices, sub)
        if self.blocks > 1:
            b = self.d // self.blocks
            return cayley_apply(X, V.reshape(self.blocks, b, self.n)).reshape(self.d, self.n).to(self.V.dtype)
        return cayley_apply(X, V).to(self.V.dtype)

    def forward(self, P: Tensor) -> Tensor:
        return self.effective(P).mT.reshape(self.weight_shape)

    @torch.no_grad()
    def right_inverse(self, weight: Tensor) -> Tensor:
        """At registration: the initial ``P``. On a later ``layer.weight = W`` assignment: ``V ← W`` and
        ``P ← I``, so the layer's weight becomes ``W`` exactly (this is also how rotations are absorbed)."""
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not match this OPT layer's "
                             f"{self.weight_shape}")
        if not self._registered:
            self._registered = True
            P = self._p_init
            del self._p_init
            return P
        self.V.copy_(weight.reshape(self.n, self.d).mT)
        return self.identity_parameter().to(weight.dtype)

    def extra_repr(self) -> str:
        extra = f", blocks={self.blocks}, shared={self.shared_blocks}" if self.blocks > 1 else ""
        extra += f", sopt_dim={self.indices.numel()}" if self.sopt else ""
        return f"method={self.method!r}, d={self.d}, n={self.n}{extra}"


# ---------------------------------------------------------------------- discovery
def get_opt(layer: nn.Module) -> OPTParametrization | None:
    """The layer's :class:`OPTParametrization`, or ``None``."""
    if not parametrize.is_parametrized(layer, "weight"):
        return None
    for p in layer.parametrizations["weight"]:
        if isinstance(p, OPTParametrization):
            return p
    return None


def opt_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{module name: layer}`` of every OPT layer of ``model`` (``""`` if ``model`` itself is one)."""
    return {name: m for name, m in model.named_modules() if get_opt(m) is not None}


def rotation_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable ``P`` of every OPT layer (``layer.parametrizations.weight.original``)."""
    return [m.parametrizations["weight"].original for m in opt_layers(model).values()]


def split_opt_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(rotation parameters, every other trainable parameter)`` — for OGD's separate optimizer."""
    rot = rotation_parameters(model)
    ids = {id(p) for p in rot}
    return rot, [p for p in model.parameters() if p.requires_grad and id(p) not in ids]


@torch.no_grad()
def orthogonality_errors(model: nn.Module, norm: str = "max") -> dict[str, float]:
    """``{layer: ‖RᵀR − I‖}`` of every OPT layer (blocks: the largest over blocks)."""
    from lightning_hyper.nn.selection import call_whole

    out = {}
    for name, m in opt_layers(model).items():
        with torch.no_grad():  # (an FSDP2-sharded P is gathered: every rank calls this)
            R = call_whole(m, lambda layer: get_opt(layer).rotation(layer.parametrizations["weight"].original))
        out[name] = float(orthogonality_error(R, norm=norm))
    return out


# ---------------------------------------------------------------------- conversion
#: layers OPT reparameterizes (``as_neurons`` of their weight is ``(n, d)``)
OPT_SUPPORTED = ("nn.Linear (and subclasses such as MultiheadAttention.out_proj), nn.Conv1d/2d/3d, "
                 "torch_geometric Linear")
#: a rotation above either limit triggers :class:`OPTSizeWarning`
SIZE_WARN_RATIO = 10.0
SIZE_WARN_DIM = 2048


class OPTSizeWarning(UserWarning):
    """:func:`apply_opt` would build a rotation far larger than its layer (see :data:`SIZE_WARN_RATIO`,
    :data:`SIZE_WARN_DIM`); the message names the multiplier and the cheaper ``blocks=`` / ``sopt=``."""


def _as_patterns(value: str | Sequence[str] | None, arg: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Iterable) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{arg}={value!r} is not supported: expected a module-name glob or a list of them")
    return list(value)


def _opt_cannot(group: Any) -> str | None:
    """Why OPT cannot reparameterize a group of :func:`select_neurons` (``None``: it can)."""
    module = group.module
    if isinstance(module, nn.MultiheadAttention):
        return (CANNOT + "packed attention weight (q/k/v rows of one parameter); OPT reparameterizes whole "
                "Linear/Conv weights, and the attention's out_proj is converted as a Linear")
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return CANNOT + "recurrent gate weight (RNN/LSTM/GRU read their flat weights directly)"
    if group.parameter_name != "weight":
        return CANNOT + f"weight {group.parameter_name!r} is not the layer's 'weight'"
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return CANNOT + f"{type(module).__name__} (neurons are the weight's columns)"
    if not _supported(module):
        return CANNOT + f"type {type(module).__name__}"
    return None


def plan_opt(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    *,
    layer_types: str | type | Sequence[str | type] | None = None,
    output_layer: str | None = None,
    trainable_only: bool = True,
    example_input: Any = None,
) -> TransformPlan:
    """What :func:`apply_opt` with the same selection arguments would reparameterize, without changing
    ``model``: a plan with ``.groups`` (:class:`~lightning_hyper.nn.selection.NeuronGroup`, the core's names
    and order), ``.names``, ``.skipped`` (``(name, reason)`` rows) and ``.table()``.

    The layers come from :func:`~lightning_hyper.nn.selection.select_neurons` (same arguments); the output
    group stays plain; packed attention (``in_proj_weight`` q/k/v), RNN/LSTM/GRU gates, ConvTranspose,
    Bilinear, Embedding and unknown types are skipped with a ``"cannot transform: ..."`` reason.
    """
    args = TransformArgs(include, exclude, layer_types, output_layer, trainable_only, example_input)
    return plan_transform("apply_opt", model, args, _opt_cannot, OPT_SUPPORTED)


def _drop_computed_weight(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """torch-geometric ``Linear`` writes ``weight`` itself; for an OPT layer it is derived, not state."""
    if parametrize.is_parametrized(module, "weight"):
        state_dict.pop(prefix + "weight", None)


def _p_shape(d: int, blocks: int, shared_blocks: bool, sopt_dim: int | None) -> tuple[int, ...] | None:
    """Shape of the learnable ``P`` of a layer with neurons of dimension ``d`` (``None``: invalid sizes,
    which :class:`OPTParametrization` reports)."""
    if sopt_dim is not None:
        return (sopt_dim, sopt_dim)
    if blocks > 1:
        if d % blocks:
            return None
        b = d // blocks
        return (b, b) if shared_blocks else (blocks, b, b)
    return (d, d)


def _size_warning(model: nn.Module, specs: list[tuple[str, nn.Module, int, int, tuple[int, ...] | None]]) -> None:
    """One :class:`OPTSizeWarning` naming the multipliers and the cheaper options, if a rotation is too big.

    ``specs``: ``(name, layer, n, d, P shape)`` of every layer about to be converted."""
    big, added = [], 0
    for name, layer, n, d, shape in specs:
        if shape is None:
            continue
        bias = getattr(layer, "bias", None)
        layer_params = n * d + (bias.numel() if isinstance(bias, Tensor) else 0)
        rot = math.prod(shape)
        added += rot - n * d
        if rot > SIZE_WARN_RATIO * layer_params or shape[-1] > SIZE_WARN_DIM:
            what = (f"{shape[0]} blocks of {shape[1]}x{shape[2]}" if len(shape) == 3
                    else f"a {shape[0]}x{shape[1]} rotation")
            big.append((name, rot / layer_params, what, rot))
    if not big:
        return
    before = sum(p.numel() for p in model.parameters())
    after = before + added
    big.sort(key=lambda row: -row[3])
    listed = "; ".join(f"{name!r}: {what}, {ratio:.1f}x its layer's parameters" for name, ratio, what, _ in big[:4])
    more = f"; ... (+{len(big) - 4} more)" if len(big) > 4 else ""
    warnings.warn(
        f"apply_opt: the rotations would hold {after / before:.1f}x the model's parameters ({before:,} -> {after:,}), "
        f"and every forward pass orthogonalizes each rotation (O(d^3) for a d x d one). Largest: {listed}{more}. "
        f"Cheaper: blocks=k (PE-OPT, k blocks of (d/k)^2 parameters, k must divide each layer's d; "
        f"shared_blocks=True keeps one (d/k)^2 block) or sopt=True (S-OPT, a (d/4)^2 rotation, sopt_fraction= "
        f"sets d'/d). Warned when a rotation holds more than {SIZE_WARN_RATIO:g}x its layer's parameters or is "
        f"larger than {SIZE_WARN_DIM}x{SIZE_WARN_DIM}.", OPTSizeWarning, stacklevel=3)


def apply_opt(
    model: nn.Module,
    method: str = "cayley",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    *,
    layer_types: str | type | Sequence[str | type] | None = None,
    output_layer: str | None = None,
    trainable_only: bool = True,
    example_input: Any = None,
    r_init: str | None = None,
    blocks: int = 1,
    shared_blocks: bool = False,
    sopt: bool = False,
    sopt_fraction: float = 0.25,
    sopt_dim: int | None = None,
    sopt_full_layers: str | Sequence[str] | None = None,
    refine: str | None = None,
    refine_steps: int = 5000,
    refine_lr: float = 1.0,
    refine_s: float = 2.0,
    normalize_v: bool = False,
    fix_v: bool = True,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
    layers: Any = _UNSET,
    exclude_output: Any = _UNSET,
    **method_kwargs: Any,
) -> nn.Module:
    """Convert ``model``'s layers to OPT in place (``weight = R·V``) and return ``model``.

    **Which layers.** :func:`~lightning_hyper.nn.selection.select_neurons` chooses them (``include``,
    ``exclude``, ``layer_types``, ``output_layer``, ``trainable_only``, ``example_input`` mean what they mean
    there, and group names are the core's). Of its groups, OPT reparameterizes ``nn.Linear`` (subclasses
    too: ``MultiheadAttention.out_proj``), ``nn.Conv1d/2d/3d`` and torch-geometric ``Linear`` (e.g.
    ``GCNConv.lin``). It **skips, with a reported reason** (one warning per call, and in
    :func:`plan_opt`): packed attention weights (``in_proj_weight`` q/k/v, ``q_proj_weight``...),
    RNN/LSTM/GRU gate weights, ConvTranspose, Bilinear, Embedding and unknown types. The core also leaves
    out depthwise convolutions, frozen layers and tie duplicates.

    **What is kept.**

    - *The output layer* (role ``"output"``: ``output_layer=``, else ``model.output_layer_name``, else the
      last layer the forward pass on ``example_input`` runs, else the last Linear-like layer) stays
      standard: the thesis never reparameterizes the classifier. ``output_layer="none"`` converts every
      selected layer (feature extractors without a classifier).
    - *Frozen layers* are not converted (``trainable_only=True``). With ``trainable_only=False`` they are,
      and stay frozen: ``P`` is the layer's former weight Parameter object (``parametrize`` re-uses it),
      so it keeps ``requires_grad=False``.
    - *Parameter ties*: a weight shared with another module (a language model's decoder tied to its
      embedding) cannot be reparameterized in place without breaking the tie (``parametrize`` turns the
      shared Parameter into ``P``), so it is refused with a ``ValueError`` naming both users.
    - *Module reuse*: a module registered under several names is converted once and serves every use.
    - *Predictions*: with ``r_init="identity"`` (``R = I``, the default of ``ogd`` and S-OPT) the model
      computes exactly what it did; torch's fused ``TransformerEncoderLayer`` kernel reads the
      parametrized (effective) weights, so eval/no-grad predictions follow the OPT weights there too.
    - *Size*: a rotation holding more than :data:`SIZE_WARN_RATIO` (10)x its layer's parameters or larger
      than :data:`SIZE_WARN_DIM` (2048) x 2048 triggers one :class:`OPTSizeWarning` with the model's size
      multiplier and the cheaper ``blocks=`` / ``sopt=`` (ResNet-18: 8.9x the parameters with full OPT).
    - *torch.compile*: the orthogonalization's data checks run as in-graph asserts under compile, so an
      OPT forward pass has no graph break.

    The model is checked completely (lazy, all-zero, tied, already-OPT layers, ``blocks``/``sopt_dim``
    sizes) before any layer is changed.

    Args:
        model: any module.
        method: ``"cayley"``, ``"gram_schmidt"``, ``"householder"``, ``"lowdin"``, ``"matrix_exp"``,
            ``"ogd"``, ``"relaxed"``, ``"unconstrained"`` (aliases cp, gs, hr, ls, exp, or, upt).
        include, exclude: group/module-name glob(s) (``fnmatch``); a string is one pattern.
        layer_types: class names or types to keep (base classes match, e.g. ``"Conv2d"``).
        output_layer: the output layer's name, or ``"none"`` for no output layer (convert it too).
        trainable_only: leave frozen layers standard (default) or convert them too (they stay frozen).
        example_input: one batch; the output layer is then the last layer the forward pass runs (needed
            for a convolutional classifier such as SqueezeNet's); lazy layers are materialized by it.
        r_init, blocks, shared_blocks, normalize_v, fix_v, dtype: see :class:`OPTParametrization`.
        sopt, sopt_fraction, sopt_dim: S-OPT with ``d' = sopt_dim`` or ``round(sopt_fraction·d)``
            rotated coordinates; ``sopt_full_layers`` (globs) keep full OPT (the spec's first conv).
        refine, refine_steps, refine_lr, refine_s: refine ``V`` before training (see :func:`refine_v`).
        seed: seeds the random ``P`` and S-OPT subsets (default: torch's global RNG).
        layers: deprecated name of ``include`` (``DeprecationWarning``); as before, a layer it names is
            converted even if it is the output layer (it implies ``output_layer="none"``).
        exclude_output: deprecated; ``False`` is ``output_layer="none"``, ``True`` the default detection.
        method_kwargs: passed to the orthogonalization map (e.g. ``full=False`` for householder).

    Raises:
        ValueError: unknown ``method``/``r_init``/``refine``, a pattern matching nothing, a lazy or
            already-parametrized layer, a tied weight, an all-zero layer named by ``include``, ``blocks``
            not dividing ``d``, nothing to convert (the message holds the selection table).
        TypeError: ``include`` names only layers OPT cannot convert.
    """
    canonical_method(method)
    if refine is not None and refine not in REFINE_OBJECTIVES:
        raise ValueError(f"refine={refine!r} is not supported; accepted values: {[None, *REFINE_OBJECTIVES]}")
    if not 0 < sopt_fraction <= 1:
        raise ValueError(f"sopt_fraction={sopt_fraction!r} is not supported; accepted values: a number in (0, 1]")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    explicit_output = output_layer is not None
    if exclude_output is not _UNSET:
        output_layer = output_layer_from_flag("apply_opt", "exclude_output", exclude_output, output_layer,
                                              "output_layer=None (detect and keep it plain) or "
                                              "output_layer='none' (convert every selected layer)")
    if layers is not _UNSET:
        deprecated("apply_opt", "layers", "include=", layers)
        if include is not None:
            raise conflict("apply_opt", "layers", "include")
        include = layers
        if layers is not None and not explicit_output:
            output_layer = "none"  # layers= always converted what it named, the output layer included
    full_patterns = _as_patterns(sopt_full_layers, "sopt_full_layers")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    plan = plan_opt(model, include, exclude, layer_types=layer_types, output_layer=output_layer,
                    trainable_only=trainable_only, example_input=example_input)
    owners = parameter_owners(model)
    pyg = _pyg_linear()
    specs: list[tuple[Any, nn.Module, Tensor, int | None, tuple[int, ...] | None]] = []
    done: set[int] = set()
    for g in plan.groups:  # check every layer before changing any
        layer, label = g.module, g.name or type(g.module).__name__
        if id(layer) in done:
            continue
        done.add(id(layer))
        if parametrize.is_parametrized(layer, "weight"):
            raise ValueError(f"apply_opt: layer {label!r} already has a parametrization on its weight (OPT applied "
                             f"twice?); exclude it (exclude=[{label!r}]) or remove_opt(model) first")
        w = layer.weight
        tied = foreign_owners(owners, layer)
        if tied:
            raise ValueError(
                f"apply_opt: the weight of {label!r} is tied to {', '.join(repr(t) for t in tied)} (one Parameter, "
                "several users). OPT reparameterizes a weight in place, which would break the tie (the other user "
                f"would read the rotation parameter). Fix: exclude it (exclude=[{label!r}]), or untie the weights "
                "before apply_opt")
        if not bool(w.detach().abs().sum() > 0):
            if include is None:
                warnings.warn(f"apply_opt: skipping layer {label!r}, its weight is all zeros (W = R·V would stay 0)",
                              stacklevel=2)
                continue
            raise ValueError(f"apply_opt: layer {label!r} has an all-zero weight: OPT would keep W = R·V = 0 forever; "
                             f"exclude it (exclude=[{label!r}])")
        d = int(math.prod(w.shape[1:]))
        layer_sopt = sopt and not any(fnmatch.fnmatchcase(g.name, p) for p in full_patterns)
        dim = (sopt_dim if sopt_dim is not None else max(1, round(sopt_fraction * d))) if layer_sopt else None
        if isinstance(dim, int):
            dim = min(dim, d)
        valid = isinstance(blocks, int) and blocks >= 1 and (dim is None or (isinstance(dim, int) and dim > 0))
        specs.append((g, layer, w, dim, _p_shape(d, blocks, shared_blocks, dim) if valid else None))
    if not specs:
        raise nothing_selected("apply_opt", model, plan, f"layer OPT can convert ({OPT_SUPPORTED})")
    _size_warning(model, [(g.name, layer, w.shape[0], w[0].numel(), shape) for g, layer, w, _, shape in specs])
    built: list[tuple[nn.Module, OPTParametrization]] = []
    for g, layer, w, dim, _ in specs:
        try:
            param = OPTParametrization(
                w, method, r_init=r_init, blocks=blocks, shared_blocks=shared_blocks, sopt=dim is not None,
                sopt_dim=dim, fix_v=fix_v, normalize_v=normalize_v, dtype=dtype, generator=generator,
                method_kwargs=method_kwargs,
            )
        except ValueError as err:
            raise ValueError(f"apply_opt: layer {g.name or type(layer).__name__!r}: {err}") from None
        built.append((layer, param))
    for layer, param in built:
        parametrize.register_parametrization(layer, "weight", param)  # P re-uses the weight's Parameter object
        type(layer).__reduce_ex__ = _reduce_opt_layer  # picklable (ddp_spawn sends the model to its workers)
        if pyg is not None and isinstance(layer, pyg) and not getattr(layer, "_opt_state_hook", False):
            layer.register_state_dict_post_hook(_drop_computed_weight)
            layer._opt_state_hook = True
    if refine is not None:
        for layer, _ in built:
            refine_v(layer, objective=refine, steps=refine_steps, lr=refine_lr, s=refine_s)
    return model


def _reduce_opt_layer(self: nn.Module, protocol: int) -> tuple:
    """Pickle an OPT layer: torch refuses to pickle parametrized modules (their class is created on the
    fly), so pickle the plain class and the instance dict and re-inject the parametrization on load."""
    return _rebuild_opt_layer, (type(self).__bases__[0], self.__dict__.copy())


def _rebuild_opt_layer(base: type, state: dict[str, Any]) -> nn.Module:
    layer = base.__new__(base)
    layer.__dict__.update(state)
    parametrize._inject_new_class(layer)
    for name in layer.parametrizations:
        parametrize._inject_property(layer, name)
    type(layer).__reduce_ex__ = _reduce_opt_layer
    return layer


def remove_opt(model: nn.Module) -> nn.Module:
    """Materialize ``W = R V`` into plain weights (same size and speed as the baseline) and drop OPT."""
    for layer in opt_layers(model).values():
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    return model


@torch.no_grad()
def absorb_rotation(model: nn.Module) -> int:
    """``V ← R V`` and ``P ← I`` in every OPT layer (weights unchanged); returns the number of layers."""
    count = 0
    for layer in opt_layers(model).values():
        param, P = get_opt(layer), layer.parametrizations["weight"].original
        param.V.copy_(param.effective(_whole(P)))
        _assign(P, param.identity_parameter())
        count += 1
    return count


def _whole(t: Tensor) -> Tensor:
    """An FSDP2-sharded (``DTensor``) P all-gathered (every rank calls it), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _assign(P: Tensor, value: Tensor) -> None:
    """``P.copy_(value)`` for a whole ``value``; a sharded P keeps its own rows of it."""
    if hasattr(P, "full_tensor"):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(P.dtype), P.device_mesh, P.placements)
    P.copy_(value)


@torch.no_grad()
def sopt_resample(model: nn.Module,
                  optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
                  generator: torch.Generator | None = None) -> int:
    """End an S-OPT episode (spec §4): absorb ``V ← W``, reset ``P' ← I`` and its state in ``optimizer``
    (one or several), draw a new coordinate subset. Returns the number of S-OPT layers re-drawn."""
    optimizers = [] if optimizer is None else (
        [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer))
    count = 0
    for layer in opt_layers(model).values():
        param = get_opt(layer)
        if not param.sopt:
            continue
        P = layer.parametrizations["weight"].original
        param.V.copy_(param.effective(_whole(P)))
        _assign(P, param.identity_parameter())
        param.indices.copy_(sample_subset(param.d, param.indices.numel(), generator).to(param.indices.device))
        for opt in optimizers:
            opt.state.pop(P, None)
        count += 1
    return count


def refine_v(layer: nn.Module, objective: str = "hs_mhe", steps: int = 5000, lr: float = 1.0, s: float = 2.0,
             dtype: torch.dtype | None = None) -> tuple[float, float]:
    """Refine the fixed random neurons ``V`` of an OPT layer before training (thesis §7.3.7, spec §6.1).

    Plain gradient descent (``SGD(lr)``, no momentum, ``steps`` iterations) on the mean-over-pairs
    Riesz-``s`` hyperspherical energy of ``V``'s neurons (``"mhe"``: full space; ``"hs_mhe"``:
    half space, which also separates near-collinear pairs): the loop is
    :func:`lightning_hyper.optim.minimize_energy`. The energy depends on directions only,
    so each neuron's norm is restored afterwards. Returns ``(energy before, energy after)``.
    """
    check_choice("objective", objective, REFINE_OBJECTIVES, owner="refine_v")
    check_number("steps", steps, low=0, low_inclusive=True, integer=True, owner="refine_v")
    param = get_opt(layer)
    if param is None:
        raise TypeError(f"refine_v needs an OPT layer (see apply_opt), got {type(layer).__name__}")
    rows, before, after = minimize_energy(param.V.mT, objective, steps, lr, s, dtype)
    with torch.no_grad():
        param.V.copy_(rows.mT)
    return before, after
