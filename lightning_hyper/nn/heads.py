r"""Angular-margin classifier heads: A-Softmax (SphereFace), L-Softmax and their relatives.

One family, :class:`AngularMarginHead`, with named presets (thesis Ch. 2, Part I; spec
``sphereface.md`` §1, §3). Every head is built as ``Head(in_features, num_classes, m, ...)``, owns
the class weights as ``.weight`` of shape ``(num_classes, in_features)`` (rows = classes, like
``nn.Linear``), and ``forward(features, labels=None)`` returns logits:

- ``labels is None`` (inference, accuracy): plain logits, no margin, no λ.
- ``labels`` given: the target logit of each sample gets the margin, λ-annealed (spec §5)

  .. math:: f_{y} = \frac{\lambda\, \|W_y\|\|x\|\cos\theta_y + \|W_y\|\|x\|\,\psi(\theta_y)}{1+\lambda};

  non-target logits are unchanged. The loss is plain ``F.cross_entropy(logits, labels)``.

=====================  ==================  ===============================  ===========================
head                   target ``psi``      non-target logit                 registry names
=====================  ==================  ===============================  ===========================
:class:`LSoftmaxHead`  ψ_m(θ) (Eq. 2.6)    ``W_j · x`` (weights raw)        ``lsoftmax``
:class:`ASoftmaxHead`  ψ_m(θ)              ``‖x‖ cos θ_j`` (‖W_j‖ = 1)      ``asoftmax``, ``sphereface``
ModifiedSoftmaxHead    cos θ (m = 1)       ``‖x‖ cos θ_j``                  ``modified_softmax``
NormFaceHead           cos θ               ``s cos θ_j`` (x normalized)     ``normface``
CosFaceHead            cos θ − m           ``s cos θ_j``                    ``cosface``, ``additive_cosine``
ArcFaceHead            cos(θ + m)          ``s cos θ_j``                    ``arcface``, ``additive_angular``
=====================  ==================  ===============================  ===========================

λ annealing lives in the head: ``head.lambda_`` is the current mix (0 = pure margin logit) and
``head.global_step`` drives it, ``lambda_ = lambda_schedule(global_step + 1)``. A LightningModule
sets ``head.auto_step = False`` and ``head.global_step = trainer.global_step`` before each training
forward (so a resumed run continues the schedule); with ``auto_step = True`` (plain PyTorch, the
default) the head advances ``global_step`` by one after every training-mode forward with labels
under autograd. ``global_step`` is saved in the head's ``state_dict``.

Convergence (the most common trouble in the original repos: loss stuck at 87.3 in Caffe =
saturated softmax, or NaN): the default schedule starts at λ ≈ 900 (≈ plain softmax) and decays to
λ_min = 5 after ~1700 steps; use ``lambda_min=0`` only for easy data. Feature norms grow with the
margin (logits scale with ‖x‖, ψ reaches 1 − 2m), so train with an LR decay and/or gradient
clipping. ``SphereFaceModule`` logs ‖x‖ statistics and reports divergence.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_hyper.functional.margin import (
    additive_angular_margin,
    additive_cosine_margin,
    check_m,
    lambda_schedule,
    psi,
    resolve_lambda_schedule,
)
from lightning_hyper.nn.registry import register_head

__all__ = [
    "AngularMarginHead",
    "ArcFaceHead",
    "ASoftmaxHead",
    "CosFaceHead",
    "LSoftmaxHead",
    "ModifiedSoftmaxHead",
    "NormFaceHead",
]

MARGIN_TYPES = ("multiplicative", "none", "additive_cos", "additive_angle")
WEIGHT_NORM_MODES = ("reparam", "project")
GRADIENT_MODES = ("exact", "caffe_normalized")


def _choice(name: str, value: Any, accepted: tuple[str, ...]) -> str:
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not supported; accepted values: {list(accepted)}")
    return value


class _CaffeASoftmaxFn(torch.autograd.Function):
    """A-Softmax logits with the official Caffe layer's backward (spec §4 [code] deviation).

    Forward is identical to the exact head. Backward: ``dL/dW = G^T x`` (plain inner-product
    weight gradient); for the target logit ``f_y = ‖x‖ ψ(c)`` the exact input gradient
    ``a W_y + b x`` with ``a = ψ'(c)``, ``b = (ψ(c) - c ψ'(c)) / ‖x‖`` is replaced by
    ``(a W_y + b x) / sqrt(a² + b²)`` ("we normalize the scale of gradient"); λ-mixing as in Caffe.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w_hat: Tensor, labels: Tensor, m: int, lam: float, eps: float) -> Tensor:
        wx = x @ w_hat.T
        idx = labels[:, None]
        xn = x.norm(dim=1, keepdim=True)
        wx_y = wx.gather(1, idx)
        c = (wx_y / xn.clamp_min(eps)).clamp(-1.0, 1.0)
        p = psi(c, m, check_finite=False)
        f_y = (lam * wx_y + xn * p) / (1.0 + lam)
        ctx.save_for_backward(x, w_hat, labels, c, p, xn)
        ctx.m, ctx.lam, ctx.eps = m, lam, eps
        return wx.scatter(1, idx, f_y)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w_hat, labels, c, p, xn = ctx.saved_tensors
        m, lam, eps = ctx.m, ctx.lam, ctx.eps
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = g.T @ x
        if ctx.needs_input_grad[0]:
            with torch.enable_grad():
                cc = c.detach().requires_grad_(True)
                (dpsi,) = torch.autograd.grad(psi(cc, m, check_finite=False).sum(), cc)
            a = dpsi
            b = (p - c * dpsi) / xn.clamp_min(eps)
            norm = (a * a + b * b).sqrt().clamp_min(eps)
            w_y = w_hat[labels]
            g_y = g.gather(1, labels[:, None]) / (1.0 + lam)
            grad_x = g @ w_hat + g_y * ((a * w_y + b * x) / norm - w_y)
        return grad_x, grad_w, None, None, None, None


