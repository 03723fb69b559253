r"""Hyperspherical energy of a set of neurons (thesis Ch. 5, Eq. 5.1, 5.5; spec ``mhe.md`` §2, §5).

For neurons :math:`w_1..w_N` with :math:`\hat w_i = w_i/\|w_i\|` and Gram matrix
:math:`G = \hat W \hat W^\top` (:math:`G_{ij} = \cos\theta_{ij}`):

.. math::
    E_{s} = \sum_{i \ne j} f_s(\mathrm{dist}(G_{ij})),\qquad
    f_s(z) = z^{-s}\ (s>0),\quad f_0(z) = \log(1/z)

with ``dist`` the chord :math:`\sqrt{2-2G_{ij}}` (``metric="euclidean"``) or the geodesic
:math:`\arccos G_{ij}` (``metric="angular"``, radians, or :math:`\theta/\pi` with
``angle_unit="pi"`` as the authors' code). Half-space MHE (§2.6) adds every neuron's
negation; its energy over the 2N points is computed from the same N×N Gram matrix:

.. math::
    E_{half} = 2\sum_{i\ne j}[f(\mathrm{dist}(G_{ij})) + f(\mathrm{dist}(-G_{ij}))] + 2N f(d_{max}).

``reduction="mean"`` divides by the number of ordered pairs, N(N-1) (2N(2N-1) half-space).

Implementation (``dE/dx`` is formed in the forward pass; the custom backward only scales it):

* wide layers (N <= d: every convolution of a ResNet) take the Gram matrix of the raw rows (split recursively into
  AAᵀ, BBᵀ, ABᵀ from 128 rows), rescale it to cosines on N×N, apply the kernel in place, and get the gradient from
  one GEMM ``M x`` with ``M = 2 D K D - 2 diag(r / n^2)`` (K the kernel-derivative matrix, D = diag(1/n),
  :math:`r_i = \sum_j K_{ij} G_{ij}`): the normalization Jacobian lives on M's diagonal, so no N×d pass is made
  but the GEMMs' own;
* tall layers (N > d) normalize the rows once and take the Gram matrix in square tiles on and above the diagonal
  (cache-sized on CPU), each tile's kernel in place and its rows of :math:`2K\hat W` added by GEMM at once; then
  the normalization Jacobian on N×d.

Self pairs are replaced by a safe value *before* any log/pow/acos and zeroed after, so no 0·inf appears. Peak
memory is O(N·d + tile²) (O(N·d + N²) for wide layers whose N×N fits the block budget); nothing of size N×N×d is
ever built. Always runs with autocast off, in float32 (float64 if the input is float64).
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "METRICS",
    "ANGLE_UNITS",
    "REDUCTIONS",
    "ZERO_NORM_POLICIES",
    "hyperspherical_energy",
    "output_energy_from_labels",
    "pairwise_angles",
    "pair_kernel",
    "normalize_neurons",
    "PairKernel",
    "block_rows",
    "tile_rows",
    "compute_dtype",
    "validate_energy_args",
]

METRICS = ("euclidean", "angular")
ANGLE_UNITS = ("radian", "pi")
REDUCTIONS = ("mean", "sum")
ZERO_NORM_POLICIES = ("error", "exclude")

#: default number of Gram entries held at once (float32: 128 MiB per temporary)
DEFAULT_BLOCK_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class PairKernel:
    """Parameters of the pair kernel f(dist(c)) as a function of the cosine c."""

    s: float
    metric: str
    eps: float
    angle_unit: str
    half_space: bool

    def value_and_slope(self, c: Tensor, need_slope: bool, inplace: bool = False) -> tuple[Tensor, Tensor | None]:
        """Per-entry term and its derivative d term / d c (c must hold no masked entries).

        ``inplace=True`` lets the euclidean path overwrite ``c`` (a fresh Gram block) to save passes.
        """
        if self.metric == "euclidean":
            r2 = c if inplace else c.clone()
            r2.mul_(-2.0).add_(2.0 + self.eps).clamp_min_(self.eps)  # squared chord + eps
            if self.half_space:
                r2m = torch.rsub(r2, 4.0 + 2.0 * self.eps).clamp_min_(self.eps)  # chord of (w_i, -w_j)
                f1, k1 = _riesz(r2, self.s, need_slope)
                f2, k2 = _riesz(r2m, self.s, need_slope)
                f = f1.add_(f2).mul_(2.0)
                return f, (k1.sub_(k2).mul_(2.0) if need_slope else None)
            return _riesz(r2, self.s, need_slope)
        if self.half_space:
            f1, k1 = _angular(c, self, need_slope)
            f2, k2 = _angular(-c, self, need_slope)
            f = f1.add_(f2).mul_(2.0)
            return f, (k1.sub_(k2).mul_(2.0) if need_slope else None)
        return _angular(c, self, need_slope)

    def sum_and_slope_(self, c: Tensor, diagonal: int | None, need_slope: bool) -> tuple[Tensor, Tensor | None]:
        """Sum over the off-diagonal entries of the pair term, and the slope matrix, overwriting ``c``.

        ``c``: (B, R, M) cosines of rows ``a:a+R`` against all M columns; its entries ``(i, i + diagonal)`` are
        the self pairs (left out; ``None``: no self pair). Returns ``((B,) float64 sums, slope or None)``, the
        slope zero on the self pairs.
        """
        total, k, factor = self.sum_and_scaled_slope_(c, diagonal, need_slope)
        return total, (k.mul_(factor) if k is not None and factor != 1.0 else k)

    def sum_and_scaled_slope_(self, c: Tensor, diagonal: int | None,
                              need_slope: bool) -> tuple[Tensor, Tensor | None, float]:
        """As :meth:`sum_and_slope_`, the slope returned as ``(k, factor)`` with d term / d c = ``factor * k``, so
        that callers fold the constant into their own scaling (one pass less over the block).

        The default energies (euclidean, s > 0) run in place in few passes (memory-bound on CPU): full space in
        the Gram buffer itself; half space with s = 2 from the closed form
        ``2[1/(2-2c+eps) + 1/(2+2c+eps)] = 2A/((2-2c+eps)(2+2c+eps))``, ``A = 4 + 2 eps``.
        """
        if self.metric == "euclidean" and self.s == 2 and self.half_space:
            a_, h = 4.0 + 2.0 * self.eps, 1.0 + 0.5 * self.eps
            # den = (h - c)(h + c) = (2-2c+eps)(2+2c+eps)/4, as a product: h^2 - c^2 would cancel catastrophically
            # near |c| = 1; the clamp is the chord clamp of both terms (r2, r2m >= eps) for |c| <= 1 + rounding
            den = torch.add(c, h).mul_(torch.rsub(c, h))
            inv = den.clamp_min_(0.25 * self.eps * (4.0 + self.eps)).reciprocal_()
            _zero_self_pairs(inv, diagonal)
            total = _sum64(inv).mul_(0.5 * a_)  # 2A / (4 den)
            if not need_slope:
                return total, None, 1.0
            return total, inv.square_().mul_(c), a_  # d/dc 2A/(4 den) = A c / den^2
        if self.metric == "euclidean" and self.s > 0:
            r2 = c.mul_(-2.0).add_(2.0 + self.eps).clamp_min_(self.eps)  # squared chord + eps
            r2m = torch.rsub(r2, 4.0 + 2.0 * self.eps).clamp_min_(self.eps) if self.half_space else None
            f = _riesz_(r2, self.s)
            fm = _riesz_(r2m, self.s) if r2m is not None else None
            for t in (f, fm):
                if t is not None:
                    _zero_self_pairs(t, diagonal)
            total = _sum64(f)
            if fm is not None:  # the four ordered pairs among ±w_i, ±w_j, counted once per (i, j)
                total = 2.0 * (total + _sum64(fm))
            if not need_slope:
                return total, None, 1.0
            k, factor = _riesz_slope_(f, self.s)  # in place, self pairs stay 0
            if fm is not None:  # r2m = 2 + 2c + eps: the opposite slope
                return total, k.sub_(_riesz_slope_(fm, self.s)[0]), 2.0 * factor
            return total, k, factor
        f, k = self.value_and_slope(c, need_slope, inplace=True)
        _zero_self_pairs(f, diagonal)
        if k is not None:
            _zero_self_pairs(k, diagonal)
        return _sum64(f), k, 1.0

    def antipodal_value(self) -> float:
        """f(d_max): the constant term of the pair (w, -w) in half-space energy."""
        if self.metric == "euclidean":
            r2 = 4.0 + self.eps
            return -0.5 * math.log(r2) if self.s == 0 else r2 ** (-self.s / 2)
        theta = 1.0 if self.angle_unit == "pi" else math.pi
        return -math.log(theta) if self.s == 0 else theta ** (-self.s)


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """``torch.autocast(device_type, enabled=False)`` where autocast is on, else a null context (entering an
    autocast context costs tens of microseconds, which small layers notice)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _sum64(t: Tensor) -> Tensor:
    """Sum of a (B, R, M) block per set, float64: rows summed in their own dtype (torch's cascade sum), the R
    row sums in float64 (a float64 reduction over the whole block would first copy it to float64: 10-20x)."""
    if t.shape[-1] * t.shape[-2] <= 1 << 16:  # small: one reduction (the float64 copy costs less than a call)
        return t.sum(dim=(-2, -1), dtype=torch.float64)
    return t.sum(dim=-1).sum(dim=-1, dtype=torch.float64)


