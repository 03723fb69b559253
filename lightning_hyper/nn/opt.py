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
* ``"ogd"``: ``R = P`` itself, kept orthogonal by :class:`StiefelCayleySGD` (§7.3.5) — attach it to the
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
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_hyper.functional.energy import hyperspherical_energy
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
    stiefel_cayley_step,
)

__all__ = [
    "OPT_METHODS",
    "OPTParametrization",
    "StiefelCayleySGD",
    "absorb_rotation",
    "apply_opt",
    "attach_ogd",
    "get_opt",
    "opt_layers",
    "orthogonality_errors",
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
REFINE_OBJECTIVES = ("mhe", "hs_mhe")


def _canonical_method(method: str) -> str:
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
        self.method = _canonical_method(method)
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
            raise ValueError("method='ogd' needs an orthogonal starting point: r_init must be 'identity' or 'orthogonal'")
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
    out = {}
    for name, m in opt_layers(model).items():
        R = get_opt(m).rotation(m.parametrizations["weight"].original)
        out[name] = float(orthogonality_error(R, norm=norm))
    return out


# ---------------------------------------------------------------------- conversion
def _as_patterns(value: str | Sequence[str] | None, arg: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Iterable) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{arg}: expected a module-name glob or a list of them, got {value!r}")
    return list(value)


def _select_layers(model: nn.Module, layers, exclude, exclude_output: bool) -> list[tuple[str, nn.Module]]:
    named = [(n, m) for n, m in model.named_modules()]
    supported = [(n, m) for n, m in named if _supported(m)]
    include = _as_patterns(layers, "layers")
    excl = _as_patterns(exclude, "exclude")
    all_names = [n for n, _ in named if n]
    for pattern in include + excl:
        if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in named):
            arg = "layers" if pattern in include else "exclude"
            raise ValueError(f"{arg}: pattern {pattern!r} matches no module of {type(model).__name__}; "
                             f"modules: {all_names[:20]}{' ...' if len(all_names) > 20 else ''}")
    if include:
        chosen = []
        for pattern in include:
            hits = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, pattern)]
            ok = [(n, m) for n, m in hits if _supported(m)]
            if not ok:
                n, m = hits[0]
                raise TypeError(
                    f"layers: {pattern!r} selects {n!r} of type {type(m).__name__}, which OPT cannot convert; "
                    "supported layers: nn.Linear, nn.Conv1d/2d/3d, torch_geometric.nn.Linear"
                )
            chosen += [h for h in ok if h not in chosen]
        chosen = [c for c in supported if c in chosen]  # keep model order
    else:
        chosen = list(supported)
        if exclude_output and chosen:
            out_name = getattr(model, "output_layer_name", None)
            out_name = out_name if out_name is not None else chosen[-1][0]
            chosen = [c for c in chosen if c[0] != out_name]
    chosen = [(n, m) for n, m in chosen if not any(fnmatch.fnmatchcase(n, p) for p in excl)]
    if not chosen:
        raise ValueError(f"no layer of {type(model).__name__} is selected for OPT (layers={layers!r}, "
                         f"exclude={exclude!r}, exclude_output={exclude_output})")
    return chosen