class AngularMarginHead(nn.Module):
    r"""Classifier head with an angular margin on the target logit (spec §3).

    Args:
        in_features: feature (embedding) dimension ``D``.
        num_classes: number of classes ``K``; ``weight`` has shape ``(K, D)``.
        m: the margin. ``multiplicative``: integer ``m >= 1`` (ψ of Eq. 2.6); ``additive_cos``:
            cosine margin (CosFace ``m``); ``additive_angle``: angle margin in radians (ArcFace);
            ignored for ``margin_type="none"``.
        margin_type: one of ``"multiplicative"``, ``"none"``, ``"additive_cos"``, ``"additive_angle"``.
        normalize_weight: ``‖W_j‖ = 1`` (A-Softmax) or raw weights (L-Softmax).
        weight_norm_mode: ``"reparam"`` (normalize inside forward, differentiable) or ``"project"``
            (renormalize the stored rows in place before each training forward, as the Caffe code).
        bias: add a learnable per-class bias to every logit (Table A.1 ablation; default off).
        feature_scale: ``None`` (logits scale with ``‖x‖``) or ``s`` (features normalized to norm s:
            sphere-normalized variant).
        lambda_schedule: λ preset (``"sphereface"``, ``"lsoftmax_mnist"``, ``"pytorch_port"``,
            ``"none"``, ``"constant"``); ``lambda_base``, ``lambda_gamma``, ``lambda_power``,
            ``lambda_min`` override its values.
        gradient_mode: ``"exact"`` (autograd of the thesis formulas, default) or
            ``"caffe_normalized"`` (the official Caffe layer's normalized pseudo-gradient; A-Softmax only).
        eps: lower clamp of ``‖x‖ ‖W_y‖`` when computing the cosine.
    """

    needs_labels = True
    hyperspherical_layer = True

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        m: float = 4,
        margin_type: str = "multiplicative",
        normalize_weight: bool = True,
        weight_norm_mode: str = "reparam",
        bias: bool = False,
        feature_scale: float | None = None,
        lambda_schedule: str = "sphereface",
        lambda_base: float | None = None,
        lambda_gamma: float | None = None,
        lambda_power: float | None = None,
        lambda_min: float | None = None,
        gradient_mode: str = "exact",
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.margin_type = _choice("margin_type", margin_type, MARGIN_TYPES)
        self.weight_norm_mode = _choice("weight_norm_mode", weight_norm_mode, WEIGHT_NORM_MODES)
        self.gradient_mode = _choice("gradient_mode", gradient_mode, GRADIENT_MODES)
        if margin_type == "multiplicative":
            self.m: float = check_m(m)
        elif margin_type == "additive_cos":
            additive_cosine_margin(torch.zeros(1), m)  # validates
            self.m = float(m)
        elif margin_type == "additive_angle":
            additive_angular_margin(torch.zeros(1), m)  # validates
            self.m = float(m)
        else:
            self.m = 1
        if feature_scale is not None and (not isinstance(feature_scale, numbers.Real) or feature_scale <= 0):
            raise ValueError(f"feature_scale must be None or a positive number, got {feature_scale!r}")
        self.feature_scale = None if feature_scale is None else float(feature_scale)
        self.normalize_weight = bool(normalize_weight)
        if gradient_mode == "caffe_normalized" and not (
            margin_type == "multiplicative" and self.normalize_weight and feature_scale is None and not bias
        ):
            raise ValueError(
                "gradient_mode='caffe_normalized' reproduces the SphereFace Caffe layer and needs "
                "margin_type='multiplicative', normalize_weight=True, feature_scale=None, bias=False"
            )
        if gradient_mode == "caffe_normalized" and self.weight_norm_mode != "project":
            warnings.warn(
                f"gradient_mode='caffe_normalized' with weight_norm_mode={self.weight_norm_mode!r} is not the Caffe "
                "layer: Caffe renormalizes the stored rows and applies the plain weight gradient G^T x to them, while "
                "'reparam' sends that gradient through the normalization's Jacobian (only the input gradient is "
                "Caffe's). Pass weight_norm_mode='project' to reproduce the Caffe layer", UserWarning, stacklevel=2)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.in_features))
        self.bias = nn.Parameter(torch.zeros(self.num_classes)) if bias else None
        self._schedule = resolve_lambda_schedule(
            lambda_schedule, lambda_base, lambda_gamma, lambda_power, lambda_min
        )
        self.lambda_schedule = lambda_schedule
        self.lambda_: float = 0.0
        self.auto_step = True
        self._global_step = 0
        self.global_step = 0
        self.reset_parameters()

    # ----------------------------------------------------------------------------------- λ
    @property
    def global_step(self) -> int:
        """Training-step counter driving λ: ``lambda_ = lambda_schedule(global_step + 1)``."""
        return self._global_step

    @global_step.setter
    def global_step(self, step: int) -> None:
        self._global_step = int(step)
        self.lambda_ = lambda_schedule(self._global_step + 1, **self._schedule)

    def lambda_at(self, step: int) -> float:
        """λ this head uses at training step ``step`` (0-based, like ``trainer.global_step``)."""
        return lambda_schedule(int(step) + 1, **self._schedule)

    def get_extra_state(self) -> dict[str, int]:
        return {"global_step": self._global_step}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.global_step = int(state.get("global_step", 0))

    # ------------------------------------------------------------------------------ params
    def reset_parameters(self) -> None:
        """Xavier-uniform class weights ([code] Caffe ``weight_filler: xavier``), zero bias."""
        nn.init.xavier_uniform_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def class_weights(self) -> Tensor:
        """The weights the logits use: row-normalized if ``normalize_weight``."""
        if not self.normalize_weight:
            return self.weight
        if self.weight_norm_mode == "project" and self.training and torch.is_grad_enabled():
            # in place on .data (no version bump): a second forward before backward stays valid
            self.weight.data.copy_(F.normalize(self.weight.data, dim=1))
            return self.weight
        return F.normalize(self.weight, dim=1)

    def _check_inputs(self, features: Tensor, labels: Tensor | None) -> None:
        if not isinstance(features, Tensor) or features.dim() != 2:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"features must have shape (batch, in_features={self.in_features}), got {shape}")
        if features.shape[1] != self.in_features:
            raise ValueError(
                f"features have dimension {features.shape[1]} but the head expects in_features={self.in_features} "
                f"(weight shape {tuple(self.weight.shape)})"
            )
        if labels is None:
            return
        if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor of class indices, got {getattr(labels, 'dtype', labels)}")
        if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
            raise ValueError(f"labels must have shape ({features.shape[0]},), got {tuple(labels.shape)}")
        if labels.numel():
            low, high = (int(v) for v in torch.stack(torch.aminmax(labels)).tolist())  # one host sync
            if low < 0 or high >= self.num_classes:
                raise ValueError(f"labels must lie in [0, num_classes - 1] = [0, {self.num_classes - 1}], got "
                                 f"range [{low}, {high}]")

    def _target_function(self, cos: Tensor) -> Tensor:
        # unchecked forms: non-finite features give non-finite logits, which the training module detects
        # (SphereFaceModule.on_divergence) -- no extra host sync per forward
        if self.margin_type == "multiplicative":
            return psi(cos, int(self.m), check_finite=False)
        if self.margin_type == "additive_cos":
            return additive_cosine_margin(cos, self.m, check_finite=False)
        if self.margin_type == "additive_angle":
            return additive_angular_margin(cos, self.m, check_finite=False)
        return cos

    # ----------------------------------------------------------------------------- forward
    def forward(self, features: Tensor, labels: Tensor | None = None) -> Tensor:
        """Logits ``(B, K)``; the margin is applied to the target class only when ``labels`` are given."""
        self._check_inputs(features, labels)
        x = features
        if self.feature_scale is not None:
            x = self.feature_scale * F.normalize(x, dim=1)
        lam = float(self.lambda_)
        use_margin = labels is not None and self.margin_type != "none" and not math.isinf(lam)
        if use_margin and self.gradient_mode == "caffe_normalized":
            w = self.class_weights()
            logits = _CaffeASoftmaxFn.apply(x, w, labels.long(), int(self.m), lam, self.eps)
        else:
            if self.normalize_weight and self.weight_norm_mode == "reparam":
                # x · W_j / ||W_j||: scale the (B, K) logits instead of normalizing the (K, D) weight, whose
                # autograd backward would cost several passes over K x D
                w = self.weight
                logits = F.linear(x, w) * torch.linalg.vector_norm(w, dim=1).clamp_min(1e-12).reciprocal()
            else:
                w = self.class_weights()
                logits = F.linear(x, w)  # W_j · x  (= ||x|| cos θ_j when ||W_j|| = 1)
            if use_margin:
                idx = labels.long()[:, None]
                wx_y = logits.gather(1, idx)
                if self.feature_scale is not None:
                    xn = x.new_full((x.shape[0], 1), self.feature_scale)
                else:
                    xn = x.norm(dim=1, keepdim=True)
                mag = xn if self.normalize_weight else xn * w[labels].norm(dim=1, keepdim=True)
                cos = (wx_y / mag.clamp_min(self.eps)).clamp(-1.0, 1.0)
                f_y = (lam * wx_y + mag * self._target_function(cos)) / (1.0 + lam)
                logits = logits.scatter(1, idx, f_y)
        if self.bias is not None:
            logits = logits + self.bias
        if use_margin and self.auto_step and self.training and torch.is_grad_enabled():
            self.global_step = self._global_step + 1  # plain-PyTorch use (a LightningModule drives it)
        return logits

    def extra_repr(self) -> str:
        s = (
            f"in_features={self.in_features}, num_classes={self.num_classes}, margin_type={self.margin_type!r}, "
            f"m={self.m}, normalize_weight={self.normalize_weight}, bias={self.bias is not None}"
        )
        if self.feature_scale is not None:
            s += f", feature_scale={self.feature_scale}"
        if self.margin_type != "none":
            s += f", lambda_schedule={self.lambda_schedule!r}, lambda_={self.lambda_:.4g}"
        return s


