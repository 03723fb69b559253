"""Decoupled operators of DCNet (thesis Ch. 4, "Decoupled Networks"): DecoupledConv1d/2d/3d, DecoupledLinear.

``f(w, x) = h(||w||, ||x||) * g(theta(w, x))`` (eq. 4.3): a *magnitude function* ``h`` (intra-class
variation) times an *angular activation* ``g`` (semantic difference). Subclasses of the matching
``torch.nn`` layers (same ``weight`` / ``bias`` keys: a plain CNN's ``state_dict`` loads with
``strict=False``, only the radius / curvature parameters and the patch-norm buffers are extra).

``magnitude`` (config names of the DCNet spec; paper names such as ``"TanhConv"`` are accepted too):

=========  ========================================================  ==================
name       h(||x||)                                                   paper
=========  ========================================================  ==================
sphere     alpha                                                      SphereConv (4.4)
ball       alpha * min(||x||, rho') / rho'                            BallConv (4.5)
tanh       alpha * tanh(||x|| / rho')                                 TanhConv (4.6)
linear     alpha * ||x||                                              LinearConv (4.7)
seg        alpha||x|| below rho', seg_beta||x|| + (alpha-seg_beta)rho' SegConv (4.8)
log        alpha * log(1 + ||x||)                                     LogConv (4.9)
mix        alpha ||x|| + mix_log_weight * log(1 + ||x||)              MixConv (4.10)
=========  ========================================================  ==================

``angular``: ``linear`` (4.11), ``cosine`` (4.12), ``sigmoid`` (4.13, curvature ``sigmoid_k``),
``sqcos`` (square cosine ``sign(cos) cos^2``, 4.14), ``relu_cos`` (``max(0, cos)``), ``learnable``
(sigmoid with a trained per-filter k, same as ``learn_k=True``).

Operator radius (ball, tanh, seg): ``rho' = rho * E{||x||}`` with ``rho`` learnable per output
channel (``rho = r^2 + 1e-4``, init ``radius_init``) and ``E{||x||}`` the mean patch norm -- the batch
mean in training (differentiable, like BN) and a running average in eval (App. C.2).

``weighted`` (§4.3.3): ``none`` (standard operator, forward independent of ``||w||``), ``linear``
(``||w|| h``), ``nonlinear_joint`` (eq. 4.15, tanh only), ``nonlinear_separate`` (eq. 4.16, tanh only).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_hyper.functional.checks import check_choice, check_number
from lightning_hyper.functional.operators import (
    ANGULAR_ACTIVATIONS,
    MAGNITUDE_FNS,
    RADIUS_MAGNITUDES,
    add_channel_bias,
    check_weighted,
    decoupled_combine,
    linear_parts,
    normalized_conv,
)

__all__ = [
    "DecoupledMixin",
    "DecoupledConv1d",
    "DecoupledConv2d",
    "DecoupledConv3d",
    "DecoupledLinear",
    "RADIUS_PARAMS",
    "canonical_angular",
    "canonical_magnitude",
]

#: Positive parametrizations of the learnable operator radius.
RADIUS_PARAMS: tuple[str, ...] = ("square", "softplus", "exp")
RADIUS_GRANULARITY: tuple[str, ...] = ("channel", "layer")
_RADIUS_FLOOR = 1e-4

_MAGNITUDE_ALIASES = {
    "sphereconv": "sphere", "ballconv": "ball", "tanhconv": "tanh", "linearconv": "linear", "segconv": "seg",
    "logconv": "log", "mixconv": "mix",
}
_ANGULAR_ALIASES = {
    "cos": "cosine", "square_cosine": "sqcos", "square-cosine": "sqcos", "squarecosine": "sqcos",
    "sq_cos": "sqcos", "square_cos": "sqcos",
}


def canonical_magnitude(name: str) -> str:
    """Map a magnitude name (``"tanh"`` or the paper's ``"TanhConv"``) to its config name; else ValueError."""
    key = name.lower() if isinstance(name, str) else name
    key = _MAGNITUDE_ALIASES.get(key, key)
    return check_choice("magnitude", key, MAGNITUDE_FNS)


def canonical_angular(name: str) -> str:
    """Map an angular activation name (``"sqcos"``, ``"square_cosine"``, ...) to its config name."""
    key = name.lower() if isinstance(name, str) else name
    key = _ANGULAR_ALIASES.get(key, key)
    return check_choice("angular", key, ANGULAR_ACTIVATIONS)


#: The options of every decoupled layer, passed by keyword to ``DecoupledMixin._setup_decoupled``.
_DECOUPLED_OPTIONS: tuple[str, ...] = (
    "magnitude", "angular", "alpha", "seg_beta", "mix_log_weight", "weighted", "learn_radius", "radius_init",
    "radius_param", "radius_granularity", "radius_norm", "radius_norm_momentum", "radius_norm_detach", "sigmoid_k",
    "learn_k", "k_min", "eps", "acos_eps",
)


def _decoupled_options(arguments: dict[str, Any]) -> dict[str, Any]:
    """The decoupled options among a constructor's ``locals()``, by name."""
    return {name: arguments[name] for name in _DECOUPLED_OPTIONS}


def debiased_weight(momentum: float, t: int) -> float:
    """Weight of batch ``t`` (1-based) in a zero-debiased moving average (Adam's bias correction).

    The biased average ``m_t = β m_{t-1} + (1-β) x_t`` (``β = 1 - momentum``, ``m_0 = 0``) divided by
    ``1 - β^t`` is ``e_t = e_{t-1} + w_t (x_t - e_{t-1})`` with ``w_t = (1-β) / (1-β^t)``: ``w_1 = 1`` (the first
    batch is copied), and after ``t`` batches batch ``k`` holds its geometric share
    ``(1-β) β^{t-k} / (1-β^t)`` of the estimate. ``momentum = 0`` is the limit ``w_t = 1/t`` (the plain mean
    of all batches).
    """
    if t < 1:
        raise ValueError(f"t={t!r}: batches are counted from 1")
    if t == 1:
        return 1.0
    if momentum <= 0.0:
        return 1.0 / t
    beta = 1.0 - momentum
    return momentum / -math.expm1(t * math.log(beta)) if beta > 0.0 else 1.0


class DecoupledMixin:
    """Shared construction/forward of the decoupled layers."""

    hyperspherical_layer = True
    num_batches_tracked: Tensor
    patch_norm_mean: Tensor

    def _setup_decoupled(
        self,
        out_features: int,
        *,
        magnitude: str,
        angular: str,
        alpha: float,
        seg_beta: float,
        mix_log_weight: float,
        weighted: str,
        learn_radius: bool,
        radius_init: float,
        radius_param: str,
        radius_granularity: str,
        radius_norm: bool,
        radius_norm_momentum: float,
        radius_norm_detach: bool,
        sigmoid_k: float,
        learn_k: bool,
        k_min: float,
        eps: float,
        acos_eps: float,
    ) -> None:
        self.magnitude = canonical_magnitude(magnitude)
        angular = canonical_angular(angular)
        if angular == "learnable":
            angular, learn_k = "sigmoid", True
        self.angular = angular
        self.weighted = check_weighted(weighted, self.magnitude)
        self.alpha = check_number("alpha", alpha, low=0.0, low_inclusive=self.magnitude == "mix")
        self.seg_beta = check_number("seg_beta", seg_beta, low=0.0, low_inclusive=True)
        self.mix_log_weight = check_number("mix_log_weight", mix_log_weight, low=0.0, low_inclusive=True)
        self.eps = check_number("eps", eps, low=0.0, low_inclusive=True)
        self.acos_eps = check_number("acos_eps", acos_eps, low=0.0, high=0.5)
        self.has_radius = self.magnitude in RADIUS_MAGNITUDES
        self.radius_param = check_choice("radius_param", radius_param, RADIUS_PARAMS)
        self.radius_granularity = check_choice("radius_granularity", radius_granularity, RADIUS_GRANULARITY)
        self.learn_radius = bool(learn_radius) and self.has_radius
        self.radius_norm = bool(radius_norm) and self.has_radius
        self.radius_norm_momentum = check_number("radius_norm_momentum", radius_norm_momentum, low=0.0, high=1.0)
        self.radius_norm_detach = bool(radius_norm_detach)
        if self.has_radius:
            r0 = check_number("radius_init", radius_init, low=_RADIUS_FLOOR)
            n = out_features if self.radius_granularity == "channel" else 1
            raw = torch.full((n,), self._radius_inverse(r0))
            if self.learn_radius:
                self.radius_raw = nn.Parameter(raw)
            else:
                self.register_buffer("radius_raw", raw)
        if self.radius_norm:
            self.register_buffer("patch_norm_mean", torch.ones(()))
            self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))
        self.learn_k = bool(learn_k) and self.angular == "sigmoid"
        self.k_min = check_number("k_min", k_min, low=0.0, low_inclusive=not self.learn_k)
        self.sigmoid_k = check_number("sigmoid_k", sigmoid_k, low=self.k_min if self.learn_k else 0.0)
        if self.learn_k:
            self.k_raw = nn.Parameter(torch.full((out_features,), self.sigmoid_k - self.k_min))
        self.fast = True
        self.last_patch_norm_mean: Tensor | None = None

    # -- parametrizations -------------------------------------------------------------------------
    def _radius_inverse(self, rho: float) -> float:
        if self.radius_param == "square":
            return math.sqrt(rho - _RADIUS_FLOOR)
        if self.radius_param == "softplus":
            v = rho - _RADIUS_FLOOR
            return v + math.log(-math.expm1(-v))  # inverse softplus
        return math.log(rho - _RADIUS_FLOOR)

    @property
    def radius(self) -> Tensor | None:
        """The operator radius ``rho`` (before multiplying by ``E{||x||}``), ``(C_out,)`` or ``(1,)``."""
        if not self.has_radius:
            return None
        r = self.radius_raw
        if self.radius_param == "square":
            return r * r + _RADIUS_FLOOR
        if self.radius_param == "softplus":
            return F.softplus(r) + _RADIUS_FLOOR
        return torch.exp(r) + _RADIUS_FLOOR

    @property
    def k(self) -> Tensor | float | None:
        """Sigmoid curvature: a float, ``|k_raw| + k_min`` when learned, None for other activations."""
        if self.learn_k:
            return self.k_raw.abs() + self.k_min
        return self.sigmoid_k if self.angular == "sigmoid" else None

    def _beta(self) -> float | None:
        return self.seg_beta if self.magnitude == "seg" else self.mix_log_weight if self.magnitude == "mix" else None

    def _radius_scale(self) -> Tensor | str | None:
        if not self.radius_norm:
            return None
        if self.training:
            return "batch_detached" if self.radius_norm_detach else "batch"
        return self.patch_norm_mean

    def _update_running_mean(self, batch_mean: Tensor | None) -> None:
        if batch_mean is None:
            return
        self.last_patch_norm_mean = batch_mean.detach()
        if not self.training:
            return
        with torch.no_grad():
            m = batch_mean.detach().to(self.patch_norm_mean.dtype)
            self.num_batches_tracked += 1
            self.patch_norm_mean.lerp_(m, debiased_weight(self.radius_norm_momentum, int(self.num_batches_tracked)))

    def _combine(self, inner: Tensor, xn: Tensor | None, wn: Tensor, linear: bool) -> Tensor:
        rho = self.radius
        weighted = self.weighted
        out, batch_mean = decoupled_combine(
            inner, xn, wn, self.magnitude, self.angular, self.alpha, rho, self._beta(), self.k, weighted,
            rho if weighted == "nonlinear_separate" else None, self._radius_scale(), self.acos_eps, self.fast,
            linear=linear,
        )
        self._update_running_mean(batch_mean)
        return out

    def _needs_patch_norms(self) -> bool:
        return not (
            self.fast and self.angular == "cosine" and self.magnitude == "linear" and self.weighted == "none"
        ) or self.radius_norm

    def _decoupled_extra_repr(self) -> str:
        s = f", magnitude={self.magnitude!r}, angular={self.angular!r}, alpha={self.alpha}"
        if self.magnitude == "seg":
            s += f", seg_beta={self.seg_beta}"
        if self.magnitude == "mix":
            s += f", mix_log_weight={self.mix_log_weight}"
        if self.weighted != "none":
            s += f", weighted={self.weighted!r}"
        if self.has_radius:
            s += f", learn_radius={self.learn_radius}, radius_norm={self.radius_norm}"
        if self.angular == "sigmoid":
            s += f", sigmoid_k={self.sigmoid_k}, learn_k={self.learn_k}"
        return s