def _riesz_(r2: Tensor, s: float) -> Tensor:
    """``r2^(-s/2)`` in place (s > 0), overflow-safe."""
    if s == 2:
        return r2.reciprocal_()
    if s == 1:
        return r2.rsqrt_()
    return r2.log_().mul_(-s / 2).exp_()


def _riesz_slope_(f: Tensor, s: float) -> tuple[Tensor, float]:
    """d f / d c for ``f = r2^(-s/2)``, ``r2 = 2 - 2c + eps``, from ``f`` in place, as ``(k, factor)`` with
    d f / d c = ``factor * k``: ``s r2^(-s/2-1) = s f^((s+2)/s)``."""
    if s == 2:
        return f.square_(), 2.0
    if s == 1:
        return f.pow_(3), 1.0
    return f.pow_((s + 2.0) / s), s


def _riesz(r2: Tensor, s: float, need_slope: bool) -> tuple[Tensor, Tensor | None]:
    """f(r2) (= r^-s, or -½ log r2 for s=0) and df/dc = -2 df/dr2 for r2 = 2 - 2c + eps."""
    if s == 0:
        f = r2.log().mul_(-0.5)
        return f, (r2.reciprocal() if need_slope else None)  # d(-½ log r2)/dc = 1/r2
    if s == 2:
        f = r2.reciprocal()
        return f, (f.square().mul_(2.0) if need_slope else None)
    if s == 1:
        f = r2.rsqrt()
        return f, (f.div(r2) if need_slope else None)
    f = r2.log().mul_(-s / 2).exp_()  # overflow-safe r2^(-s/2)
    return f, (f.div(r2).mul_(s) if need_slope else None)  # s * r2^(-s/2-1)


