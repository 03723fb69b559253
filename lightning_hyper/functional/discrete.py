r"""DH2L discrete + continuous angular metrics (DH2L §3.2-3.3, spec ``dh2l.md`` §4-5).

For two vectors :math:`w_i, w_j \in \mathbb R^d`:

* discrete similarity (eq. 8): :math:`D_h = \frac1d\sum_k \mathrm{sign}(w_i[k])\,\mathrm{sign}(w_j[k])`
  with the binary sign (``1`` if ``x >= 0`` else ``-1``) or the ternary sign ({-1, 0, 1}); the
  discrete angle is :math:`a = \theta_{D_h} = (1-D_h)/2` or, primed, :math:`a' = \arccos(D_h)/\pi`;
* continuous angle: :math:`b = \theta = \arccos(\cos(w_i, w_j))/\pi`.

Every ``arccos`` argument is clamped to ``[-clamp, clamp]`` (``clamp=0.99``, the paper's choice), so
values and gradients are finite everywhere; note that this makes :math:`\theta(w, w) =
\arccos(0.99)/\pi \approx 0.045` instead of 0 (pass ``clamp=1.0`` for exact values, at the price of
an infinite gradient for identical or opposite vectors).

Metrics (all in [0, 1]; ``'`` = the primed variant, which uses :math:`a'` instead of :math:`a`):

==================  =========================================  ===========  ==================
name                value                                      kind         term minimized
==================  =========================================  ===========  ==================
``bin``, ``ter``    :math:`a` (binary / ternary sign)          distance     :math:`1-D`
``angular``         :math:`b` (also ``theta``; not A-MHE's     distance     :math:`1-D`
                    ``"angular"`` of ``energy.METRICS``)
``AM``              :math:`(a+b)/2`                            distance     :math:`1-D`
``GM``              :math:`ab` (as printed; ``gm="sqrt"``:     distance     :math:`1-D`
                    :math:`\sqrt{ab}`)
``HM``              :math:`2ab/(a+b)` (000's form, in [0,1])   distance     :math:`1-D`
``cos(AM)``         :math:`(\cos(\pi\,\mathrm{AM})+1)/2`        similarity   :math:`D`
``cos(GM)``         :math:`(\cos(\pi\,\mathrm{GM})+1)/2`        similarity   :math:`D`
``cos(HM)``         :math:`(\cos(\pi\,\mathrm{HM})+1)/2`        similarity   :math:`D`
``AMcos``           :math:`(\cos\pi a+\cos\pi b+2)/4`           similarity   :math:`D`
``GMcos``           :math:`(\cos\pi a+1)(\cos\pi b+1)/4`        similarity   :math:`D`
``HMcos``           :math:`\frac{(\cos\pi a+1)(\cos\pi b+1)}    similarity   :math:`D`
                    {\cos\pi a+\cos\pi b+2}`
==================  =========================================  ===========  ==================

Distances are 0 for identical vectors and are *maximized* by the paper (its "reversed form"
:math:`1-D` is what is minimized); the cosine forms are similarities (1 for identical vectors)
and are minimized as they are. Either way, minimizing the term pushes vectors apart
(:data:`METRIC_DIRECTIONS`). The paper's baselines (§4.1, "energy" kind, minimized as they are):
``N-euclidean2`` :math:`\|\hat w_i-\hat w_j\|^{-2}` (MHE, s=2), ``angular2``
:math:`\arccos(\cos)^{-2}` (angular MHE, s=2) and ``cosine`` :math:`\cos(w_i, w_j)`.

Gradients (§3.3): the sign uses the *saturated* straight-through estimator, backward
:math:`\partial\,\mathrm{sign}(x)/\partial x := \mathbf 1_{|x|\le 1}`. Everything is computed from
Gram matrices: :math:`\hat W\hat W^\top` for the angle and :math:`S S^\top/d` (S = signs) for
:math:`D_h`, so nothing of size N×N×d is ever formed.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_hyper.functional.checks import check_choice, check_labels, check_number

from lightning_hyper.functional.energy import hyperspherical_energy, normalize_neurons, pair_kernel, warn_no_pairs

__all__ = [
    "DH2L_METRICS",
    "check_metric_options",
    "ENERGY_METRICS",
    "METRIC_DIRECTIONS",
    "METRICS",
    "METRIC_ALIASES",
    "PAIR_METRICS",
    "DISCRETE_MODES",
    "GM_FORMS",
    "canonical_metric",
    "sign_ste",
    "discrete_similarity",
    "discrete_angle",
    "pairwise_metric",
    "pairwise_term",
    "metric_energy",
    "metric_energy_from_labels",
    "grouped_metric_energy",
]

_BASE_DISTANCES = ("AM", "GM", "HM")
_BASE_SIMILARITIES = ("cos(AM)", "cos(GM)", "cos(HM)", "AMcos", "GMcos", "HMcos")
#: the paper's own metrics (values in [0, 1])
DH2L_METRICS: tuple[str, ...] = (
    "bin", "ter", "bin'", "ter'", "angular",
    *_BASE_DISTANCES, *(m + "'" for m in _BASE_DISTANCES),
    *_BASE_SIMILARITIES, *(m + "'" for m in _BASE_SIMILARITIES),
)
#: the paper's continuous baselines (energies, §4.1)
ENERGY_METRICS: tuple[str, ...] = ("N-euclidean2", "angular2", "cosine")
#: every pairwise metric name of this module. Not :data:`lightning_hyper.functional.energy.METRICS` (the distance of
#: MHE's energies, where ``"angular"`` means the geodesic angle kernel of A-MHE): here ``"angular"`` is DH2L's
#: normalized angle distance :math:`b = \theta/\pi`, which may also be written ``"theta"``.
PAIR_METRICS: tuple[str, ...] = DH2L_METRICS + ENERGY_METRICS
METRICS = PAIR_METRICS  # the old name, kept
#: unambiguous spellings accepted by :func:`canonical_metric`
METRIC_ALIASES: dict[str, str] = {"theta": "angular"}
#: how each metric is turned into the term that is minimized (so that vectors move apart)
METRIC_DIRECTIONS: dict[str, str] = {
    **{m: "distance" for m in DH2L_METRICS if m.rstrip("'") in ("bin", "ter", "angular", *_BASE_DISTANCES)},
    **{m: "similarity" for m in DH2L_METRICS if m.rstrip("'") in _BASE_SIMILARITIES},
    **{m: "energy" for m in ENERGY_METRICS},
}
DISCRETE_MODES = ("binary", "ternary")
GM_FORMS = ("product", "sqrt")
REDUCTIONS = ("mean", "sum")


def canonical_metric(metric: str) -> str:
    """Validate a metric name and return its canonical spelling (``"AM_prime"`` -> ``"AM'"``, ``"theta"`` ->
    ``"angular"``)."""
    if isinstance(metric, str):
        name = metric.strip()
        if name.endswith("_prime"):
            name = name[: -len("_prime")] + "'"
        name = METRIC_ALIASES.get(name, name)
        if name in METRIC_DIRECTIONS:
            return name
    raise ValueError(f"metric={metric!r} is not supported; accepted values: {list(METRICS)} "
                     "(a trailing ' may also be written _prime)")


def check_metric_options(discrete: str, clamp: float, gm: str, threshold: float) -> None:
    """Validate the options of the DH2L metrics (see :func:`pairwise_metric`)."""
    check_choice("discrete", discrete, DISCRETE_MODES)
    check_choice("gm", gm, GM_FORMS)
    check_number("clamp", clamp, low=0.0, high=1.0, fix="the paper uses 0.99")
    check_number("threshold", threshold, low=0.0, low_inclusive=True)


_check_options = check_metric_options  # the name callbacks used before it was public


# ---------------------------------------------------------------------------- sign + STE
class _SignSTE(torch.autograd.Function):
    """sign(x) forward, saturated straight-through backward: grad * 1_{|x| <= 1}."""

    @staticmethod
    def forward(ctx, x: Tensor, ternary: bool, threshold: Tensor | None) -> Tensor:  # type: ignore[override]
        if ternary:
            thr = threshold if threshold is not None else x.new_zeros(())
            out = torch.where(x > thr, 1.0, torch.where(x < -thr, -1.0, 0.0)).to(x.dtype)
        else:
            out = torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype), None, None


def sign_ste(x: Tensor, ternary: bool = False, threshold: float = 0.0) -> Tensor:
    r"""Sign with the saturated straight-through estimator (DH2L §3.3, Bengio et al. 2013).

    Binary: ``1`` where ``x >= 0``, else ``-1`` (eq. 8). Ternary: ``0`` where
    :math:`|x| \le \delta`, else the sign, with :math:`\delta` = ``threshold`` times the mean
    :math:`|x|` of each row (last dimension); ``threshold=0`` (default) gives ``torch.sign``, which
    is zero only at exact zeros (the paper's {-1, 0, 1} code; TWN quantization uses 0.7).
    Backward: the incoming gradient where :math:`|x| \le 1`, zero elsewhere.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a Tensor, got {type(x).__name__}")
    check_metric_options("binary", 0.99, "product", threshold)
    thr = None
    if ternary and threshold > 0 and x.numel():
        thr = threshold * x.detach().abs().mean(dim=-1, keepdim=True)
    return _SignSTE.apply(x, bool(ternary), thr)


# ---------------------------------------------------------------------------- Gram-based pieces
def _prepare(x: Tensor, name: str) -> Tensor:
    """Validate an (N, d) matrix of rows; return it in float32 (float64 if it is float64)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a Tensor of shape (N, d), got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name}: expected shape (N, d) with one vector per row, got {tuple(x.shape)}; "
                         "use lightning_hyper.functional.as_neurons(weight) for conv weights")
    if x.shape[0] and x.shape[1] == 0:
        raise ValueError(f"{name}: rows have dimension d=0 (shape {tuple(x.shape)})")
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if x.numel():
        # judged on the entries, not on norms: squares of 1e-30 / 1e30 rows under/overflow, but such rows
        # have a direction (normalize_neurons is scale safe)
        xd = x.detach()
        if not bool(torch.isfinite(xd).all()):
            raise ValueError(f"{name}: contains NaN or Inf entries; the metric of such vectors is undefined")
        zero = (xd == 0).all(dim=-1)
        if bool(zero.any()):
            rows = zero.nonzero().flatten()[:5].tolist()
            raise ValueError(f"{name}: rows {rows} are zero vectors; their angle is undefined")
    return x


def _pair_inputs(x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
    xs = _prepare(x, "x")
    if y is None:
        return xs, xs
    ys = _prepare(y, "y")
    if ys.shape[1] != xs.shape[1]:
        raise ValueError(f"y: expected shape (M, {xs.shape[1]}) to match x of shape {tuple(xs.shape)}, "
                         f"got {tuple(y.shape)}")
    return xs, ys.to(xs.dtype)


def discrete_similarity(x: Tensor, y: Tensor | None = None, ternary: bool = False, threshold: float = 0.0) -> Tensor:
    r""":math:`D_h = S_x S_y^\top / d` in [-1, 1], shape ``(N, M)`` (eq. 8; ``y=None``: ``y = x``).

    One GEMM of the sign matrices; gradients through :func:`sign_ste`.
    """
    xs, ys = _pair_inputs(x, y)
    sx = sign_ste(xs, ternary, threshold)
    sy = sx if y is None else sign_ste(ys, ternary, threshold)
    return sx @ sy.T / xs.shape[1]


def _acos_unit(c: Tensor, clamp: float) -> Tensor:
    """arccos(clamp(c, -clamp, clamp)) / pi (paper footnote: the cosine is clamped to [-0.99, 0.99])."""
    return torch.acos(c.clamp(-clamp, clamp)) / math.pi


def discrete_angle(d_h: Tensor, primed: bool = False, clamp: float = 0.99) -> Tensor:
    r""":math:`\theta_{D_h} = (1-D_h)/2`, or primed :math:`\arccos(D_h)/\pi` (clamped), in [0, 1]."""
    return _acos_unit(d_h, clamp) if primed else (1.0 - d_h) * 0.5


def _angles(x: Tensor, y: Tensor | None, metric: str, discrete: str, clamp: float,
            threshold: float) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """(a = discrete angle or None, b = continuous angle or None, cos) as (N, M) matrices."""
    xs, ys = _pair_inputs(x, y)
    ux, _ = normalize_neurons(xs)
    uy = ux if y is None else normalize_neurons(ys)[0]
    cos = ux @ uy.T
    base = metric.rstrip("'")
    a = b = None
    if base != "angular":
        ternary = base == "ter" or (base != "bin" and discrete == "ternary")
        sx = sign_ste(xs, ternary, threshold)
        sy = sx if y is None else sign_ste(ys, ternary, threshold)
        a = discrete_angle(sx @ sy.T / xs.shape[1], primed=metric.endswith("'"), clamp=clamp)
    if base not in ("bin", "ter"):
        b = _acos_unit(cos, clamp)
    return a, b, cos


def _safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den with 0 where den == 0 (value and gradient finite)."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _combine(base: str, a: Tensor | None, b: Tensor | None, gm: str) -> Tensor:
    if base in ("bin", "ter"):
        return a
    if base == "angular":
        return b
    inner = base[4:-1] if base.startswith("cos(") else base
    if inner in ("AM", "GM", "HM"):
        if inner == "AM":
            m = (a + b) * 0.5
        elif inner == "GM":
            m = a * b
            if gm == "sqrt":  # sqrt with a finite gradient at 0
                pos = m > 0
                m = torch.where(pos, torch.sqrt(torch.where(pos, m, torch.ones_like(m))), torch.zeros_like(m))
        else:
            m = _safe_ratio(2.0 * a * b, a + b)
        return (torch.cos(math.pi * m) + 1.0) * 0.5 if base.startswith("cos(") else m
    u = torch.cos(math.pi * a) + 1.0  # in [0, 2]
    v = torch.cos(math.pi * b) + 1.0
    if base == "AMcos":
        return (u + v) * 0.25
    if base == "GMcos":
        return u * v * 0.25
    return _safe_ratio(u * v, u + v)  # HMcos


def pairwise_metric(x: Tensor, y: Tensor | None = None, metric: str = "AM", *, discrete: str = "binary",
                    clamp: float = 0.99, gm: str = "product", threshold: float = 0.0) -> Tensor:
    r"""The metric value for every pair of rows, shape ``(N, M)`` (``y=None``: all pairs of ``x``).

    DH2L metrics give values in [0, 1] (distances: 0 for identical vectors; similarities: 1);
    energy baselines give their per-pair kernel (``N-euclidean2``: :math:`(2-2\cos+\epsilon)^{-1}`,
    ``angular2``: :math:`\arccos(\cos)^{-2}`, ``cosine``: :math:`\cos`).

    Args:
        metric: a name of :data:`METRICS` (see the module table).
        discrete: sign used by the combined metrics: ``"binary"`` (paper's choice) or ``"ternary"``
            (``bin``/``ter`` fix their own).
        clamp: arccos argument clamp (paper: 0.99).
        gm: ``"product"`` (the printed :math:`ab`) or ``"sqrt"`` (the true geometric mean).
        threshold: ternary dead zone, relative to each row's mean :math:`|w|` (see :func:`sign_ste`).
    """
    metric = canonical_metric(metric)
    check_metric_options(discrete, clamp, gm, threshold)
    if METRIC_DIRECTIONS[metric] == "energy":
        xs, ys = _pair_inputs(x, y)
        ux, _ = normalize_neurons(xs)
        uy = ux if y is None else normalize_neurons(ys)[0]
        cos = ux @ uy.T
        if metric == "cosine":
            return cos
        kind = "euclidean" if metric == "N-euclidean2" else "angular"
        return pair_kernel(cos, s=2.0, metric=kind)
    a, b, _ = _angles(x, y, metric, discrete, clamp, threshold)
    return _combine(metric.rstrip("'"), a, b, gm)


def pairwise_term(x: Tensor, y: Tensor | None = None, metric: str = "AM", **kwargs) -> Tensor:
    """The per-pair term that is *minimized*, ``(N, M)``: ``1 - D`` for distances, ``D`` for
    similarities and energies (:data:`METRIC_DIRECTIONS`); keyword options as :func:`pairwise_metric`."""
    metric = canonical_metric(metric)
    value = pairwise_metric(x, y, metric, **kwargs)
    return 1.0 - value if METRIC_DIRECTIONS[metric] == "distance" else value


def _off_diagonal_mean(t: Tensor, reduction: str) -> Tensor:
    n = t.shape[0]
    mask = ~torch.eye(n, dtype=torch.bool, device=t.device)
    total = t.masked_fill(~mask, 0.0).sum()
    return total / (n * (n - 1)) if reduction == "mean" else total


def metric_energy(neurons: Tensor, metric: str = "AM", reduction: str = "mean", **kwargs) -> Tensor:
    r"""Pairwise-metric energy of the rows of ``neurons`` (N, d): the term of :func:`pairwise_term`
    summed (``"sum"``) or averaged (``"mean"``) over ordered pairs :math:`i \ne j` (DH2L's 'E',
    :math:`\lambda_e\sum_{i\ne j} d(w_i, w_j)`).

    ``N-euclidean2`` and ``angular2`` are computed by
    :func:`~lightning_hyper.functional.energy.hyperspherical_energy` (MHE with s=2, euclidean /
    angular). N < 2 gives 0 with a zero gradient and a ``UserWarning``.
    """
    metric = canonical_metric(metric)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not supported; accepted values: {list(REDUCTIONS)}")
    if metric in ("N-euclidean2", "angular2"):
        return hyperspherical_energy(neurons, s=2.0, metric="euclidean" if metric == "N-euclidean2" else "angular",
                                     reduction=reduction)
    x = _prepare(neurons, "neurons")
    with torch.autocast(device_type=x.device.type, enabled=False):
        if x.shape[0] < 2:
            warn_no_pairs(x.shape[0], "metric_energy")
            return x.sum() * 0.0
        return _off_diagonal_mean(pairwise_term(x, None, metric, **kwargs), reduction)


def metric_energy_from_labels(weight: Tensor, labels: Tensor, metric: str = "AM", unique: bool = False,
                              **kwargs) -> Tensor:
    r"""Mini-batch output-layer form: :math:`\frac1{m(N-1)}\sum_{i}\sum_{j\ne y_i} t(w_{y_i}, w_j)`
    over the batch's labels ``y`` (each present class once if ``unique``), as
    :func:`~lightning_hyper.functional.energy.output_energy_from_labels` for MHE."""
    metric = canonical_metric(metric)
    w = _prepare(weight, "weight")
    n = w.shape[0]
    labels = check_labels(labels, n, owner="metric_energy_from_labels", what=f"the {n} rows of weight",
                          dtype_error=ValueError).to(w.device)
    if unique:
        labels = torch.unique(labels)
    m = labels.numel()
    if m == 0 or n < 2:
        return w.sum() * 0.0
    with torch.autocast(device_type=w.device.type, enabled=False):
        t = pairwise_term(w[labels], w, metric, **kwargs)
        self_pair = torch.nn.functional.one_hot(labels, n).bool()
        return t.masked_fill(self_pair, 0.0).sum() / (m * (n - 1))


def grouped_metric_energy(neurons: Tensor, groups: Tensor | Sequence[int], metric: str = "AM",
                          **kwargs) -> Tensor:
    r"""Within-group energy :math:`R_{l,p}` (DH2L eq. 6): for each group with at least two rows, the
    mean of the term over its ordered pairs :math:`i \ne j`, then the mean over those groups.

    Groups with a single row have no pair and are left out of the average (so a batch in which
    every group shows one class gives 0, not NaN). ``groups``: one group id per row.
    """
    x = _prepare(neurons, "neurons")
    g = torch.as_tensor(groups, device=x.device)
    if g.dim() != 1 or g.shape[0] != x.shape[0] or g.dtype.is_floating_point:
        raise ValueError(f"groups: expected {x.shape[0]} integer group ids (one per row), got "
                         f"{tuple(g.shape)} of dtype {g.dtype}")
    metric = canonical_metric(metric)
    with torch.autocast(device_type=x.device.type, enabled=False):
        _, g = torch.unique(g, return_inverse=True)
        same = (g[:, None] == g[None, :]) & ~torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
        pairs_per_group = torch.zeros(int(g.max()) + 1 if g.numel() else 0, dtype=x.dtype, device=x.device)
        pairs_per_group.index_add_(0, g, same.sum(dim=1).to(x.dtype))
        active = pairs_per_group > 0
        if not bool(active.any()):
            return x.sum() * 0.0
        t = pairwise_term(x, None, metric, **kwargs).masked_fill(~same, 0.0)
        sums = torch.zeros_like(pairs_per_group).index_add_(0, g, t.sum(dim=1))
        return (sums[active] / pairs_per_group[active]).mean()

check_metric_options = _check_options  # public name of the check of discrete / clamp / gm / threshold (callbacks)