_DecoupledMixin = DecoupledMixin  # the name callbacks imported before it was public


class _DecoupledConvNd(DecoupledMixin):
    def forward(self, x: Tensor) -> Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        inner, xn, wn = normalized_conv(
            x, self.weight, self.stride, padding, self.dilation, self.groups, self.eps,
            need_patch_norms=self._needs_patch_norms(),
        )
        return add_channel_bias(self._combine(inner, xn, wn, linear=False), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._decoupled_extra_repr()


_DC_DOC = """
    Args (beyond those of ``nn.{base}``; ``bias`` defaults to False, a BN layer follows):
        magnitude: ``"sphere" | "ball" | "tanh" | "linear" | "seg" | "log" | "mix"`` (or the paper names
            ``"SphereConv"``, ``"BallConv"``, ...).
        angular: ``"linear" | "cosine" | "sigmoid" | "sqcos" | "relu_cos" | "learnable"``.
        alpha: output scale (> 0; >= 0 for mix). seg_beta: SegConv slope above the radius (>= 0).
        mix_log_weight: MixConv weight of the log term (>= 0).
        weighted: ``"none" | "linear" | "nonlinear_joint" | "nonlinear_separate"`` (nonlinear: tanh only).
        learn_radius, radius_init, radius_param (``"square" | "softplus" | "exp"``), radius_granularity
            (``"channel" | "layer"``): the operator radius rho of ball / tanh / seg (learned by default, init 1).
        radius_norm, radius_norm_momentum, radius_norm_detach: ``rho' = rho * E{{||x||}}`` (App. C.2); batch
            mean in training (differentiable unless detached), in eval a moving average of the batch means,
            zero-debiased as the original code's (each batch keeps its geometric share; see ``debiased_weight``).
        sigmoid_k, learn_k, k_min: sigmoid curvature (> 0); learned per filter as ``|k_raw| + k_min``.
        eps: inside both norms' square roots. acos_eps: arccos clamp (gradient capped, never infinite).
"""


def _conv_signature_doc(base: str) -> str:
    return (
        f"Decoupled convolution ``h(||w||, ||x||) g(theta)`` (thesis eq. 4.3), a subclass of ``nn.{base}``."
        + _DC_DOC.format(base=base)
    )


class DecoupledConv1d(_DecoupledConvNd, nn.Conv1d):
    __doc__ = _conv_signature_doc("Conv1d")

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
        dilation: Any = 1, groups: int = 1, bias: bool = False, padding_mode: str = "zeros", device: Any = None,
        dtype: Any = None, *, magnitude: str = "tanh", angular: str = "cosine", alpha: float = 1.0,
        seg_beta: float = 0.5, mix_log_weight: float = 1.0, weighted: str = "none", learn_radius: bool = True,
        radius_init: float = 1.0, radius_param: str = "square", radius_granularity: str = "channel",
        radius_norm: bool = True, radius_norm_momentum: float = 1e-3, radius_norm_detach: bool = False,
        sigmoid_k: float = 0.3, learn_k: bool = False, k_min: float = 0.05, eps: float = 1e-4,
        acos_eps: float = 1e-6,
    ) -> None:
        nn.Conv1d.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device, dtype,
        )
        self._setup_decoupled(out_channels, **_decoupled_options(locals()))