# ----------------------------------------------------------------------------------- presets
@register_head("asoftmax")
@register_head("sphereface")
class ASoftmaxHead(AngularMarginHead):
    r"""A-Softmax (SphereFace, thesis Eq. 2.20): ``‖W_j‖ = 1``, no bias, logits ``‖x‖ cos θ_j``,
    target ``‖x‖ ψ_m(θ_y)`` (λ-annealed). ``m = 1`` is the modified softmax (Eq. 2.18)."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        m: int = 4,
        weight_norm_mode: str = "reparam",
        feature_scale: float | None = None,
        lambda_schedule: str = "sphereface",
        lambda_base: float | None = None,
        lambda_gamma: float | None = None,
        lambda_power: float | None = None,
        lambda_min: float | None = None,
        gradient_mode: str = "exact",
        eps: float = 1e-12,
    ) -> None:
        super().__init__(
            in_features, num_classes, m, margin_type="multiplicative", normalize_weight=True,
            weight_norm_mode=weight_norm_mode, bias=False, feature_scale=feature_scale,
            lambda_schedule=lambda_schedule, lambda_base=lambda_base, lambda_gamma=lambda_gamma,
            lambda_power=lambda_power, lambda_min=lambda_min, gradient_mode=gradient_mode, eps=eps,
        )


@register_head("lsoftmax")
class LSoftmaxHead(AngularMarginHead):
    r"""L-Softmax (thesis Eq. 2.4): raw weights, logits ``W_j · x``, target ``‖W_y‖ ‖x‖ ψ_m(θ_y)``
    (λ-annealed). ``m = 1`` is softmax without bias."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        m: int = 4,
        bias: bool = False,
        lambda_schedule: str = "sphereface",
        lambda_base: float | None = None,
        lambda_gamma: float | None = None,
        lambda_power: float | None = None,
        lambda_min: float | None = None,
        eps: float = 1e-12,
    ) -> None:
        super().__init__(
            in_features, num_classes, m, margin_type="multiplicative", normalize_weight=False,
            bias=bias, feature_scale=None, lambda_schedule=lambda_schedule, lambda_base=lambda_base,
            lambda_gamma=lambda_gamma, lambda_power=lambda_power, lambda_min=lambda_min, eps=eps,
        )