def _angular(c: Tensor, k: PairKernel, need_slope: bool) -> tuple[Tensor, Tensor | None]:
    """f(theta(c)) and df/dc for the geodesic distance (radians or units of pi)."""
    s = k.s
    cc = c.clamp(-1.0 + k.eps, 1.0 - k.eps)
    theta = torch.acos(cc)
    scale = math.pi if k.angle_unit == "pi" else 1.0
    if scale != 1.0:
        theta.div_(scale)
    if s == 0:
        f = theta.log().neg_()
        df_dtheta = theta.reciprocal().neg_() if need_slope else None
    else:
        f = theta.log().mul_(-s).exp_()
        df_dtheta = f.div(theta).mul_(-s) if need_slope else None
    if not need_slope:
        return f, None
    # dtheta/dc = -1 / (scale * sqrt(1 - c^2))
    dtheta_dc = cc.square_().neg_().add_(1.0).rsqrt_().mul_(-1.0 / scale)
    return f, df_dtheta.mul_(dtheta_dc)


def pair_kernel(cos: Tensor, s: float = 2.0, metric: str = "euclidean", half_space: bool = False,
                angle_unit: str = "radian", eps: float = 1e-6) -> Tensor:
    """Elementwise energy term of a pair with cosine ``cos`` (differentiable with autograd).

    The term is ``f_s(dist(cos))``, or ``2[f(dist(cos)) + f(dist(-cos))]`` for half-space
    (the four ordered pairs among ``±w_i, ±w_j`` counted once per ordered (i, j)).
    """
    validate_energy_args(s, metric, "mean", angle_unit, eps)
    spec = PairKernel(float(s), metric, float(eps), angle_unit, bool(half_space))
    return _PairKernelFn.apply(cos, spec)


class _PairKernelFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cos: Tensor, spec: PairKernel) -> Tensor:  # type: ignore[override]
        f, slope = spec.value_and_slope(cos, need_slope=cos.requires_grad)
        ctx.save_for_backward(slope if slope is not None else cos.new_zeros(()))
        return f

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (slope,) = ctx.saved_tensors
        return grad * slope, None


def validate_energy_args(s: float, metric: str, reduction: str, angle_unit: str, eps: float) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is not supported; accepted values: {list(METRICS)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not supported; accepted values: {list(REDUCTIONS)}")
    if angle_unit not in ANGLE_UNITS:
        raise ValueError(f"angle_unit={angle_unit!r} is not supported; accepted values: {list(ANGLE_UNITS)}")
    if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s) or s < 0:
        raise ValueError(f"s={s!r} is not supported; accepted values: a finite number s >= 0 "
                         "(0 = logarithmic energy, s > 0 = Riesz s-energy)")
    if not (isinstance(eps, (int, float)) and 0 < eps < 1):
        raise ValueError(f"eps={eps!r} is not supported; accepted values: 0 < eps < 1")


def warn_no_pairs(n: int, owner: str) -> None:
    """Warn that ``n`` < 2 neurons have no pair, so their energy is the documented value 0."""
    import warnings

    warnings.warn(f"{owner}: {n} neuron(s) form no pair; the energy is defined as 0 (with a zero gradient). "
                  "Select layers with at least 2 neurons", UserWarning, stacklevel=3)


try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    _DTensor = ()  # type: ignore[assignment,misc]


def _whole(x):
    """A ``DTensor`` (FSDP2 / tensor-parallel weight) all-gathered (``functional/distributed.py``), else ``x``."""
    if isinstance(x, _DTensor):
        from lightning_hyper.functional.distributed import gather_rows

        return gather_rows(x)
    return x


def compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def normalize_neurons(neurons: Tensor, min_norm: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Return ``(unit rows, norms)`` computed overflow-safely (rows pre-scaled by their max |entry|).

    Rows with norm below ``min_norm`` are left un-normalized; callers mask or reject them.
    """
    amax = neurons.detach().abs().amax(dim=-1, keepdim=True)
    scaled = neurons / amax.clamp_min(torch.finfo(neurons.dtype).tiny)
    snorm = torch.linalg.vector_norm(scaled, dim=-1, keepdim=True)
    norms = (snorm * amax).squeeze(-1)
    unit = scaled / snorm.clamp_min(torch.finfo(neurons.dtype).tiny)
    return unit, norms


def _rows(neurons: Tensor, zero_norm: str, name: str, batched: bool = False) -> Tensor:
    """Validate the type, shape and ``zero_norm`` of ``neurons``; return them as float32/64 rows (no pass over
    them)."""
    if not isinstance(neurons, Tensor):
        raise TypeError(f"{name}: expected a Tensor of shape (N, d), got {type(neurons).__name__}")
    if neurons.dim() not in (2, 3) or (neurons.dim() == 3 and not batched):
        raise ValueError(f"{name}: expected shape (N, d) with rows = neurons"
                         f"{' or a batch (B, N, d)' if batched else ''}, got {tuple(neurons.shape)}; "
                         "use lightning_hyper.functional.as_neurons(weight) for conv weights")
    if zero_norm not in ZERO_NORM_POLICIES:
        raise ValueError(f"zero_norm={zero_norm!r} is not supported; accepted values: {list(ZERO_NORM_POLICIES)}")
    x = neurons.to(compute_dtype(neurons))
    if x.shape[-2] and x.shape[-1] == 0:
        raise ValueError(f"{name}: neurons have dimension d=0 (shape {tuple(x.shape)})")
    return x


def _prepare(neurons: Tensor, min_norm: float, zero_norm: str, name: str,
             batched: bool = False) -> tuple[Tensor, Tensor]:
    """Validate ``neurons``; return ``(x, norms)``: float32/64 rows and their (detached) norms.

    The common case costs one norm pass and one host sync; the slow path diagnoses NaN/Inf,
    rescales rows whose norm overflows, and rejects or drops rows of norm < ``min_norm``.
    """
    x = _rows(neurons, zero_norm, name, batched)
    norms = torch.linalg.vector_norm(x.detach(), dim=-1)
    if not x.numel():
        return x, norms
    low, high = torch.aminmax(norms)  # one pass; NaN propagates into both and takes the slow path
    if low.item() >= min_norm and high.item() < math.inf:
        return x, norms
    if not bool(torch.isfinite(x.detach()).all()):
        bad = (~torch.isfinite(x.detach())).any(dim=-1).nonzero()[:5].tolist()
        raise ValueError(f"{name}: contains NaN or Inf entries (rows {bad}...); the energy of such "
                         "neurons is undefined")
    if not bool(torch.isfinite(norms).all()):  # finite entries whose squares overflow: rescale rows
        # (clamped: an all-zero row next to a huge one must stay zero, not become 0/0 = NaN)
        amax = x.detach().abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        x = x / amax
        norms = torch.linalg.vector_norm(x.detach(), dim=-1)
        small = norms * amax.squeeze(-1) < min_norm  # judged on the rows' true norms
    else:
        small = norms < min_norm
    if bool(small.any()):
        if x.dim() == 3 and zero_norm == "exclude":
            raise _RaggedExclusion  # each set keeps other rows: hyperspherical_energy goes set by set
        if zero_norm == "error":
            rows = small.nonzero()[:5].tolist()
            raise ValueError(
                f"{name}: {int(small.sum())} neuron(s) have norm < min_norm={min_norm:g} (rows {rows}...); "
                "their direction is undefined. Pass zero_norm='exclude' to leave them out of the energy "
                "(they then get zero gradient)"
            )
        x, norms = x[~small], norms[~small]
    return x, norms


class _RaggedExclusion(Exception):
    """A batch (B, N, d) with zero-norm rows under ``zero_norm="exclude"``: computed set by set."""


def block_rows(n: int, chunk_size: int | None, batch: int = 1) -> int:
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size={chunk_size!r} is not supported; accepted values: None or an int >= 1")
        return int(chunk_size)
    return max(1, DEFAULT_BLOCK_ELEMENTS // max(n * batch, 1))


def _zero_self_pairs(t: Tensor, diagonal: int | None) -> None:
    """Zero the self pairs ``(i, i + diagonal)`` of a (B, R, M) (or (R, M)) block in place (O(R), no mask)."""
    if diagonal is not None:
        t.diagonal(offset=diagonal, dim1=-2, dim2=-1).zero_()


#: raw-Gram path ("wide" layers, N <= d, e.g. every convolution of a ResNet): the cosines are the Gram matrix of the
#: raw rows rescaled on N×N, and the gradient is one GEMM ``M x`` of the raw rows (the normalization Jacobian folded
#: into M's diagonal), so no N×d pass but the GEMMs' own reads. From this many rows its Gram is split recursively
#: into AAᵀ, BBᵀ, ABᵀ (the fourth block a copy of the third) down to blocks of 64-127 rows: 0.72x the single GEMM's
#: time at (256, 2304), 0.67x at (512, 4608), 0.55x at (2048, 2048) (1 thread; none at 128 rows)
RAW_SPLIT_MIN_ROWS = 128


def _raw_gram(x: Tensor) -> Tensor:
    """Gram matrix ``x xᵀ`` of (..., N, d) rows, from its upper blocks (see RAW_SPLIT_MIN_ROWS)."""
    n = x.shape[-2]
    if n < RAW_SPLIT_MIN_ROWS:
        return x @ x.transpose(-1, -2)
    g = x.new_empty(*x.shape[:-1], n)
    _fill_gram(x, g)
    return g


def _fill_gram(x: Tensor, g: Tensor) -> None:
    n = x.shape[-2]
    if n < RAW_SPLIT_MIN_ROWS:
        g.copy_(x @ x.transpose(-1, -2))
        return
    h = n // 2
    a, b = x[..., :h, :], x[..., h:, :]
    _fill_gram(a, g[..., :h, :h])
    _fill_gram(b, g[..., h:, h:])
    ab = a @ b.transpose(-1, -2)
    g[..., :h, h:] = ab
    g[..., h:, :h] = ab.transpose(-1, -2)


class _NeedsChecks(Exception):
    """The raw-Gram path found a row of norm < min_norm, or a NaN/Inf, on the Gram diagonal: :func:`_prepare`
    diagnoses it (or rescales / drops the rows)."""


def _raw_energy(x: Tensor, inv: Tensor | None, spec: PairKernel, need: bool, scale: float,
                min_norm: float = 0.0) -> tuple[Tensor, Tensor | None]:
    r"""Energy sums (B,) (a scalar for (N, d)) and ``scale * dE/dx`` of (..., N, d) rows ``x`` with inverse norms
    ``inv`` (..., N), the whole N×N at once. ``inv=None`` takes the norms from the Gram diagonal (no pass over x),
    raising ``_NeedsChecks`` if one is below ``min_norm`` or not finite.

    With :math:`c_{ij} = (xx^T)_{ij} / (n_i n_j)` and :math:`K_{ij} = f'(c_{ij})` (zero on the diagonal),
    :math:`\partial E/\partial x_i = \tfrac{2}{n_i}\sum_j K_{ij} x_j / n_j - \tfrac{2 r_i}{n_i^2} x_i`,
    :math:`r_i = \sum_j K_{ij} c_{ij}`: one GEMM ``M x`` with ``M = 2 D K D - 2 diag(r / n^2)``, D = diag(1/n).
    """
    gram = _raw_gram(x)
    if inv is None:
        sq = gram.diagonal(dim1=-2, dim2=-1)
        low, high = torch.aminmax(sq)  # NaN propagates into both
        if not (low.item() >= min_norm * min_norm and high.item() < math.inf):
            raise _NeedsChecks
        inv = sq.rsqrt()
    outer = inv.unsqueeze(-1) * inv.unsqueeze(-2)
    c = gram * outer
    _zero_self_pairs(c, 0)  # a safe value before the kernel
    total, k, factor = spec.sum_and_scaled_slope_(c, 0, need)
    if k is None:
        return total, None
    m = k.mul_(outer.mul_(2.0 * scale * factor))  # 2 scale D K D, zero on the diagonal
    # r_i = sum_j K_ij c_ij = sum_j (D K D)_ij (x xᵀ)_ij: the radial part of each row's gradient, on the diagonal
    m.diagonal(dim1=-2, dim2=-1).sub_(torch.linalg.vecdot(m, gram).mul_(inv.square()))
    return total, m @ x


#: on CPU the tall-layer path takes the Gram matrix in square tiles of about this many entries (all sets of a batch
#: together; 1 MiB of float32, so that each tile's elementwise kernel runs in the core's L2 cache instead of memory):
#: (4096, 512) half-space forward+backward 0.74x the time of half blocks of the whole Gram, CoMHE's (5, 4096, 30)
#: 0.32x (1 thread). Accelerators take tiles as large as the block budget allows.
CPU_TILE_ELEMENTS = 1 << 18


def tile_rows(n: int, chunk_size: int | None, batch: int, device: torch.device) -> int:
    """Rows (= columns) of one Gram tile: ``chunk_size`` if given, else a cache-sized tile on CPU (see
    CPU_TILE_ELEMENTS) and the block budget elsewhere."""
    if chunk_size is not None:
        return block_rows(n, chunk_size, batch)
    budget = CPU_TILE_ELEMENTS if device.type == "cpu" else DEFAULT_BLOCK_ELEMENTS
    return max(64, math.isqrt(budget // max(batch, 1)))


def _unit_energy(x: Tensor, inv: Tensor, spec: PairKernel, need: bool, scale: float,
                 tile: int) -> tuple[Tensor, Tensor | None]:
    """As :func:`_raw_energy` for tall layers (N > d) or Gram matrices over the block budget: the rows are
    normalized once (an N×d pass is cheaper than the N×N ones here), and the Gram matrix is taken in square tiles of
    ``tile`` rows on and above the diagonal (a tile above stands for both orders of its pairs: about half the Gram
    FLOPs and kernel passes). Each tile's kernel runs in place and its rows of ``K Û`` (both orders) are added by
    GEMM at once, so nothing N×N exists: peak memory O(B·tile² + B·N·d). Then the normalization Jacobian on N×d."""
    n = x.shape[1]
    unit = x * inv.unsqueeze(-1)
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    g_unit = torch.zeros_like(unit) if need else None
    for a0 in range(0, n, tile):
        ua = unit[:, a0:a0 + tile]
        for b0 in range(a0, n, tile):
            ub = unit[:, b0:b0 + tile]
            c = ua @ ub.transpose(1, 2)
            if b0 == a0:  # a diagonal tile: each pair in both orders, self pairs left out
                _zero_self_pairs(c, 0)  # a safe value before the kernel
                t, k, factor = spec.sum_and_scaled_slope_(c, 0, need)
                total += t
                if g_unit is not None:
                    g_unit[:, a0:a0 + tile].baddbmm_(k, ua)
            else:  # a tile above the diagonal stands for the one below
                t, k, factor = spec.sum_and_scaled_slope_(c, None, need)
                total += 2.0 * t
                if g_unit is not None:
                    g_unit[:, a0:a0 + tile].baddbmm_(k, ub)
                    g_unit[:, b0:b0 + tile].baddbmm_(k.transpose(1, 2), ua)
            del c, k
    if g_unit is None:
        return total, None
    # dE/dû = (K + Kᵀ) û = 2 K û; the Jacobian (I - ûûᵀ) g / ‖w‖ in place: the radial part, its removal, 2/‖w‖
    radial = torch.linalg.vecdot(g_unit, unit).unsqueeze(-1)
    return total, g_unit.addcmul_(radial, unit, value=-1.0).mul_((inv * (2.0 * scale * factor)).unsqueeze(-1))


class _GramEnergyFn(torch.autograd.Function):
    """``scale * (sum over ordered pairs i != j of the pair term) + offset`` of (N, d) or (B, N, d) rows (see the
    module doc); ``dE/dx`` is formed in the forward (by :func:`_raw_energy` or :func:`_unit_energy`), so nothing
    N×N is kept and the backward is one multiplication by the incoming gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, norms: Tensor | None, spec: PairKernel,  # type: ignore[override]
                chunk_size: int | None, scale: float, offset: float, min_norm: float) -> Tensor:
        need = x.requires_grad
        if norms is None or _takes_raw_path(x, chunk_size):  # wide: (..., N, d) as it is
            total, grad = _raw_energy(x, None if norms is None else norms.reciprocal(), spec, need, scale, min_norm)
        else:  # tall: as a batch (B, N, d)
            xb, inv = (x, norms.reciprocal()) if x.dim() == 3 else (x.unsqueeze(0), norms.reciprocal().unsqueeze(0))
            total, grad = _unit_energy(xb, inv, spec, need, scale, tile_rows(xb.shape[1], chunk_size, xb.shape[0],
                                                                                x.device))
            if x.dim() == 2:
                total, grad = total[0], (grad[0] if grad is not None else None)
        if need:
            ctx.save_for_backward(grad)
        total = total.mul_(scale)
        if offset:
            total = total.add_(offset)
        return total.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        g = grad * (grad_out.view(-1, 1, 1) if grad.dim() == 3 else grad_out)
        return g, None, None, None, None, None, None