class DecoupledConv2d(_DecoupledConvNd, nn.Conv2d):
    __doc__ = _conv_signature_doc("Conv2d")

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
        dilation: Any = 1, groups: int = 1, bias: bool = False, padding_mode: str = "zeros", device: Any = None,
        dtype: Any = None, *, magnitude: str = "tanh", angular: str = "cosine", alpha: float = 1.0,
        seg_beta: float = 0.5, mix_log_weight: float = 1.0, weighted: str = "none", learn_radius: bool = True,
        radius_init: float = 1.0, radius_param: str = "square", radius_granularity: str = "channel",
        radius_norm: bool = True, radius_norm_momentum: float = 1e-3, radius_norm_detach: bool = False,
        sigmoid_k: float = 0.3, learn_k: bool = False, k_min: float = 0.05, eps: float = 1e-4,
        acos_eps: float = 1e-6,
    ) -> None:
        nn.Conv2d.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device, dtype,
        )
        self._setup_decoupled(out_channels, **_decoupled_options(locals()))


class DecoupledConv3d(_DecoupledConvNd, nn.Conv3d):
    __doc__ = _conv_signature_doc("Conv3d")

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
        dilation: Any = 1, groups: int = 1, bias: bool = False, padding_mode: str = "zeros", device: Any = None,
        dtype: Any = None, *, magnitude: str = "tanh", angular: str = "cosine", alpha: float = 1.0,
        seg_beta: float = 0.5, mix_log_weight: float = 1.0, weighted: str = "none", learn_radius: bool = True,
        radius_init: float = 1.0, radius_param: str = "square", radius_granularity: str = "channel",
        radius_norm: bool = True, radius_norm_momentum: float = 1e-3, radius_norm_detach: bool = False,
        sigmoid_k: float = 0.3, learn_k: bool = False, k_min: float = 0.05, eps: float = 1e-4,
        acos_eps: float = 1e-6,
    ) -> None:
        nn.Conv3d.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device, dtype,
        )
        self._setup_decoupled(out_channels, **_decoupled_options(locals()))


