r"""Compressive MHE (CoMHE): projections, the projected energy and the angle-preservation objective.

Thesis Ch. 6 (Lin, Liu et al., "Regularizing Neural Networks via Minimizing Hyperspherical
Energy", CVPR 2020); spec ``comhe.md`` §1-§7.

The compressive energy of N neurons :math:`w_i \in \mathbb R^D` under C projections
:math:`P_c \in \mathbb R^{k\times D}` (Eq. 6.4; ``aggregate="max"``: Eq. 6.5):

.. math::
    E^R_s = \mathop{\mathrm{agg}}_{c=1..C}\ \bar E_s\Big(\tfrac{P_c w_1}{\|P_c w_1\|},\dots,
    \tfrac{P_c w_N}{\|P_c w_N\|}\Big)

with :math:`\bar E_s` the (half-space by default, §1.3) mean pairwise energy of
:func:`~lightning_hyper.functional.energy.hyperspherical_energy`. All C projected sets are one
batched call ``(C, N, k)`` of that energy core: there is no second energy implementation here.
Since the projected points are renormalized, :math:`P\hat w/\|P\hat w\| = Pw/\|Pw\|`, so raw
weights are projected.

* Random projections (RP-CoMHE, §2.1): i.i.d. :math:`\mathcal N(0,1)` entries drawn from a
  ``torch.Generator`` seeded by :func:`projection_seed` from ``(seed, step // refresh_every, key)``.
* Angle-preserving projections (AP-CoMHE, Eqs. 6.6-6.7): :func:`angle_preservation_loss`,
  :func:`angle_preserving_step` (plain SGD on P, W held fixed) and
  :func:`unrolled_angle_projection` (:math:`P' = P - \eta\nabla_P\mathcal L_P(P, W)` kept in the
  graph, so W gets the second-order terms).
* Adversarial projections (Adv-CoMHE, Eq. 6.8): :func:`adversarial_step`, gradient *ascent* on the
  projected full-space energy, and :func:`unrolled_adversarial_projection` (one ascent step kept in
  the graph; second-order terms by a finite-difference Hessian-vector product).
* Group CoMHE (G-CoMHE, Eq. 6.9): :func:`group_selection` (the 0/1 diagonal :math:`P_c` as
  selection matrices) and :func:`group_energy` (the same energy from a reshape, no matmul).
* Theorem 3 (angle preservation): :func:`angle_bounds` and :func:`angle_bound_probability`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_hyper.functional.checks import check_number
from lightning_hyper.functional.seeding import derive_seed, seeded_generator
from lightning_hyper.functional.energy import validate_energy_args, hyperspherical_energy

__all__ = [
    "AGGREGATES",
    "ANGLE_LOSSES",
    "adversarial_step",
    "angle_bound_probability",
    "angle_bounds",
    "angle_preservation_loss",
    "angle_preserving_step",
    "compressive_energy",
    "group_energy",
    "group_selection",
    "project_neurons",
    "projected_energies",
    "projection_generator",
    "projection_seed",
    "random_projections",
    "unrolled_adversarial_projection",
    "unrolled_angle_projection",
]

AGGREGATES = ("mean", "max")
ANGLE_LOSSES = ("cos_fro", "cos_sq", "angle_sq")

# ---------------------------------------------------------------------------------------------- seeds
def _check_refresh(refresh_every: int | None, arg: str = "refresh_every") -> None:
    check_number(arg, refresh_every, low=1, low_inclusive=True, integer=True, allow_none=True,
                 fix="None never redraws, an int redraws every that many steps")


def projection_seed(seed: int, step: int, refresh_every: int | None = 1, *keys: int) -> int:
    """Deterministic 63-bit seed of the draw in force at ``step`` (spec §6, "Randomness and DDP").

    The period is ``step // refresh_every`` (``0`` forever if ``refresh_every`` is None); ``keys``
    (e.g. the neuron dimension D for a basis shared by all layers of that D) separate independent
    draws. The mix (SplitMix64) depends on nothing but these integers, so every DDP rank and a
    resumed run compute the same seed.
    """
    _check_refresh(refresh_every)
    period = 0 if refresh_every is None else int(step) // refresh_every
    return derive_seed(seed, period, *keys)


def projection_generator(seed: int, step: int, refresh_every: int | None = 1, *keys: int,
                         device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`projection_seed`."""
    _check_refresh(refresh_every)
    period = 0 if refresh_every is None else int(step) // refresh_every
    return seeded_generator(seed, period, *keys, device=device)


