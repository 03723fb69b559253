"""W-Softmax and GA-Softmax heads of SphereNet (thesis §3.3, eq. 3.10-3.11; spherenet spec §4.2-4.4).

Class weights are normalized (``||W_j|| = 1``) and have no bias; the logit of class ``j`` is
``||x|| g(theta_j)`` with ``theta_j`` the angle between the feature ``x`` and ``W_j`` and ``g`` an angle
function (linear, cosine, sigmoid). GA-Softmax adds a multiplicative angular margin ``m`` on the
target class: its logit becomes ``||x|| psi(theta_y)`` with the monotone ``psi`` of
:func:`lightning_hyper.functional.margin.ga_psi` (linear ``psi = 1 - 2 m theta / pi``; cosine =
SphereFace's A-Softmax). The margin is applied only when labels are passed; the loss is plain
cross-entropy on the returned logits. Optional annealing mix (App. A.7):
``f_y = (lambda_ ||x|| g(theta_y) + ||x|| psi(theta_y)) / (1 + lambda_)``, with ``lambda_`` fixed
(``margin_lambda``) or annealed by SphereFace's schedule
``lambda(t) = max(lambda_min, base (1 + gamma t)^-power)`` (:func:`lightning_hyper.functional.margin.lambda_schedule`,
``lambda_schedule="sphereface"`` etc.) over the head's training-step counter, which is a buffer
(``lambda_step``) and so survives checkpoints. With ``s`` given, features are normalized too and ``s``
replaces ``||x||`` (S-Softmax, §4.4).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_hyper.functional.checks import argument_error, check_choice, check_number
from lightning_hyper.functional.margin import PSI_MODES, LAMBDA_PRESETS, ga_psi, lambda_schedule as _lambda_at, resolve_lambda_schedule
from lightning_hyper.functional.operators import angular_activation
from lightning_hyper.nn.registry import register_head

__all__ = ["GASoftmaxHead", "WSoftmaxHead", "HEAD_ANGLE_FNS"]

#: Angle functions g of the W-/GA-Softmax heads.
HEAD_ANGLE_FNS: tuple[str, ...] = ("linear", "cosine", "sigmoid")


@register_head("gasoftmax")
class GASoftmaxHead(nn.Module):
    """Generalized angular softmax head (thesis eq. 3.11): logits ``||x|| g(theta_j)``, target ``||x|| psi(theta_y)``.

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
        lambda_schedule: ``None`` (fixed ``margin_lambda``, default) or a preset of
            :data:`lightning_hyper.functional.margin.LAMBDA_PRESETS` (``"sphereface"``: lambda from ~900
            down to 5 after ~1700 steps; ``"pytorch_port"``, ``"lsoftmax_mnist"``, ``"constant"``, ``"none"``);
            ``lambda_base``, ``lambda_gamma``, ``lambda_power``, ``lambda_min`` override its values.
            ``lambda_ = lambda_schedule(global_step + 1)``; ``global_step`` (buffer ``lambda_step``) advances
            by one after every training-mode forward with labels under autograd (``auto_step=True``), or is
            set by the training loop (``head.auto_step = False; head.global_step = trainer.global_step``).
        s: if given (> 0), S-Softmax: features normalized and scaled by ``s`` instead of ``||x||``.
        acos_eps: arccos clamp for linear / sigmoid g.

    ``forward(features, labels=None)`` -> logits ``(N, num_classes)``; the margin is applied to the
    target class only when ``labels`` are given (and ``lambda_`` is finite; ``inf`` = no margin).
    """

    needs_labels = True
    hyperspherical_layer = True

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        m: int = 4,
        g: str = "linear",
        k: float = 0.3,
        psi_mode: str = "monotonic",
        margin_lambda: float = 0.0,
        s: float | None = None,
        acos_eps: float = 1e-6,
        lambda_schedule: str | None = None,
        lambda_base: float | None = None,
        lambda_gamma: float | None = None,
        lambda_power: float | None = None,
        lambda_min: float | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            argument_error("m", m, "an int >= 1 (1, 2, 3, 4, ...)", owner=type(self).__name__)
        self.g = check_choice("g", g, HEAD_ANGLE_FNS)
        self.psi_mode = check_choice("psi_mode", psi_mode, PSI_MODES)
        check_number("k", k, low=0.0, owner=type(self).__name__)
        if isinstance(margin_lambda, bool) or not isinstance(margin_lambda, (int, float)) or margin_lambda < 0:
            raise ValueError(f"margin_lambda must be a number >= 0, got {margin_lambda!r}")
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or s <= 0):
            raise ValueError(f"s must be None or a number > 0, got {s!r}")
        self.in_features = in_features
        self.num_classes = num_classes
        self.m = m
        self.k = float(k)
        self.lambda_ = float(margin_lambda)
        self.s = None if s is None else float(s)
        self.acos_eps = float(acos_eps)
        overrides = (lambda_base, lambda_gamma, lambda_power, lambda_min)
        if lambda_schedule is None:
            if any(v is not None for v in overrides):
                raise ValueError("lambda_base / lambda_gamma / lambda_power / lambda_min need lambda_schedule; "
                                 f"accepted values: None or one of {sorted(LAMBDA_PRESETS)}")
            self._schedule: dict[str, float] | None = None
        else:
            if margin_lambda:
                raise ValueError("margin_lambda is the fixed lambda; with lambda_schedule set lambda_base / "
                                 "lambda_min instead")
            self._schedule = resolve_lambda_schedule(lambda_schedule, *overrides)
        self.lambda_schedule = lambda_schedule
        self.auto_step = True
        self._step = 0  # mirror of the buffer: reading it costs no device sync
        self.register_buffer("lambda_step", torch.zeros((), dtype=torch.long))
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        self.reset_parameters()
        self.global_step = 0

    # ----------------------------------------------------------------------------------- lambda
    @property
    def global_step(self) -> int:
        """Training-step counter driving the lambda schedule (stored in the ``lambda_step`` buffer)."""
        return self._step

    @global_step.setter
    def global_step(self, step: int) -> None:
        self._step = int(step)
        self.lambda_step.fill_(self._step)
        if self._schedule is not None:
            self.lambda_ = _lambda_at(int(step) + 1, **self._schedule)

    def lambda_at(self, step: int) -> float:
        """The lambda used at training step ``step`` (0-based, like ``trainer.global_step``)."""
        if self._schedule is None:
            return self.lambda_
        return _lambda_at(int(step) + 1, **self._schedule)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.global_step = int(self.lambda_step)  # a restored run continues the schedule where it stopped

    def reset_parameters(self) -> None:
        """Xavier-uniform class weights (only their directions matter)."""
        nn.init.xavier_uniform_(self.weight)

    def _check(self, features: Tensor, labels: Tensor | None) -> None:
        if features.dim() != 2 or features.shape[1] != self.in_features:
            raise ValueError(
                f"features must have shape (N, {self.in_features}), got {tuple(features.shape)}"
            )
        if labels is not None:
            if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
                raise TypeError(f"labels must be an integer tensor of class indices, got "
                                f"{getattr(labels, 'dtype', type(labels).__name__)}")
            if labels.shape != features.shape[:1]:
                raise ValueError(f"labels must have shape ({features.shape[0]},), got {tuple(labels.shape)}")
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise ValueError(f"labels must lie in [0, {self.num_classes - 1}]")

    def forward(self, features: Tensor, labels: Tensor | None = None) -> Tensor:
        """Logits ``scale * g(theta_j)``; target entries ``scale * psi(theta_y)`` when labels are given."""
        self._check(features, labels)
        x = features.float() if features.dtype in (torch.float16, torch.bfloat16) else features
        w = self.weight.to(x.dtype)
        cos = F.linear(F.normalize(x, dim=1), F.normalize(w, dim=1))
        scale = x.new_tensor(self.s) if self.s is not None else torch.linalg.vector_norm(x, dim=1, keepdim=True)
        g_all = angular_activation(cos, self.g, self.k, self.acos_eps)
        logits = scale * g_all
        lam = float(self.lambda_)
        if labels is None or (self.m == 1 and self.psi_mode == "monotonic") or math.isinf(lam):
            return logits
        if self.auto_step and self.training and torch.is_grad_enabled():
            self.global_step = self.global_step + 1  # the step's own lambda was read above
        idx = labels.view(-1, 1)
        cos_y = cos.gather(1, idx)
        psi = ga_psi(cos_y, self.m, self.g, self.k, self.psi_mode, self.acos_eps)
        target = (lam * g_all.gather(1, idx) + psi) / (1.0 + lam)
        return logits.scatter(1, idx, scale * target)

    def extra_repr(self) -> str:  # noqa: D102
        s = f"in_features={self.in_features}, num_classes={self.num_classes}, m={self.m}, g={self.g!r}"
        if self.g == "sigmoid":
            s += f", k={self.k}"
        if self.s is not None:
            s += f", s={self.s}"
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
                 s: float | None = None, acos_eps: float = 1e-6, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"WSoftmaxHead got unexpected arguments {sorted(kwargs)} (it has no margin m)")
        super().__init__(in_features, num_classes, m=1, g=g, k=k, s=s, acos_eps=acos_eps)