def _takes_raw_path(x: Tensor, chunk_size: int | None) -> bool:
    """Wide layers (N <= d) whose N×N Gram (per set) fits the block budget, unless a tile size is imposed."""
    n, d = x.shape[-2], x.shape[-1]
    return chunk_size is None and 2 <= n <= d and n * n * (x.shape[0] if x.dim() == 3 else 1) <= DEFAULT_BLOCK_ELEMENTS


def hyperspherical_energy(
    neurons: Tensor,
    s: float = 2.0,
    metric: str = "euclidean",
    half_space: bool = False,
    reduction: str = "mean",
    angle_unit: str = "radian",
    eps: float = 1e-6,
    chunk_size: int | None = None,
    min_norm: float = 1e-6,
    zero_norm: str = "error",
) -> Tensor:
    r"""Hyperspherical energy of the rows of ``neurons`` (thesis Eq. 5.1 / 5.5, §5.3.4).

    Args:
        neurons: ``(N, d)``, one neuron per row (see :func:`as_neurons`); need not be normalized.
            A batch ``(B, N, d)`` of neuron sets (e.g. CoMHE's C projections) gives ``(B,)`` energies
            from one batched computation.
        s: power; ``0`` = logarithmic energy :math:`\sum\log(1/\mathrm{dist})`, ``s>0`` = Riesz
            :math:`\sum \mathrm{dist}^{-s}` (s=1: Thomson problem).
        metric: ``"euclidean"`` (chord :math:`\|\hat w_i-\hat w_j\|`) or ``"angular"`` (geodesic arccos).
        half_space: add every neuron's negation (HS-MHE, §5.3.4); from the N×N Gram matrix.
        reduction: ``"sum"`` over ordered pairs i≠j, or ``"mean"`` (divided by their number).
        angle_unit: ``"radian"`` (thesis) or ``"pi"`` (θ/π, the authors' code).
        eps: added to the squared chord (euclidean); cosine clamp margin (angular).
        chunk_size: rows of one square Gram tile (default: a cache-sized tile on CPU, the wide-layer path
            or a 2^25-entry tile elsewhere); peak memory is O(chunk_size² + N · d).
        min_norm: rows with a smaller norm have no direction.
        zero_norm: ``"error"`` (default) raises on such rows; ``"exclude"`` leaves them out (in a batch
            ``(B, N, d)``, each set loses its own such rows; a set left with fewer than 2 rows has energy 0).

    Returns:
        scalar energy (``(B,)`` for batched input), float32 (float64 for float64 input), computed with
        autocast disabled. N < 2 (no pair of neurons) gives 0 with a zero gradient, and a ``UserWarning``;
        half-space with N = 1 is the pair (w, -w) alone, the constant f(d_max).
    """
    return _energy(neurons, s, metric, half_space, reduction, angle_unit, eps, chunk_size, min_norm, zero_norm)