@register_head("modified_softmax")
class ModifiedSoftmaxHead(AngularMarginHead):
    r"""Weight-normalized ("modified") softmax (thesis Eq. 2.18): logits ``‖x‖ cos θ_j``, no margin."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        m: int = 1,
        weight_norm_mode: str = "reparam",
        feature_scale: float | None = None,
        eps: float = 1e-12,
    ) -> None:
        if m != 1:
            raise ValueError(f"ModifiedSoftmaxHead has no margin: m must be 1, got {m!r} (use ASoftmaxHead)")
        super().__init__(
            in_features, num_classes, 1, margin_type="none", normalize_weight=True,
            weight_norm_mode=weight_norm_mode, feature_scale=feature_scale, lambda_schedule="none", eps=eps,
        )


@register_head("normface")
class NormFaceHead(AngularMarginHead):
    r"""Sphere-normalized softmax (NormFace, Part I ``L_s``): logits ``s cos θ_j``, no margin."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        m: float = 0.0,
        feature_scale: float = 16.0,
        weight_norm_mode: str = "reparam",
        eps: float = 1e-12,
    ) -> None:
        if m != 0:
            raise ValueError(f"NormFaceHead has no margin: m must be 0, got {m!r} (use CosFaceHead/ArcFaceHead)")
        super().__init__(
            in_features, num_classes, 1, margin_type="none", normalize_weight=True,
            weight_norm_mode=weight_norm_mode, feature_scale=feature_scale, lambda_schedule="none", eps=eps,
        )