def random_projections(num_projections: int, projection_dim: int, dim: int,
                       generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                       device: torch.device | str | None = None) -> Tensor:
    r"""C Gaussian projections, shape ``(C, k, D)`` with i.i.d. :math:`\mathcal N(0,1)` entries (§2.1).

    The scale is irrelevant (the energy is invariant to :math:`P\to aP`); the normalized rows are
    uniform on :math:`\mathbb S^{D-1}`. Drawn under ``no_grad`` from ``generator`` (on ``device``,
    default the generator's device).
    """
    for name, value in (("num_projections", num_projections), ("projection_dim", projection_dim), ("dim", dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is not supported; accepted values: an int >= 1")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    with torch.no_grad():
        return torch.randn(num_projections, projection_dim, dim, generator=generator, dtype=dtype, device=device)


# -------------------------------------------------------------------------------- projected energy
def _check_pair(neurons: Tensor, projections: Tensor) -> tuple[Tensor, bool]:
    """Return ``projections`` as (C, k, D) (cast to the neurons' dtype) and whether it was 2-D."""
    if not isinstance(neurons, Tensor) or neurons.dim() != 2:
        raise ValueError("neurons: expected a Tensor of shape (N, D) with rows = neurons, got "
                         f"{tuple(neurons.shape) if isinstance(neurons, Tensor) else type(neurons).__name__}; "
                         "use lightning_hyper.functional.as_neurons(weight) for conv weights")
    if not isinstance(projections, Tensor) or projections.dim() not in (2, 3):
        got = tuple(projections.shape) if isinstance(projections, Tensor) else type(projections).__name__
        raise ValueError(f"projections: expected a Tensor of shape (k, D) or (C, k, D), got {got}")
    single = projections.dim() == 2
    p = projections.unsqueeze(0) if single else projections
    if p.shape[-1] != neurons.shape[-1]:
        raise ValueError(f"projections: last dimension {p.shape[-1]} does not match the neuron dimension "
                         f"D={neurons.shape[-1]} (neurons {tuple(neurons.shape)})")
    if p.shape[0] < 1 or p.shape[1] < 1:
        raise ValueError(f"projections: need C >= 1 projections of k >= 1 rows, got {tuple(p.shape)}")
    dtype = torch.float64 if neurons.dtype == torch.float64 else torch.float32
    return p.to(device=neurons.device, dtype=dtype), single


def project_neurons(neurons: Tensor, projections: Tensor) -> Tensor:
    """Projected neurons :math:`P_c w_i`: ``(N, D)`` x ``(C, k, D)`` -> ``(C, N, k)`` (one batched GEMM).

    Computed with autocast disabled, in float32 (float64 for float64 neurons), like the energy core."""
    p, _ = _check_pair(neurons, projections)
    x = neurons.to(p.dtype)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return torch.matmul(x, p.transpose(-1, -2))


def projected_energies(neurons: Tensor, projections: Tensor, s: float = 2.0, half_space: bool = True,
                       metric: str = "euclidean", reduction: str = "mean", angle_unit: str = "radian",
                       eps: float = 1e-6, chunk_size: int | None = None) -> Tensor:
    """Energy of the neurons under each projection, ``(C,)``: one batched energy-core call (§6)."""
    y = project_neurons(neurons, projections)
    return hyperspherical_energy(y, s=s, metric=metric, half_space=half_space, reduction=reduction,
                                 angle_unit=angle_unit, eps=eps, chunk_size=chunk_size)


def _aggregate(energies: Tensor, aggregate: str) -> Tensor:
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate={aggregate!r} is not supported; accepted values: {list(AGGREGATES)}")
    return energies.mean() if aggregate == "mean" else energies.max()


def compressive_energy(neurons: Tensor, projections: Tensor, s: float = 2.0, half_space: bool = True,
                       aggregate: str = "mean", metric: str = "euclidean", reduction: str = "mean",
                       angle_unit: str = "radian", eps: float = 1e-6, chunk_size: int | None = None) -> Tensor:
    r"""Compressive hyperspherical energy for given projections (thesis Eqs. 6.3-6.5, 6.7-6.9).

    .. math:: E = \mathop{\mathrm{agg}}_c\ \bar E_s\big(\{P_c w_i/\|P_c w_i\|\}_{i=1}^N\big),
              \qquad \mathrm{agg} \in \{\text{mean (Eq. 6.4)}, \text{max (Eq. 6.5)}\}

    Args:
        neurons: ``(N, D)``, rows are neurons (not necessarily normalized).
        projections: ``(C, k, D)`` (or one ``(k, D)``); random, learned or 0/1 selections.
        s, metric, reduction, angle_unit, eps, chunk_size: see :func:`hyperspherical_energy`.
        half_space: energy of the 2N points :math:`\pm P_c w_i` (default: every CoMHE variant is
            built on half-space MHE, §1.3); the negation commutes with the projection.
        aggregate: ``"mean"`` or ``"max"`` over the C projections.

    Returns:
        scalar (float32, or float64 for float64 neurons); gradients reach ``neurons`` and, if it
        requires grad, ``projections``.
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate={aggregate!r} is not supported; accepted values: {list(AGGREGATES)}")
    energies = projected_energies(neurons, projections, s=s, half_space=half_space, metric=metric,
                                  reduction=reduction, angle_unit=angle_unit, eps=eps, chunk_size=chunk_size)
    return _aggregate(energies, aggregate)


# ------------------------------------------------------------------------------------ group CoMHE
def _check_group(dim: int, group_width: int, permutation: Tensor | None) -> int:
    if isinstance(group_width, bool) or not isinstance(group_width, int) or group_width < 1:
        raise ValueError(f"group_width={group_width!r} is not supported; accepted values: an int >= 1 "
                         "(coordinates per group = channels per group x kernel size)")
    if permutation is not None and (permutation.dim() != 1 or permutation.numel() != dim):
        raise ValueError(f"permutation: expected a permutation of the D={dim} coordinates, got shape "
                         f"{tuple(permutation.shape)}")
    return -(-dim // group_width)  # number of groups (the last one may be narrower)


def group_selection(dim: int, group_width: int, permutation: Tensor | None = None,
                    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    r"""G-CoMHE's diagonal 0/1 projections as selection matrices, ``(G, group_width, D)`` (Eq. 6.9).

    Group c selects coordinates ``order[c*w:(c+1)*w]`` (``order`` = ``permutation`` or 0..D-1), so
    :math:`\sum_c P_c^\top P_c = I` (a partition). A narrower last group gets zero rows, which
    change neither norms nor cosines. ``compressive_energy(W, group_selection(...))`` equals
    :func:`group_energy`.
    """
    groups = _check_group(dim, group_width, permutation)
    order = torch.arange(dim) if permutation is None else permutation.detach().cpu().long()
    sel = torch.zeros(groups * group_width, dim, dtype=dtype)
    sel[torch.arange(dim), order] = 1.0
    return sel.reshape(groups, group_width, dim).to(device=device)


def group_energy(neurons: Tensor, group_width: int, s: float = 2.0, half_space: bool = True,
                 aggregate: str = "mean", permutation: Tensor | None = None, metric: str = "euclidean",
                 reduction: str = "mean", angle_unit: str = "radian", eps: float = 1e-6,
                 chunk_size: int | None = None) -> Tensor:
    r"""Group CoMHE (Eq. 6.9): aggregate over groups of the energy of each neuron's sub-vector.

    Coordinates (after ``permutation``, if given: the "stochastic" partition) are split into
    consecutive groups of ``group_width``; for a conv layer grouped by input channels,
    ``group_width = channels_per_group * kh * kw`` (the channel-major layout of ``as_neurons``).
    Each sub-vector is renormalized inside the energy core; the G sub-problems are one batched call
    ``(G, N, group_width)``. One group (``group_width >= D``) is plain (HS-)MHE.
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate={aggregate!r} is not supported; accepted values: {list(AGGREGATES)}")
    if not isinstance(neurons, Tensor) or neurons.dim() != 2:
        raise ValueError("neurons: expected a Tensor of shape (N, D) with rows = neurons")
    n, dim = neurons.shape
    groups = _check_group(dim, group_width, permutation)
    x = neurons if permutation is None else neurons[:, permutation.to(neurons.device)]
    pad = groups * group_width - dim
    if pad:
        x = F.pad(x, (0, pad))
    x = x.reshape(n, groups, group_width).transpose(0, 1)  # (G, N, w)
    energies = hyperspherical_energy(x, s=s, metric=metric, half_space=half_space, reduction=reduction,
                                     angle_unit=angle_unit, eps=eps, chunk_size=chunk_size)
    return _aggregate(energies, aggregate)


# ------------------------------------------------------------------ angle-preserving projections
def _cosines(x: Tensor) -> Tensor:
    """Cosine matrix of the rows of ``x`` (..., N, d) -> (..., N, N); twice differentiable."""
    u = F.normalize(x, dim=-1, eps=1e-12)
    return u @ u.transpose(-1, -2)


def angle_preservation_loss(neurons: Tensor, projections: Tensor, loss: str = "cos_fro",
                            eps: float = 1e-6) -> Tensor:
    r"""How much the projection distorts pairwise angles (thesis Eq. 6.6; spec §2.2 ``ap_loss``).

    * ``"cos_fro"`` (authors' code): :math:`\|\mathrm{Cos}(PW) - \mathrm{Cos}(W)\|_F` over the
      full N×N cosine matrices, not squared (``1e-12`` inside the square root).
    * ``"cos_sq"``: :math:`\sum_{i\ne j}(\cos\theta_{ij} - \cos\theta'_{ij})^2`.
    * ``"angle_sq"``: :math:`\sum_{i\ne j}(\theta_{ij} - \theta'_{ij})^2` (Eq. 6.6 literally), cosines
      clamped to :math:`[-1+\epsilon, 1-\epsilon]` before ``arccos``.

    ``projections`` ``(k, D)`` gives a scalar, ``(C, k, D)`` gives ``(C,)``. Plain autograd (twice
    differentiable: the unrolled AP step differentiates its gradient).
    """
    if loss not in ANGLE_LOSSES:
        raise ValueError(f"loss={loss!r} is not supported; accepted values: {list(ANGLE_LOSSES)}")
    p, single = _check_pair(neurons, projections)  # .to() keeps the graph to ``projections``
    x = neurons.to(p.dtype)
    c0 = _cosines(x)  # (N, N)
    c1 = _cosines(torch.matmul(x, p.transpose(-1, -2)))  # (C, N, N)
    n = x.shape[0]
    if loss == "cos_fro":
        out = ((c1 - c0).square().sum(dim=(-1, -2)) + 1e-12).sqrt()
    else:
        off = ~torch.eye(n, dtype=torch.bool, device=x.device)
        if loss == "cos_sq":
            diff = c1 - c0
        else:
            theta0 = torch.acos(c0.clamp(-1 + eps, 1 - eps))
            theta1 = torch.acos(c1.clamp(-1 + eps, 1 - eps))
            diff = theta1 - theta0
        out = (diff.square() * off).sum(dim=(-1, -2))
    return out[0] if single else out


def _as_list(neurons: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [neurons] if isinstance(neurons, Tensor) else list(neurons)


def _check_step_args(lr: float, steps: int, weight_decay: float) -> None:
    check_number("lr", lr, low=0.0, low_inclusive=True)
    check_number("steps", steps, low=0, low_inclusive=True, integer=True)
    check_number("weight_decay", weight_decay, low=0.0, low_inclusive=True)


def angle_preserving_step(neurons: Tensor | Sequence[Tensor], projections: Tensor, lr: float, steps: int = 1,
                          loss: str = "cos_fro", weight_decay: float = 0.0, eps: float = 1e-6) -> Tensor:
    r"""``steps`` plain-SGD steps (no momentum) on P minimizing the angle distortion, W fixed (§2.2 (a)).

    .. math:: P \leftarrow P - \mathrm{lr}\,\nabla_P\Big[\sum_{\ell}\sum_c \mathcal L_P(W_\ell, P_c)
              + \tfrac{\lambda}{2}\|P\|_F^2\Big]

    ``neurons`` may be a list of layers sharing the projection (their losses are summed).
    Returns a new detached tensor shaped like ``projections``.
    """
    _check_step_args(lr, steps, weight_decay)
    layers = [w.detach() for w in _as_list(neurons)]
    p = projections.detach().clone()
    for _ in range(steps):
        p.requires_grad_(True)
        with torch.enable_grad():
            obj = sum(angle_preservation_loss(w, p, loss, eps).sum() for w in layers)
            if weight_decay:
                obj = obj + 0.5 * weight_decay * p.square().sum()
            (grad,) = torch.autograd.grad(obj, p)
        p = (p - lr * grad).detach()
    return p


def unrolled_angle_projection(neurons: Tensor, projections: Tensor, lr: float, steps: int = 1,
                              loss: str = "cos_fro", eps: float = 1e-6) -> Tensor:
    r"""Unrolled AP step :math:`P' = P - \eta\,\nabla_P \mathcal L_P(P, W)`, kept in the graph (§2.2 (b)).

    The gradient is taken with ``create_graph=True``, so a loss on :math:`P'` back-propagates into
    W through both :math:`W P'^\top` and :math:`\nabla_P\mathcal L_P` (second-order terms).
    ``steps`` > 1 repeats the step on :math:`P'`. P itself receives no gradient.
    """
    _check_step_args(lr, steps, 0.0)
    p = projections.detach().requires_grad_(True)
    out = p
    with torch.enable_grad():
        for _ in range(steps):
            obj = angle_preservation_loss(neurons, out, loss, eps).sum()
            (grad,) = torch.autograd.grad(obj, out, create_graph=True)
            out = out - lr * grad
    return out if steps else projections.detach()


# --------------------------------------------------------------------- adversarial projections
def adversarial_step(neurons: Tensor | Sequence[Tensor], projections: Tensor, lr: float, steps: int = 10,
                     s: float = 2.0, weight_decay: float = 0.0, metric: str = "euclidean",
                     eps: float = 1e-6) -> Tensor:
    r"""``steps`` plain-SGD *ascent* steps on P, W fixed: the max step of Adv-CoMHE (Eq. 6.8; §2.3 (a)).

    .. math:: P \leftarrow P + \mathrm{lr}\,\nabla_P\Big[\sum_\ell\sum_c \bar E^{full}_s(W_\ell P_c^\top)
              - \tfrac{\lambda}{2}\|P\|_F^2\Big]

    The ascent objective is the projected **full-space** mean energy (as in the authors' code); the
    network then minimizes the half-space energy at the new P. Returns a new detached tensor.
    """
    _check_step_args(lr, steps, weight_decay)
    validate_energy_args(s, metric, "mean", "radian", eps)
    layers = [w.detach() for w in _as_list(neurons)]
    p = projections.detach().clone()
    for _ in range(steps):
        p.requires_grad_(True)
        with torch.enable_grad():
            obj = sum(projected_energies(w, p, s=s, half_space=False, metric=metric, eps=eps).sum() for w in layers)
            if weight_decay:
                obj = obj - 0.5 * weight_decay * p.square().sum()
            (grad,) = torch.autograd.grad(obj, p)
        p = (p + lr * grad).detach()
    return p


def _ascent_grads(w: Tensor, p: Tensor, s: float, metric: str, eps: float,
                  wrt_neurons: bool) -> tuple[Tensor | None, Tensor]:
    """Gradients of the projected full-space energy (summed over C) w.r.t. (W, P)."""
    with torch.enable_grad():
        x = w.detach().requires_grad_(wrt_neurons)
        q = p.detach().requires_grad_(True)
        obj = projected_energies(x, q, s=s, half_space=False, metric=metric, eps=eps).sum()
        grads = torch.autograd.grad(obj, (x, q) if wrt_neurons else (q,))
    return (grads[0], grads[1]) if wrt_neurons else (None, grads[0])


class _UnrolledAscent(torch.autograd.Function):
    """P' = P + lr * grad_P E(P, W), differentiable in W and P through a finite-difference
    Hessian-vector product (the energy core's backward is exact but not twice differentiable)."""

    @staticmethod
    def forward(ctx, neurons: Tensor, projections: Tensor, lr: float, s: float, metric: str, eps: float,
                fd_step: float) -> Tensor:  # type: ignore[override]
        _, g = _ascent_grads(neurons, projections, s, metric, eps, wrt_neurons=False)
        ctx.save_for_backward(neurons.detach(), projections.detach())
        ctx.args = (lr, s, metric, eps, fd_step)
        return projections.detach() + lr * g

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        w, p = ctx.saved_tensors
        lr, s, metric, eps, fd_step = ctx.args
        norm = torch.linalg.vector_norm(grad_out)
        if lr == 0 or float(norm) == 0.0:
            return torch.zeros_like(w), grad_out, None, None, None, None, None
        # D_P(grad E)[G] = (grad E(P + hG) - grad E(P - hG)) / 2h  (central difference, unit direction)
        direction = grad_out / norm
        h = fd_step * float(torch.linalg.vector_norm(p)) / math.sqrt(p.numel())  # relative to a typical |P_ij|
        gw_plus, gp_plus = _ascent_grads(w, p + h * direction, s, metric, eps, wrt_neurons=True)
        gw_minus, gp_minus = _ascent_grads(w, p - h * direction, s, metric, eps, wrt_neurons=True)
        scale = lr * norm / (2 * h)
        grad_w = (gw_plus - gw_minus) * scale
        grad_p = grad_out + (gp_plus - gp_minus) * scale
        return grad_w, grad_p, None, None, None, None, None


def unrolled_adversarial_projection(neurons: Tensor, projections: Tensor, lr: float, steps: int = 1,
                                    s: float = 2.0, metric: str = "euclidean", eps: float = 1e-6,
                                    fd_step: float | None = None) -> Tensor:
    r"""Unrolled Adv-CoMHE ascent step :math:`P' = P + \eta\,\nabla_P E^V(P, W)` (Eq. 6.8; §2.3 (b)).

    :math:`E^V` is the projected full-space mean energy summed over the C projections. The result
    is differentiable w.r.t. ``neurons`` (and ``projections``): the backward pass forms the
    second-order terms :math:`\eta\,\partial_P(\nabla_{W,P} E^V)[G]` by a central finite difference
    of first-order energy gradients along the incoming gradient G (step ``fd_step`` times the RMS
    entry of P; default 1e-3 in float32, 1e-5 in float64), because the energy core's custom
    backward is exact but not twice differentiable. Costs two extra energy gradients in backward.
    """
    _check_step_args(lr, steps, 0.0)
    validate_energy_args(s, metric, "mean", "radian", eps)
    p, _ = _check_pair(neurons, projections)
    if projections.dim() == 2:
        p = p[0]
    if fd_step is None:
        fd_step = 1e-5 if p.dtype == torch.float64 else 1e-3
    if not (isinstance(fd_step, (int, float)) and 0 < fd_step < 1):
        raise ValueError(f"fd_step={fd_step!r} is not supported; accepted values: 0 < fd_step < 1")
    out = p
    for _ in range(steps):
        out = _UnrolledAscent.apply(neurons.to(p.dtype), out, float(lr), float(s), metric, float(eps), float(fd_step))
    return out


# ---------------------------------------------------------------------------------------- theory
def angle_bounds(cos_theta: Tensor | float, eps: float) -> tuple[Tensor, Tensor]:
    r"""Theorem 3 (angle preservation I): the interval for :math:`\cos\theta(Pw_1, Pw_2)`.

    .. math:: \frac{\cos\theta - \epsilon}{1+\epsilon} < \cos\theta_P < \frac{\cos\theta + \epsilon}{1-\epsilon}
    """
    if not 0 < eps < 1:
        raise ValueError(f"eps={eps!r} is not supported; accepted values: 0 < eps < 1")
    c = torch.as_tensor(cos_theta, dtype=torch.float64)
    return (c - eps) / (1 + eps), (c + eps) / (1 - eps)


def angle_bound_probability(k: int, eps: float) -> float:
    r"""Theorem 3's probability that the bounds hold for a k-row subgaussian P: :math:`(1-2e^{-k\epsilon^2/8})^2`.

    Values where :math:`1-2e^{-k\epsilon^2/8} \le 0` are vacuous and returned as 0.
    """
    if not 0 < eps < 1:
        raise ValueError(f"eps={eps!r} is not supported; accepted values: 0 < eps < 1")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} is not supported; accepted values: an int >= 1")
    q = 1.0 - 2.0 * math.exp(-k * eps * eps / 8.0)
    return max(q, 0.0) ** 2
