r"""The one margin-head family: A-Softmax (SphereFace), L-Softmax, their relatives and SphereNet's GA-/W-Softmax.

One base, :class:`MarginHead`; :class:`AngularMarginHead` with named presets (thesis Ch. 2, Part I; spec
``sphereface.md`` §1, §3) and the GA-/W-Softmax heads (thesis §3.3) are its subclasses. Every head is
built as ``Head(in_features, num_classes, m, ...)``, owns the class weights as ``.weight`` of shape
``(num_classes, in_features)`` (rows = classes, like
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
GASoftmaxHead          ga_psi (Eq. 3.11)   ``‖x‖ g(θ_j)``                   ``gasoftmax``
WSoftmaxHead           g(θ) (m = 1)        ``‖x‖ g(θ_j)``                   ``wsoftmax``
=====================  ==================  ===============================  ===========================

(``s`` = ``feature_scale``.)

Every head here, SphereNet's :class:`GASoftmaxHead` / :class:`WSoftmaxHead` included, derives from
:class:`MarginHead`, which holds the class weights, the one scale name ``feature_scale`` and the one λ-step state:
``head.lambda_`` is the current mix (0 = pure margin logit) and ``head.global_step`` (buffer ``lambda_step``)
drives it, ``lambda_ = lambda_schedule(global_step + 1)``. With ``auto_step = True`` (plain PyTorch, the default)
the head advances ``global_step`` by one after every training-mode forward with labels under autograd; a
LightningModule calls ``head.sync_step(trainer.global_step)`` instead (``HypersphericalClassifier`` and
``SphereFaceModule`` both do, :mod:`lightning_hyper.models.margin_sync`), so a resumed run continues the schedule
and gradient accumulation does not speed it up. Every margin formula is in :mod:`lightning_hyper.functional.margin`.

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

from lightning_hyper.functional.checks import argument_error, check_choice, check_labels, check_number, shown
from lightning_hyper.functional.margin import (
    LAMBDA_PRESETS,
    PSI_MODES,
    additive_angular_margin,
    additive_cosine_margin,
    check_m,
    ga_psi,
    lambda_schedule,
    psi,
    resolve_lambda_schedule,
)
from lightning_hyper.functional.operators import angular_activation
from lightning_hyper.nn.registry import register_head

__all__ = [
    "MarginHead",
    "AngularMarginHead",
    "ArcFaceHead",
    "ASoftmaxHead",
    "CosFaceHead",
    "LSoftmaxHead",
    "ModifiedSoftmaxHead",
    "NormFaceHead",
    "GASoftmaxHead",
    "WSoftmaxHead",
    "HEAD_ANGLE_FNS",
]

MARGIN_TYPES = ("multiplicative", "none", "additive_cos", "additive_angle")
WEIGHT_NORM_MODES = ("reparam", "project")
GRADIENT_MODES = ("exact", "caffe_normalized")


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


def _count(name: str, value: Any, owner: str) -> int:
    """A positive integer size (numpy / torch integers accepted)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)
    return check_number(name, value, low=1, low_inclusive=True, integer=True, owner=owner)


