"""Angular-margin functions for L-Softmax / A-Softmax (SphereFace) and their additive relatives.

Thesis "Deep Representation Learning on Hypersphere" (W. Liu), Chapter 2 and Part I.
Everything here takes the *cosine* ``c = cos(theta)`` and never calls ``acos`` inside the
autograd graph, so gradients stay finite at ``c = +-1`` (spec sphereface.md §2.2).

- :func:`chebyshev_cos_m`: ``cos(m theta) = T_m(c)`` (Eq. 2.7) by the recurrence
  ``T_0 = 1, T_1 = c, T_{n+1} = 2 c T_n - T_{n-1}``.
- :func:`margin_index`: the segment index ``k`` with ``theta in [k pi/m, (k+1) pi/m]`` (no gradient).
- :func:`psi`: ``psi(theta) = (-1)^k cos(m theta) - 2k`` (Eq. 2.6), continuous, C^1, decreasing.
- :func:`additive_cosine_margin`: ``cos(theta) - m`` (AM-Softmax / CosFace, Part I ``L_a1``).
- :func:`additive_angular_margin`: ``cos(theta + m)`` (ArcFace, Part I ``L_a2``).
- :func:`ga_psi`: SphereNet's GA-Softmax target ``g(m theta - j pi) - 2j`` for any angle function ``g``
  (thesis Eq. 3.11; ``g = cosine`` is :func:`psi`).
- :func:`lambda_schedule`: the λ annealing ``max(lambda_min, base (1 + gamma t)^-power)`` (spec §5).

This module is the one home of every margin formula: the heads of :mod:`lightning_hyper.nn.heads` (A-Softmax,
L-Softmax, NormFace, CosFace, ArcFace, GA-/W-Softmax) only call it.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

from lightning_hyper.functional.checks import argument_error, check_choice, check_number
from lightning_hyper.functional.operators import angle_function, angle_linear, angle_sigmoid, safe_acos

__all__ = [
    "LAMBDA_PRESETS",
    "PSI_MODES",
    "additive_angular_margin",
    "additive_cosine_margin",
    "chebyshev_cos_m",
    "ga_psi",
    "lambda_schedule",
    "margin_index",
    "psi",
    "resolve_lambda_schedule",
]


#: GA-Softmax psi constructions (spherenet spec §4.3).
PSI_MODES: tuple[str, ...] = ("monotonic", "direct")
_M_ACCEPTED = "an int >= 1 (1, 2, 3, 4, ...)"


def check_m(m: Any, owner: str | None = None) -> int:
    """Validate a multiplicative margin: an integer ``m >= 1`` (an integral float is accepted, bools are not).
    A non-number raises ``TypeError``, a number out of range ``ValueError``."""
    if isinstance(m, bool) or not isinstance(m, numbers.Integral):
        if isinstance(m, float) and m.is_integer() and m >= 1:
            return int(m)
        argument_error("m", m, _M_ACCEPTED, owner=owner, exc=TypeError)
    if m < 1:
        argument_error("m", m, _M_ACCEPTED, owner=owner)
    return int(m)


def chebyshev_cos_m(cos: Tensor, m: int) -> Tensor:
    """``cos(m theta)`` as the Chebyshev polynomial ``T_m(cos theta)`` (thesis Eq. 2.7).

    ``T_0 = 1``, ``T_1 = c``, ``T_{n+1} = 2 c T_n - T_{n-1}``. A pure polynomial: the gradient
    ``m U_{m-1}(c)`` is finite everywhere (unlike ``cos(m * acos(c))`` at ``c = +-1``).
    """
    m = check_m(m)
    _check_cos(cos)
    return _chebyshev(cos, m)


def _chebyshev(cos: Tensor, m: int) -> Tensor:
    """``T_m(cos)`` by the three-term recurrence, unchecked: the one Chebyshev expansion of the library."""
    prev, cur = torch.ones_like(cos), cos
    for _ in range(m - 1):
        prev, cur = cur, 2.0 * cos * cur - prev
    return cur


def _check_cos(cos: Tensor) -> None:
    """Reject NaN / Inf cosines: every margin function would silently turn them into NaN logits."""
    if not isinstance(cos, Tensor):
        raise TypeError(f"cos must be a torch.Tensor, got {type(cos).__name__}")
    finite = torch.isfinite(cos)
    if not bool(finite.all()):
        raise ValueError(f"cos contains {int((~finite).sum())} NaN or Inf value(s) (of {cos.numel()}); the margin of "
                         "a non-finite cosine is undefined (non-finite features or class weights upstream?)")


def margin_index(cos: Tensor, m: int) -> Tensor:
    """Segment index ``k`` with ``theta in [k pi/m, (k+1) pi/m]``, computed without gradient.

    ``k = sum_{j=1}^{m-1} [c <= cos(j pi / m)]`` (the thesis's look-up table on ``c``), which
    equals ``clamp(floor(m acos(c) / pi), 0, m-1)`` away from segment boundaries (on a boundary
    either choice gives the same ψ because ψ is continuous). Returned with the dtype of ``cos``.
    """
    m = check_m(m)
    with torch.no_grad():
        c = cos.detach()
        k = torch.zeros_like(c)
        for j in range(1, m):
            k += (c <= math.cos(j * math.pi / m)).to(c.dtype)
    return k


def psi(cos: Tensor, m: int, check_finite: bool = True) -> Tensor:
    """The A-Softmax / L-Softmax margin function of the cosine (thesis Eq. 2.6).

    ``psi = (-1)^k T_m(c) - 2k`` for ``theta = acos(c) in [k pi/m, (k+1) pi/m]``, ``k = 0..m-1``.
    Properties (spec §2.3): ``psi(1) = 1``, ``psi(-1) = 1 - 2m``, continuous and monotonically
    decreasing in ``theta``, ``psi <= cos theta``, ``psi == cos`` for ``m = 1``;
    ``d psi / dc = (-1)^k m U_{m-1}(c)`` is finite on ``[-1, 1]`` (``m^2`` at ``c = +-1``).
    Inputs are clamped to ``[-1, 1]`` in value only (the gradient passes through the clamp, so
    rounding just past ``+-1`` does not zero it). ``check_finite=False`` skips the NaN / Inf check (a NaN cosine
    then gives NaN, element-wise, and no host sync): for the margin heads, whose LightningModules detect and handle
    diverged features themselves (``SphereFaceModule.on_divergence``).
    """
    m = check_m(m)
    if check_finite:
        _check_cos(cos)
    return _psi(cos, m)


def _psi(cos: Tensor, m: int) -> Tensor:
    """:func:`psi` without the finiteness check (a NaN cosine gives NaN, element-wise): for the margin heads,
    whose LightningModules detect and handle diverged features themselves (``SphereFaceModule.on_divergence``)."""
    c = cos - (cos - cos.clamp(-1.0, 1.0)).detach()
    if m == 1:
        return c
    k = margin_index(c, m)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)  # (-1)^k
    return sign * _chebyshev(c, m) - 2.0 * k


def additive_cosine_margin(cos: Tensor, margin: float, check_finite: bool = True) -> Tensor:
    """AM-Softmax / CosFace target cosine ``cos(theta) - margin`` (Part I ``L_a1``, Eq. D.11);
    ``check_finite`` as in :func:`psi`."""
    check_number("margin", margin, low=0.0, low_inclusive=True, owner="additive_cosine_margin")
    if check_finite:
        _check_cos(cos)
    return _additive_cosine(cos, float(margin))


def _additive_cosine(cos: Tensor, margin: float) -> Tensor:
    return cos - margin


def additive_angular_margin(cos: Tensor, margin: float, check_finite: bool = True) -> Tensor:
    """ArcFace target cosine ``cos(theta + margin)`` (Part I ``L_a2``), written without ``acos``.

    ``cos(theta + m) = c cos m - sqrt(1 - c^2) sin m`` for ``theta <= pi - m``; beyond that point
    ``cos(theta + m)`` would increase again, so (as in ArcFace's reference code and
    pytorch-metric-learning) the monotone extension ``c - m sin m`` is used. The ``sqrt`` term has a
    zero (finite) gradient at exactly ``|c| = 1``, where its true derivative is infinite. ``check_finite`` as in
    :func:`psi`.
    """
    check_number("margin", margin, low=0.0, high=math.pi, low_inclusive=True, high_inclusive=False,
                 owner="additive_angular_margin", fix="an angle in radians")
    if check_finite:
        _check_cos(cos)
    return _additive_angular(cos, float(margin))


def _additive_angular(cos: Tensor, m: float) -> Tensor:
    """:func:`additive_angular_margin` without the checks (see :func:`_psi`)."""
    c = cos.clamp(-1.0, 1.0)
    s2 = 1.0 - c * c
    positive = s2 > 0
    sin = torch.where(positive, torch.where(positive, s2, torch.ones_like(s2)).sqrt(), torch.zeros_like(s2))
    shifted = c * math.cos(m) - sin * math.sin(m)
    return torch.where(c >= math.cos(math.pi - m), shifted, c - m * math.sin(m))


def ga_psi(
    cos: Tensor,
    m: int,
    angle_fn: str = "linear",
    k: float | None = None,
    mode: str = "monotonic",
    acos_eps: float = 1e-6,
) -> Tensor:
    """Target-class function ``psi(theta)`` of GA-Softmax (SphereNet, thesis eq. 3.11) from ``cos(theta)``.

    ``monotonic`` (default): ``psi = g(m theta - j pi) - 2j`` with ``j = min(floor(m theta / pi), m-1)``
    (no gradient through ``j``): continuous, strictly decreasing, ``psi(0) = 1``,
    ``psi(pi) = 1 - 2m``; for ``g = cosine`` it is SphereFace's A-Softmax :func:`psi`
    ``(-1)^j cos(m theta) - 2j`` (the Chebyshev polynomial, no arccos in the gradient path), for ``g = linear``
    it equals ``1 - 2 m theta / pi``. ``direct``: the literal ``g(m theta)`` (ablation). ``m = 1`` gives
    ``g(theta)`` (W-Softmax). ``g`` is an angle function of :mod:`lightning_hyper.functional.operators`.
    """
    m = check_m(m, owner="ga_psi")
    check_choice("g", angle_fn, ("linear", "cosine", "sigmoid"), owner="ga_psi")
    check_choice("psi_mode", mode, PSI_MODES, owner="ga_psi")
    if angle_fn == "sigmoid":
        if k is None:
            argument_error("k", k, "a finite number > 0", owner="ga_psi", fix="g='sigmoid' needs a curvature k")
        check_number("k", k, low=0.0, owner="ga_psi")
    if angle_fn == "cosine":
        c = cos.clamp(-1.0, 1.0)
        return _chebyshev(c, m) if mode == "direct" else _psi(c, m)
    theta = safe_acos(cos, acos_eps)
    if mode == "direct":
        return angle_function(theta * m, angle_fn, k)
    if angle_fn == "linear":
        return angle_linear(theta * m)
    with torch.no_grad():
        j = torch.floor(theta * (m / math.pi)).clamp_(0, m - 1)
    return angle_sigmoid(theta * m - j * math.pi, k) - 2.0 * j


# --------------------------------------------------------------------------------------------
# λ annealing (spec §5): f_y = (λ ||W|| ||x|| cos + ||W|| ||x|| psi) / (1 + λ)
# --------------------------------------------------------------------------------------------
LAMBDA_PRESETS: dict[str, dict[str, float]] = {
    # [code] SphereFace-20 prototxt (CASIA, 28k iterations): default for A-Softmax.
    "sphereface": {"base": 1000.0, "gamma": 0.12, "power": 1.0, "lambda_min": 5.0},
    # [code] L-Softmax MNIST prototxt.
    "lsoftmax_mnist": {"base": 1000.0, "gamma": 2.5e-5, "power": 35.0, "lambda_min": 0.0},
    # [code] clcarwin/sphereface_pytorch AngleLoss: max(5, 1500 / (1 + 0.1 it)).
    "pytorch_port": {"base": 1500.0, "gamma": 0.1, "power": 1.0, "lambda_min": 5.0},
    # pytorch-metric-learning behaviour: pure margin logit from the first step.
    "none": {"base": 0.0, "gamma": 0.0, "power": 1.0, "lambda_min": 0.0},
    # λ ≡ base (set base / lambda_min to the constant).
    "constant": {"base": 0.0, "gamma": 0.0, "power": 1.0, "lambda_min": 0.0},
}


def lambda_schedule(
    step: int | float,
    base: float = 1000.0,
    gamma: float = 0.12,
    power: float = 1.0,
    lambda_min: float = 5.0,
) -> float:
    """λ(t) = max(lambda_min, base * (1 + gamma * t) ** -power)  (spec §5, [code] Caffe layer).

    ``t = 1, 2, ...`` counts training iterations (the Caffe layer increments before each forward,
    so the first training step uses ``t = 1``). Defaults are the ``"sphereface"`` preset:
    λ(1) = 892.857, λ(1000) = 8.2645, λ(t >= 1659) = 5.
    """
    for name, value in (("step", step), ("base", base), ("gamma", gamma), ("lambda_min", lambda_min)):
        check_number(name, value, low=0.0, low_inclusive=True, owner="lambda_schedule")
    check_number("power", power, owner="lambda_schedule")
    return max(float(lambda_min), float(base) * (1.0 + float(gamma) * float(step)) ** (-float(power)))


def resolve_lambda_schedule(
    name: str,
    base: float | None = None,
    gamma: float | None = None,
    power: float | None = None,
    lambda_min: float | None = None,
) -> dict[str, float]:
    """Preset ``name`` (a key of :data:`LAMBDA_PRESETS`) with any given value overriding it."""
    check_choice("lambda_schedule", name, sorted(LAMBDA_PRESETS))
    params = dict(LAMBDA_PRESETS[name])
    for key, value in (("base", base), ("gamma", gamma), ("power", power), ("lambda_min", lambda_min)):
        if value is not None:
            params[key] = float(value)
    if name == "constant":  # λ ≡ max(base, lambda_min)
        params["gamma"] = 0.0
    lambda_schedule(1, **params)  # validates
    return params