@register_head("cosface")
@register_head("additive_cosine")
@register_head("am_softmax")
class CosFaceHead(AngularMarginHead):
    r"""Additive cosine margin (AM-Softmax / CosFace, Part I ``L_a1``, Eq. D.11): logits
    ``s cos θ_j``, target ``s (cos θ_y - m)``. Defaults ``m = 0.35``, ``s = 64`` (CosFace paper)."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        m: float = 0.35,
        feature_scale: float | None = 64.0,
        weight_norm_mode: str = "reparam",
        lambda_schedule: str = "none",
        lambda_base: float | None = None,
        lambda_gamma: float | None = None,
        lambda_power: float | None = None,
        lambda_min: float | None = None,
        eps: float = 1e-12,
    ) -> None:
        super().__init__(
            in_features, num_classes, m, margin_type="additive_cos", normalize_weight=True,
            weight_norm_mode=weight_norm_mode, feature_scale=feature_scale, lambda_schedule=lambda_schedule,
            lambda_base=lambda_base, lambda_gamma=lambda_gamma, lambda_power=lambda_power,
            lambda_min=lambda_min, eps=eps,
        )


@register_head("arcface")
@register_head("additive_angular")
class ArcFaceHead(AngularMarginHead):
    r"""Additive angular margin (ArcFace, Part I ``L_a2``): logits ``s cos θ_j``, target
    ``s cos(θ_y + m)`` (monotone extension past ``θ = π - m``). Defaults ``m = 0.5`` rad, ``s = 64``."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        m: float = 0.5,
        feature_scale: float | None = 64.0,
        weight_norm_mode: str = "reparam",
        lambda_schedule: str = "none",
        lambda_base: float | None = None,
        lambda_gamma: float | None = None,
        lambda_power: float | None = None,
        lambda_min: float | None = None,
        eps: float = 1e-12,
    ) -> None:
        super().__init__(
            in_features, num_classes, m, margin_type="additive_angle", normalize_weight=True,
            weight_norm_mode=weight_norm_mode, feature_scale=feature_scale, lambda_schedule=lambda_schedule,
            lambda_base=lambda_base, lambda_gamma=lambda_gamma, lambda_power=lambda_power,
            lambda_min=lambda_min, eps=eps,
        )


register_head("angular_margin")(AngularMarginHead)