def _energy(neurons: Tensor, s: float, metric: str, half_space: bool, reduction: str, angle_unit: str, eps: float,
            chunk_size: int | None, min_norm: float, zero_norm: str, quiet: bool = False) -> Tensor:
    validate_energy_args(s, metric, reduction, angle_unit, eps)
    # the common case in few Python steps (small layers notice tens of microseconds): a plain float (N, d) tensor of
    # a wide layer with autocast off; its rows are checked on the Gram diagonal inside the one autograd node, and
    # anything else takes the general way below, and so does a failing check (to its diagnosis, not a second try)
    tried_raw = False
    if (type(neurons) in _PLAIN_TENSORS and chunk_size is None and neurons.dim() == 2
            and neurons.dtype in _FLOAT_DTYPES and zero_norm in ZERO_NORM_POLICIES):
        n, d = neurons.shape
        if 2 <= n <= d and n * n <= DEFAULT_BLOCK_ELEMENTS and not torch.is_autocast_enabled(neurons.device.type):
            spec = _kernel(float(s), metric, float(eps), angle_unit, bool(half_space))
            x = neurons.detach() if neurons.requires_grad and not torch.is_grad_enabled() else neurons
            tried_raw = True
            try:
                return _GramEnergyFn.apply(x, None, spec, None, *_reduction(n, spec, reduction), min_norm)
            except _NeedsChecks:
                pass
    neurons = _whole(neurons)
    if isinstance(neurons, Tensor) and neurons.requires_grad and not torch.is_grad_enabled():
        neurons = neurons.detach()  # under no_grad: no gradient GEMM (a custom forward cannot see the grad mode)
    with autocast_off(neurons.device.type if isinstance(neurons, Tensor) else "cpu"):
        spec = _kernel(float(s), metric, float(eps), angle_unit, bool(half_space))
        x = _rows(neurons, zero_norm, "neurons", batched=True)
        if not tried_raw and _takes_raw_path(x, chunk_size):  # the rows are checked on the Gram diagonal, no norm pass
            try:
                return _GramEnergyFn.apply(x, None, spec, None, *_reduction(x.shape[-2], spec, reduction), min_norm)
            except _NeedsChecks:
                pass
        try:
            x, norms = _prepare(neurons, min_norm, zero_norm, "neurons", batched=True)
        except _RaggedExclusion:  # rare: zero-norm rows in a batch of sets, each set on its own
            return torch.stack([_energy(w, s, metric, half_space, reduction, angle_unit, eps, chunk_size, min_norm,
                                        zero_norm, quiet=True) for w in neurons])
        n = x.shape[-2]
        if n < 2 and not (half_space and n == 1):  # no pairs: energy 0, zero gradient (never NaN)
            if not quiet:
                warn_no_pairs(n, "hyperspherical_energy")
            return x.sum(dim=(-2, -1)) * 0.0
        scale, offset = _reduction(n, spec, reduction)
        if n == 1:  # half-space: only the pair (w, -w), a constant
            return x.sum(dim=(-2, -1)) * 0.0 + offset
        if chunk_size is not None:
            block_rows(n, chunk_size)  # validates it
        return _GramEnergyFn.apply(x, norms, spec, chunk_size, scale, offset, min_norm)


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)
_FLOAT_DTYPES = (torch.float32, torch.float64)