def _drop_computed_weight(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """torch-geometric ``Linear`` writes ``weight`` itself; for an OPT layer it is derived, not state."""
    if parametrize.is_parametrized(module, "weight"):
        state_dict.pop(prefix + "weight", None)


def apply_opt(
    model: nn.Module,
    method: str = "cayley",
    layers: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    *,
    exclude_output: bool = True,
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
    **method_kwargs: Any,
) -> nn.Module:
    """Convert ``model``'s layers to OPT in place (``weight = R·V``) and return ``model``.

    Args:
        model: any module; ``nn.Linear``, ``nn.Conv1d/2d/3d`` and torch-geometric ``Linear`` (e.g.
            ``GCNConv.lin``) layers can be converted.
        method: ``"cayley"``, ``"gram_schmidt"``, ``"householder"``, ``"lowdin"``, ``"matrix_exp"``,
            ``"ogd"``, ``"relaxed"``, ``"unconstrained"`` (aliases cp, gs, hr, ls, exp, or, upt).
        layers: module-name glob(s) to convert; ``None`` converts every supported layer.
        exclude: module-name glob(s) left standard.
        exclude_output: with ``layers=None``, leave the output layer standard (the thesis never
            reparameterizes the classifier): ``model.output_layer_name`` if set, else the last
            supported layer. Pass ``False`` for feature extractors without a classifier.
        r_init, blocks, shared_blocks, normalize_v, fix_v, dtype: see :class:`OPTParametrization`.
        sopt, sopt_fraction, sopt_dim: S-OPT with ``d' = sopt_dim`` or ``round(sopt_fraction·d)``
            rotated coordinates; ``sopt_full_layers`` (globs) keep full OPT (the spec's first conv).
        refine, refine_steps, refine_lr, refine_s: refine ``V`` before training (see :func:`refine_v`).
        seed: seeds the random ``P`` and S-OPT subsets (default: torch's global RNG).
        method_kwargs: passed to the orthogonalization map (e.g. ``full=False`` for householder).

    Raises:
        ValueError: unknown ``method``/``r_init``/``refine``, a pattern matching nothing, a lazy or
            already-parametrized layer, ``blocks`` not dividing ``d``.
        TypeError: a selected layer OPT cannot convert.
    """
    _canonical_method(method)
    if refine is not None and refine not in REFINE_OBJECTIVES:
        raise ValueError(f"refine={refine!r} is not supported; accepted values: {[None, *REFINE_OBJECTIVES]}")
    if not 0 < sopt_fraction <= 1:
        raise ValueError(f"sopt_fraction={sopt_fraction!r} is not supported; accepted values: a number in (0, 1]")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    chosen = _select_layers(model, layers, exclude, exclude_output)
    full_patterns = _as_patterns(sopt_full_layers, "sopt_full_layers")
    pyg = _pyg_linear()
    converted: list[nn.Module] = []
    for name, layer in chosen:
        label = name or type(layer).__name__
        w = layer.weight if not parametrize.is_parametrized(layer, "weight") else None
        if w is None:
            raise ValueError(f"layer {label!r} already has a parametrization on its weight (OPT applied twice?)")
        if isinstance(w, nn.parameter.UninitializedParameter):
            raise ValueError(f"layer {label!r} is lazy (uninitialized weight); run one forward pass before apply_opt")
        if not bool(w.detach().abs().sum() > 0):
            if layers is None:
                warnings.warn(f"apply_opt: skipping layer {label!r}, its weight is all zeros", stacklevel=2)
                continue
            raise ValueError(f"layer {label!r} has an all-zero weight: OPT would keep W = R·V = 0 forever; "
                             "exclude it")
        d = int(math.prod(w.shape[1:]))
        layer_sopt = sopt and not any(fnmatch.fnmatchcase(name, p) for p in full_patterns)
        dim = (sopt_dim if sopt_dim is not None else max(1, round(sopt_fraction * d))) if layer_sopt else None
        if dim is not None:
            dim = min(dim, d)
        try:
            param = OPTParametrization(
                w, method, r_init=r_init, blocks=blocks, shared_blocks=shared_blocks, sopt=layer_sopt,
                sopt_dim=dim, fix_v=fix_v, normalize_v=normalize_v, dtype=dtype, generator=generator,
                method_kwargs=method_kwargs,
            )
        except ValueError as err:
            raise ValueError(f"layer {label!r}: {err}") from None
        parametrize.register_parametrization(layer, "weight", param)
        type(layer).__reduce_ex__ = _reduce_opt_layer  # picklable (ddp_spawn sends the model to its workers)
        if pyg is not None and isinstance(layer, pyg) and not getattr(layer, "_opt_state_hook", False):
            layer.register_state_dict_post_hook(_drop_computed_weight)
            layer._opt_state_hook = True
        converted.append(layer)
    if not converted:
        raise ValueError(f"no layer of {type(model).__name__} could be converted to OPT")
    if refine is not None:
        for layer in converted:
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
        param.V.copy_(param.effective(P))
        P.copy_(param.identity_parameter())
        count += 1
    return count


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
        param.V.copy_(param.effective(P))
        P.copy_(param.identity_parameter())
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
    half space, which also separates near-collinear pairs), with
    :func:`lightning_hyper.functional.hyperspherical_energy`. The energy depends on directions only,
    so each neuron's norm is restored afterwards. Returns ``(energy before, energy after)``.
    """
    if objective not in REFINE_OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not supported; accepted values: {list(REFINE_OBJECTIVES)}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r} is not supported; accepted values: a non-negative integer")
    param = get_opt(layer)
    if param is None:
        raise TypeError(f"refine_v needs an OPT layer (see apply_opt), got {type(layer).__name__}")
    half = objective == "hs_mhe"
    V = param.V.detach()
    norms = V.norm(dim=0, keepdim=True)
    x = V.mT.to(dtype or V.dtype).clone().requires_grad_(True)
    opt = torch.optim.SGD([x], lr=lr)

    def energy() -> Tensor:
        return hyperspherical_energy(x, s=s, half_space=half, reduction="mean")

    with torch.enable_grad():
        with torch.no_grad():
            before = float(energy())
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            e = energy()
            e.backward()
            opt.step()
        with torch.no_grad():
            after = float(energy())
    with torch.no_grad():
        new = x.detach().mT.to(V.dtype)
        new = new / new.norm(dim=0, keepdim=True).clamp_min(1e-12) * norms
        param.V.copy_(new)
    return before, after


# ---------------------------------------------------------------------- OGD
class StiefelCayleySGD(torch.optim.Optimizer):
    """Orthogonality-preserving gradient descent for square rotations (thesis §7.3.5; Li et al., ICLR'20).

    Per parameter ``X`` (orthogonal, ``(d, d)`` or a batch of blocks) with gradient ``G``:
    ``M ← momentum·M − G``; ``Ŵ = M Xᵀ − ½ X (Xᵀ M Xᵀ)``, ``W = Ŵ − Ŵᵀ``; ``M ← W X``;
    ``X ← Cayley step`` with ``α = min(lr, 1/‖W‖_F)`` (see
    :func:`~lightning_hyper.functional.orthogonal.stiefel_cayley_step`). ``solve="exact"`` (default)
    keeps ``X`` orthogonal to rounding error; ``"fixed_point"`` is the thesis' 2-iteration scheme,
    whose drift ``reorth_every = k`` removes by projecting onto the polar factor every ``k`` steps.
    ``polish`` (default: on for ``"exact"``) follows each step with one Newton-Schulz step
    ``X ← X(3I − XᵀX)/2`` (two matmuls), which squares the orthogonality error, so float32 rounding
    does not accumulate over thousands of steps. No weight decay (the official code trains rotations
    on the data loss only).
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.9, solve: str = "exact", iters: int = 2,
                 reorth_every: int = 0, polish: bool | None = None) -> None:
        if not lr > 0:
            raise ValueError(f"lr={lr!r} is not supported; accepted values: a positive number")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum={momentum!r} is not supported; accepted values: a number in [0, 1)")
        if solve not in ("exact", "fixed_point"):
            raise ValueError(f"solve={solve!r} is not supported; accepted values: ['exact', 'fixed_point']")
        polish = solve == "exact" if polish is None else bool(polish)
        super().__init__(params, dict(lr=lr, momentum=momentum, solve=solve, iters=iters, reorth_every=reorth_every,
                                      polish=polish))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 2 or p.shape[-1] != p.shape[-2]:
                    raise ValueError(f"StiefelCayleySGD needs square (..., d, d) parameters, got {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["momentum_buffer"] = torch.zeros_like(p)
                M = state["momentum_buffer"].mul_(group["momentum"]).sub_(p.grad)
                Y, W = stiefel_cayley_step(p, M, group["lr"], solve=group["solve"], iters=group["iters"])
                state["momentum_buffer"] = W @ p
                if group["polish"]:
                    Y = 1.5 * Y - 0.5 * Y @ (Y.mT @ Y)
                p.copy_(Y)
                state["step"] += 1
                k = group["reorth_every"]
                if k and state["step"] % k == 0:
                    U, _, Vh = torch.linalg.svd(p)
                    p.copy_(U @ Vh)
        return loss


def attach_ogd(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter] | nn.Module, lr: float = 0.02,
               momentum: float = 0.9, **kwargs: Any) -> StiefelCayleySGD:
    """Step a :class:`StiefelCayleySGD` over ``params`` (or a model's OPT rotations) right after every
    ``optimizer.step()`` (a step post-hook), then clear their gradients.

    This lets OGD ride along with any training loop that steps one optimizer (e.g. Lightning's
    automatic optimization). The rotations must not be in ``optimizer`` itself. Returns the OGD
    optimizer (keep a reference; ``ogd.hook_handle.remove()`` detaches it).
    """
    if isinstance(params, nn.Module):
        params = rotation_parameters(params)
    params = list(params)
    if not params:
        raise ValueError("attach_ogd: no rotation parameters given (was apply_opt(method='ogd') applied?)")
    main = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if any(id(p) in main for p in params):
        raise ValueError("attach_ogd: the rotations are also in the main optimizer; build it from "
                         "split_opt_parameters(model)[1]")
    ogd = StiefelCayleySGD(params, lr=lr, momentum=momentum, **kwargs)

    def _post_step(opt, args, kw) -> None:
        ogd.step()
        ogd.zero_grad(set_to_none=True)

    ogd.hook_handle = optimizer.register_step_post_hook(_post_step)  # type: ignore[attr-defined]
    return ogd