class MarginHead(nn.Module):
    r"""The one base of every margin head: class weights, the one scale name and the one λ-step state.

    * ``weight`` ``(num_classes, in_features)``: the class weights (rows = classes, like ``nn.Linear``).
    * ``feature_scale``: ``None`` (logits scale with ``‖x‖``) or ``s > 0`` (features normalized to norm ``s``:
      NormFace / CosFace / ArcFace / S-Softmax). The GA-/W-Softmax heads' old name ``s`` is a deprecated alias.
    * λ: ``lambda_`` is the current mix of the target logit (0 = pure margin, ``inf`` = no margin). With a
      schedule (:func:`lightning_hyper.functional.margin.lambda_schedule`),
      ``lambda_ = lambda_schedule(global_step + 1)``; without one it stays fixed. ``global_step`` is stored in the
      buffer ``lambda_step`` (so it is in the ``state_dict`` and survives checkpoints; old checkpoints'
      ``_extra_state = {"global_step": n}`` still load).
    * Who advances ``global_step``: with ``auto_step = True`` (plain PyTorch, the default) the head itself, by one
      after every training-mode forward with labels under autograd; a LightningModule calls :meth:`sync_step` with
      ``trainer.global_step`` instead (``HypersphericalClassifier`` and ``SphereFaceModule`` do, through
      :class:`lightning_hyper.models.margin_sync.MarginStepSync`), so λ counts optimizer steps, also under gradient
      accumulation, and a resumed run continues the schedule.
    """

    needs_labels = True
    hyperspherical_layer = True

    def __init__(self, in_features: int, num_classes: int, *, feature_scale: float | None = None,
                 schedule: dict[str, float] | None = None, margin_lambda: float = 0.0) -> None:
        super().__init__()
        owner = type(self).__name__
        self.in_features = _count("in_features", in_features, owner)
        self.num_classes = _count("num_classes", num_classes, owner)
        self.feature_scale: float | None = check_number("feature_scale", feature_scale, low=0.0, allow_none=True,
                                                        owner=owner)
        self._schedule = schedule
        self.lambda_: float = float(margin_lambda)
        self.auto_step = True
        self._step = 0  # mirror of the buffer: reading it costs no device sync
        self._warm_lambda: float | None = None  # lambda_ before a warm start set it to inf
        self.register_buffer("lambda_step", torch.zeros((), dtype=torch.long))
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.in_features))

    # ----------------------------------------------------------------------------------- λ step
    @property
    def global_step(self) -> int:
        """Training-step counter driving λ (stored in the ``lambda_step`` buffer)."""
        return self._step

    @global_step.setter
    def global_step(self, step: int) -> None:
        self._step = int(step)
        self.lambda_step.fill_(self._step)
        if self._schedule is not None:
            self.lambda_ = lambda_schedule(self._step + 1, **self._schedule)

    def lambda_at(self, step: int) -> float:
        """λ this head uses at training step ``step`` (0-based, like ``trainer.global_step``)."""
        if self._schedule is None:
            return self.lambda_ if self._warm_lambda is None else self._warm_lambda
        return lambda_schedule(int(step) + 1, **self._schedule)

    def sync_step(self, global_step: int, warm_start_steps: int = 0) -> None:
        """Drive λ from a training loop's optimizer-step counter (``trainer.global_step``): the one way every
        LightningModule holding a margin head sets it. Turns ``auto_step`` off. During the first
        ``warm_start_steps`` steps λ is ``inf`` (plain logits, no margin) and ``global_step`` stays 0; afterwards
        ``global_step = global_step - warm_start_steps``."""
        self.auto_step = False
        step = int(global_step) - int(warm_start_steps)
        if step < 0:
            if self._warm_lambda is None:
                self._warm_lambda = self.lambda_
            self.global_step = 0
            self.lambda_ = math.inf
            return
        if self._warm_lambda is not None:
            self.lambda_, self._warm_lambda = self._warm_lambda, None
        self.global_step = step

    def _advance_step(self) -> None:
        """After a forward that applied the margin: plain-PyTorch use advances the counter itself."""
        if self.auto_step and self.training and torch.is_grad_enabled():
            self.global_step = self._step + 1

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        legacy = state_dict.pop(prefix + "_extra_state", None)  # AngularMarginHead before the one-state base
        if isinstance(legacy, dict) and prefix + "lambda_step" not in state_dict:
            state_dict[prefix + "lambda_step"] = torch.tensor(int(legacy.get("global_step", 0)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.global_step = int(self.lambda_step)  # a restored run continues the schedule where it stopped

    # ----------------------------------------------------------------------------------- inputs
    def check_inputs(self, features: Tensor, labels: Tensor | None) -> None:
        """``features`` ``(B, in_features)``; ``labels`` (if given) ``(B,)`` integer class indices in range."""
        if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[1] != self.in_features:
            got = f"<tensor of shape {tuple(features.shape)}>" if isinstance(features, Tensor) \
                else f"<{type(features).__name__}>"
            argument_error("features", shown(got), f"a tensor of shape (N, {self.in_features}) "
                           f"(in_features={self.in_features})", owner=type(self).__name__)
        if labels is not None:
            check_labels(labels, self.num_classes, batch_size=features.shape[0], owner=type(self).__name__)

    def reset_parameters(self) -> None:
        """Xavier-uniform class weights ([code] Caffe ``weight_filler: xavier``; only their directions matter)."""
        nn.init.xavier_uniform_(self.weight)


class AngularMarginHead(MarginHead):
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
        owner = type(self).__name__
        super().__init__(in_features, num_classes, feature_scale=feature_scale,
                         schedule=resolve_lambda_schedule(lambda_schedule, lambda_base, lambda_gamma, lambda_power,
                                                          lambda_min))
        self.margin_type = check_choice("margin_type", margin_type, MARGIN_TYPES, owner=owner)
        self.weight_norm_mode = check_choice("weight_norm_mode", weight_norm_mode, WEIGHT_NORM_MODES, owner=owner)
        self.gradient_mode = check_choice("gradient_mode", gradient_mode, GRADIENT_MODES, owner=owner)
        if margin_type == "multiplicative":
            self.m: float = check_m(m, owner=owner)
        elif margin_type == "additive_cos":
            additive_cosine_margin(torch.zeros(1), m)  # validates
            self.m = float(m)
        elif margin_type == "additive_angle":
            additive_angular_margin(torch.zeros(1), m)  # validates
            self.m = float(m)
        else:
            self.m = 1
        self.normalize_weight = bool(normalize_weight)
        if gradient_mode == "caffe_normalized" and not (
            margin_type == "multiplicative" and self.normalize_weight and feature_scale is None and not bias
        ):
            argument_error("gradient_mode", gradient_mode, "'exact'", owner=owner,
                           fix="gradient_mode='caffe_normalized' reproduces the SphereFace Caffe layer and needs "
                               "margin_type='multiplicative', normalize_weight=True, feature_scale=None, bias=False")
        if gradient_mode == "caffe_normalized" and self.weight_norm_mode != "project":
            warnings.warn(
                f"gradient_mode='caffe_normalized' with weight_norm_mode={self.weight_norm_mode!r} is not the Caffe "
                "layer: Caffe renormalizes the stored rows and applies the plain weight gradient G^T x to them, while "
                "'reparam' sends that gradient through the normalization's Jacobian (only the input gradient is "
                "Caffe's). Pass weight_norm_mode='project' to reproduce the Caffe layer", UserWarning, stacklevel=2)
        self.eps = float(eps)
        self.bias = nn.Parameter(torch.zeros(self.num_classes)) if bias else None
        self.lambda_schedule = lambda_schedule
        self.reset_parameters()
        self.global_step = 0

    # ------------------------------------------------------------------------------ params
    def reset_parameters(self) -> None:
        """Xavier-uniform class weights ([code] Caffe ``weight_filler: xavier``), zero bias."""
        super().reset_parameters()
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
        self.check_inputs(features, labels)
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
        if use_margin:
            self._advance_step()  # plain-PyTorch use (a LightningModule drives it with sync_step)
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


# ----------------------------------------------------------------------- SphereNet's W-/GA-Softmax heads
#: Angle functions g of the W-/GA-Softmax heads.
HEAD_ANGLE_FNS: tuple[str, ...] = ("linear", "cosine", "sigmoid")
_UNSET: Any = object()


def _feature_scale_from_s(owner: str, s: Any, feature_scale: float | None) -> float | None:
    """The deprecated ``s=`` of the W-/GA-Softmax heads is ``feature_scale=`` (the name every margin head uses)."""
    if s is _UNSET:
        return feature_scale
    warnings.warn(f"{owner}(s={s!r}) is deprecated; use feature_scale={s!r} (the scale name every margin head uses). "
                  "The old name will be removed in a future release.", DeprecationWarning, stacklevel=3)
    if feature_scale is not None:
        raise ValueError(f"{owner}: s= (deprecated) and feature_scale= were both given; pass only feature_scale=")
    return s


@register_head("gasoftmax")
class GASoftmaxHead(MarginHead):
    r"""Generalized angular softmax head of SphereNet (thesis §3.3, eq. 3.11; spherenet spec §4.2-4.4).

    Class weights are normalized (``||W_j|| = 1``), no bias; the logit of class ``j`` is ``scale * g(theta_j)``
    with ``g`` an angle function and ``scale = ||x||`` (or ``feature_scale``: S-Softmax, §4.4). With labels, the
    target logit becomes ``scale * psi(theta_y)``, ``psi`` the monotone GA target
    :func:`lightning_hyper.functional.margin.ga_psi` (linear ``1 - 2 m theta / pi``; cosine = A-Softmax's ψ),
    mixed with λ as every margin head does: ``f_y = scale (lambda_ g(theta_y) + psi(theta_y)) / (1 + lambda_)``
    (App. A.7).

    Args:
        in_features: feature dimension.
        num_classes: number of classes (rows of ``weight``).
        m: integer angular margin >= 1 (4 in all thesis experiments; 1 = W-Softmax).
        g: angle function ``"linear"`` (default; the thesis' "GA-Softmax") | ``"cosine"`` (= A-Softmax) |
            ``"sigmoid"`` (with curvature ``k``; the thesis warns it can be unstable with m > 1).
        k: sigmoid curvature (> 0).
        psi_mode: ``"monotonic"`` (piecewise monotone extension, default) or ``"direct"`` (literal g(m theta)).
        margin_lambda: fixed annealing weight ``lambda_`` >= 0 (0 = pure margin) when ``lambda_schedule``
            is None; ``head.lambda_`` may also be set by hand.
        s: deprecated name of ``feature_scale``.
        acos_eps: arccos clamp for linear / sigmoid g.
        lambda_schedule: ``None`` (fixed ``margin_lambda``, default) or a preset of
            :data:`lightning_hyper.functional.margin.LAMBDA_PRESETS` (``"sphereface"``: lambda from ~900
            down to 5 after ~1700 steps; ``"pytorch_port"``, ``"lsoftmax_mnist"``, ``"constant"``, ``"none"``);
            ``lambda_base``, ``lambda_gamma``, ``lambda_power``, ``lambda_min`` override its values. The step that
            drives it is the :class:`MarginHead` state (``global_step``, buffer ``lambda_step``).
        feature_scale: if given (> 0), S-Softmax: features normalized and scaled by it instead of ``||x||``.

    ``forward(features, labels=None)`` -> logits ``(N, num_classes)``; the margin is applied to the
    target class only when ``labels`` are given (and ``lambda_`` is finite; ``inf`` = no margin).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        m: int = 4,
        g: str = "linear",
        k: float = 0.3,
        psi_mode: str = "monotonic",
        margin_lambda: float = 0.0,
        s: Any = _UNSET,
        acos_eps: float = 1e-6,
        lambda_schedule: str | None = None,
        lambda_base: float | None = None,
        lambda_gamma: float | None = None,
        lambda_power: float | None = None,
        lambda_min: float | None = None,
        feature_scale: float | None = None,
    ) -> None:
        owner = type(self).__name__
        feature_scale = _feature_scale_from_s(owner, s, feature_scale)
        check_number("margin_lambda", margin_lambda, low=0.0, low_inclusive=True, owner=owner)
        overrides = (lambda_base, lambda_gamma, lambda_power, lambda_min)
        schedule: dict[str, float] | None = None
        if lambda_schedule is None:
            if any(v is not None for v in overrides):
                argument_error("lambda_schedule", None, f"one of {sorted(LAMBDA_PRESETS)}", owner=owner,
                               fix="lambda_base / lambda_gamma / lambda_power / lambda_min need lambda_schedule")
        else:
            if margin_lambda:
                argument_error("margin_lambda", margin_lambda, "0 with lambda_schedule set", owner=owner,
                               fix="margin_lambda is the fixed lambda; with lambda_schedule set lambda_base / "
                                   "lambda_min instead")
            schedule = resolve_lambda_schedule(lambda_schedule, *overrides)
        super().__init__(in_features, num_classes, feature_scale=feature_scale, schedule=schedule,
                         margin_lambda=margin_lambda)
        if isinstance(m, bool) or not isinstance(m, int):
            argument_error("m", m, "an int >= 1 (1, 2, 3, 4, ...)", owner=owner)
        self.m = check_m(m, owner=owner)
        self.g = check_choice("g", g, HEAD_ANGLE_FNS, owner=owner)
        self.psi_mode = check_choice("psi_mode", psi_mode, PSI_MODES, owner=owner)
        self.k = check_number("k", k, low=0.0, owner=owner)
        self.acos_eps = float(acos_eps)
        self.lambda_schedule = lambda_schedule
        self.reset_parameters()
        self.global_step = 0

    @property
    def s(self) -> float | None:
        """Deprecated name of :attr:`feature_scale`."""
        return self.feature_scale

    def forward(self, features: Tensor, labels: Tensor | None = None) -> Tensor:
        """Logits ``scale * g(theta_j)``; target entries ``scale * psi(theta_y)`` when labels are given."""
        self.check_inputs(features, labels)
        x = features.float() if features.dtype in (torch.float16, torch.bfloat16) else features
        w = self.weight.to(x.dtype)
        cos = F.linear(F.normalize(x, dim=1), F.normalize(w, dim=1))
        if self.feature_scale is not None:
            scale = x.new_tensor(self.feature_scale)
        else:
            scale = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        g_all = angular_activation(cos, self.g, self.k, self.acos_eps)
        logits = scale * g_all
        lam = float(self.lambda_)
        if labels is None or (self.m == 1 and self.psi_mode == "monotonic") or math.isinf(lam):
            return logits
        self._advance_step()  # the step's own lambda was read above
        idx = labels.view(-1, 1)
        cos_y = cos.gather(1, idx)
        target_psi = ga_psi(cos_y, self.m, self.g, self.k, self.psi_mode, self.acos_eps)
        target = (lam * g_all.gather(1, idx) + target_psi) / (1.0 + lam)
        return logits.scatter(1, idx, scale * target)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, num_classes={self.num_classes}, m={self.m}, g={self.g!r}"
        if self.g == "sigmoid":
            s += f", k={self.k}"
        if self.feature_scale is not None:
            s += f", feature_scale={self.feature_scale}"
        if self.lambda_schedule is not None:
            s += f", lambda_schedule={self.lambda_schedule!r}, lambda_={self.lambda_:.4g}"
        elif self.lambda_:
            s += f", margin_lambda={self.lambda_:.4g}"
        return s


@register_head("wsoftmax")
class WSoftmaxHead(GASoftmaxHead):
    """W-Softmax head (thesis eq. 3.10): unit-norm class weights, no bias, logits ``||x|| g(theta_j)``.

    GA-Softmax with ``m = 1`` (no margin, labels not needed); ``g`` defaults to ``"cosine"``.
    """

    needs_labels = False

    def __init__(self, in_features: int, num_classes: int, g: str = "cosine", k: float = 0.3,
                 s: Any = _UNSET, acos_eps: float = 1e-6, feature_scale: float | None = None,
                 **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"WSoftmaxHead got unexpected arguments {sorted(kwargs)} (it has no margin m)")
        feature_scale = _feature_scale_from_s(type(self).__name__, s, feature_scale)
        super().__init__(in_features, num_classes, m=1, g=g, k=k, acos_eps=acos_eps, feature_scale=feature_scale)