@functools.lru_cache(maxsize=256)
def _kernel(s: float, metric: str, eps: float, angle_unit: str, half_space: bool) -> PairKernel:
    """The (immutable) :class:`PairKernel` of validated arguments, made once."""
    return PairKernel(s, metric, eps, angle_unit, half_space)


def _reduction(n: int, spec: PairKernel, reduction: str) -> tuple[float, float]:
    """``(scale, offset)`` of the energy of n neurons: the sum over ordered pairs i != j times ``scale`` (1 / their
    number for ``"mean"``) plus ``offset`` (half-space: the 2N antipodal pairs (w, -w), scaled)."""
    pairs = 2 * n * (2 * n - 1) if spec.half_space else n * (n - 1)
    scale = 1.0 / pairs if reduction == "mean" else 1.0
    return scale, (2 * n * spec.antipodal_value() * scale if spec.half_space else 0.0)


def output_energy_from_labels(
    weight: Tensor,
    labels: Tensor,
    s: float = 2.0,
    metric: str = "euclidean",
    angle_unit: str = "radian",
    eps: float = 1e-6,
    unique: bool = False,
    min_norm: float = 1e-6,
    zero_norm: str = "error",
) -> Tensor:
    r"""Data-dependent output-layer energy (spec ``mhe.md`` §3.1, SphereFace+ Eq. 5.8).

    .. math:: E = \frac{1}{m(N-1)} \sum_{i=1}^{m} \sum_{j\ne y_i} f_s(\mathrm{dist}(\hat w_{y_i}, \hat w_j))

    Rows ``y_i`` of ``weight`` (``(num_classes, d)``) are taken with multiplicity (each present
    class once if ``unique``); the inner sum runs over *all* classes. Costs one (m × N) GEMM.
    ``zero_norm="exclude"`` leaves rows of norm < ``min_norm`` out (as labels and as classes: m and N
    count only the other rows); ``"error"`` (default) raises on them.
    """
    validate_energy_args(s, metric, "mean", angle_unit, eps)
    if zero_norm not in ZERO_NORM_POLICIES:
        raise ValueError(f"zero_norm={zero_norm!r} is not supported; accepted values: {list(ZERO_NORM_POLICIES)}")
    weight = _whole(weight)
    if zero_norm == "exclude" and isinstance(weight, Tensor) and weight.dim() == 2 and weight.shape[0]:
        norms = torch.linalg.vector_norm(weight.detach().to(compute_dtype(weight)), dim=-1)
        keep = norms >= min_norm
        if not bool(keep.all()):
            if isinstance(labels, Tensor) and labels.dim() == 1 and not labels.dtype.is_floating_point:
                labels = labels.to(weight.device)
                if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= weight.shape[0]):
                    raise ValueError(f"labels: class indices must lie in [0, {weight.shape[0] - 1}] (weight has "
                                     f"{weight.shape[0]} rows), got range [{int(labels.min())}, {int(labels.max())}]")
                new_index = torch.cumsum(keep.long(), 0) - 1
                labels = new_index[labels[keep[labels]]]
            weight = weight[keep]
    w, _ = _prepare(weight, min_norm, "error", "weight")
    n = w.shape[0]
    if isinstance(labels, Tensor):
        labels = labels.to(w.device)
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point:
        raise ValueError("labels: expected a 1-D integer tensor of class indices")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n):
        raise ValueError(f"labels: class indices must lie in [0, {n - 1}] (weight has {n} rows), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    if unique:
        labels = torch.unique(labels)
    m = labels.numel()
    if m == 0 or n < 2:
        return w.sum() * 0.0
    spec = PairKernel(float(s), metric, float(eps), angle_unit, False)
    with torch.autocast(device_type=w.device.type, enabled=False):
        # autograd path on (m, N) only: the cosines are rescaled, the (N, d) weight is never normalized
        inv = torch.linalg.vector_norm(w, dim=-1).reciprocal()
        c = ((w[labels] * inv[labels, None]) @ w.T) * inv  # (m, N)
        self_pair = (torch.arange(m, device=w.device), labels)  # m entries, no (m, N) mask
        c = c.index_put(self_pair, c.new_zeros(()))  # safe value before the kernel
        f = _PairKernelFn.apply(c, spec).index_put(self_pair, c.new_zeros(()))
        return f.sum() / (m * (n - 1))


def pairwise_angles(neurons: Tensor, degrees: bool = False) -> Tensor:
    """Angles between all unordered pairs i < j of rows, shape ``(N(N-1)/2,)`` (radians by default)."""
    x, _ = _prepare(_whole(neurons), 1e-6, "error", "neurons")
    with torch.autocast(device_type=x.device.type, enabled=False):
        unit = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        n = unit.shape[0]
        iu = torch.triu_indices(n, n, 1, device=unit.device)
        cos = (unit @ unit.T)[iu[0], iu[1]].clamp(-1.0, 1.0)
        ang = torch.acos(cos)
    return torch.rad2deg(ang) if degrees else ang


def minimum_energy(n: int, d: int, s: float = 2.0, metric: str = "euclidean", half_space: bool = False,
                   angle_unit: str = "radian", eps: float = 1e-6) -> float | None:
    r"""Smallest possible :func:`hyperspherical_energy` (``reduction="mean"``) of ``n`` neurons in ``d``
    dimensions, where it is known in closed form; ``None`` otherwise.

    Same conventions as :func:`hyperspherical_energy` (mean over ordered pairs, ``s = 0`` the
    logarithmic energy :math:`\log(1/\mathrm{dist})`, ``eps`` added to the squared chord, the
    cosine clamp of the angular metric), so the value is the one that function returns on the
    optimal configuration:

    * full space, ``metric="euclidean"``, ``n <= d + 1``: the regular simplex, every pairwise cosine
      :math:`-1/(n-1)`. Since :math:`\sum_{i\ne j}\|\hat w_i-\hat w_j\|^2 = 2n^2 - 2\|\sum_i \hat w_i\|^2
      \le 2n^2` and :math:`f(r^2)` is convex and decreasing for every ``s >= 0``, Jensen's inequality
      bounds the mean by :math:`f(2n/(n-1))`, which the simplex attains (it exists iff ``n <= d + 1``).
      ``metric="angular"``: only ``n = 2`` (antipodal); for ``n >= 3`` the simplex is not always
      optimal (e.g. ``s = 0``, n = 4, d = 3: two orthogonal antipodal pairs have lower energy) and
      ``None`` is returned.
    * half space (``n`` neurons and their negations), ``n <= d``: an orthonormal frame. Each pair
      contributes :math:`g(t) = f(\mathrm{dist}(t)) + f(\mathrm{dist}(-t))` of its cosine t, which is
      even in t and minimal at t = 0 (euclidean: :math:`f(2-2t)+f(2+2t)` with f convex; angular:
      :math:`h(\theta)+h(\pi-\theta)` with h convex), and the antipodal pairs are constant.
    * ``n < 2``: 0 (no pairs, as :func:`hyperspherical_energy`), except half space with ``n = 1``: the
      pair (w, -w) alone, the constant f(d_max).

    Args:
        n: number of neurons (rows). d: their dimension.
        s, metric, half_space, angle_unit, eps: as in :func:`hyperspherical_energy`.

    Returns:
        the minimum as a float, or ``None`` where no closed form is known (e.g. ``n > d + 1``).
    """
    validate_energy_args(s, metric, "mean", angle_unit, eps)
    for name, value in (("n", n), ("d", d)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "n" else 1):
            raise ValueError(f"{name}={value!r} is not supported; accepted values: an int >= "
                             f"{0 if name == 'n' else 1}")
    if n == 0 or (n == 1 and not half_space):
        return 0.0
    s = float(s)

    def riesz(r2: float) -> float:  # f of a squared chord (eps already added)
        return -0.5 * math.log(r2) if s == 0 else r2 ** (-s / 2)

    def geodesic(cos: float) -> float:  # f of the clamped angle, in the chosen unit
        theta = math.acos(min(max(cos, -1.0 + eps), 1.0 - eps)) / (math.pi if angle_unit == "pi" else 1.0)
        return -math.log(theta) if s == 0 else theta ** (-s)

    if half_space:
        if n > d:
            return None
        antipodal = PairKernel(s, metric, float(eps), angle_unit, True).antipodal_value()
        pair = 2.0 * (riesz(2.0 + eps) if metric == "euclidean" else geodesic(0.0))  # f(dist(0)) + f(dist(-0))
        return (2.0 * n * (n - 1) * pair + 2 * n * antipodal) / (2 * n * (2 * n - 1))
    if n > d + 1:
        return None
    if metric == "euclidean":
        return riesz(2.0 * n / (n - 1) + eps)
    return geodesic(-1.0) if n == 2 else None


__all__ += ["minimum_energy"]