class DecoupledLinear(DecoupledMixin, nn.Linear):
    __doc__ = (
        "Decoupled fully connected layer ``h(||W_i||, ||x||) g(theta(W_i, x))`` (thesis §4.3, DCLinear), a subclass "
        "of ``nn.Linear``; input ``(..., in_features)``, ``E{||x||}`` = batch mean of ``||x||``."
        + _DC_DOC.format(base="Linear")
    )

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, device: Any = None, dtype: Any = None, *,
        magnitude: str = "tanh", angular: str = "cosine", alpha: float = 1.0, seg_beta: float = 0.5,
        mix_log_weight: float = 1.0, weighted: str = "none", learn_radius: bool = True, radius_init: float = 1.0,
        radius_param: str = "square", radius_granularity: str = "channel", radius_norm: bool = True,
        radius_norm_momentum: float = 1e-3, radius_norm_detach: bool = False, sigmoid_k: float = 0.3,
        learn_k: bool = False, k_min: float = 0.05, eps: float = 1e-4, acos_eps: float = 1e-6,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self._setup_decoupled(out_features, **_decoupled_options(locals()))

    def forward(self, x: Tensor) -> Tensor:
        inner, xn, wn = linear_parts(x, self.weight, self.eps)
        out = self._combine(inner, xn, wn, linear=True)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._decoupled_extra_repr()


DecoupledOperator = _DecoupledMixin  # public name of the base of every Decoupled* layer (isinstance checks, callbacks)
