"""``PointCloudClassifier``: PointNet / PointNet++ shape classifier, optionally trained with OPT.

Thesis §7.4.6 / spec §7.7: OPT on every shared-MLP 1×1 conv and FC layer except the classifier
(here: every backbone layer except the T-Nets' zero-initialized ``transform_head``). Adam lr 1e-3;
PointNet's feature-transform regularizer ``w · ‖I − AAᵀ‖_F²`` (w = 1e-3) is added to the training
loss when the backbone has a feature T-Net. Batches are ``(points (B, N, 3), labels)`` from
:mod:`lightning_hyper.data.pointclouds`. Built on :class:`HypersphericalClassifier`, so any head
(``"linear"``, angular-margin heads, ...) and scheduler work; logged keys are the same
(``train/loss``, ``train/acc``, ``val/acc``, ``test/acc``, ...) plus ``train/feature_transform_loss``.
"""
from __future__ import annotations

from typing import Any
from collections.abc import Sequence

import torch
from torch import nn

from lightning_hyper.functional.checks import check_number
from lightning_hyper.models.classifier import HypersphericalClassifier
from lightning_hyper.models.opt import DEFAULT_LR_SCALE, DEFAULT_R_INIT, OPTMixin

__all__ = ["PointCloudClassifier"]

#: backbone layers never converted by OPT (zero-initialized T-Net outputs)
TNET_HEADS = "*transform_head"


class PointCloudClassifier(OPTMixin, HypersphericalClassifier):
    """Point-cloud classifier: ``backbone`` (``"pointnet"`` or ``"pointnet2"``) + ``head``.

    Args:
        feature_transform_weight: weight of PointNet's feature-transform orthogonality loss.
        opt_method, opt_kwargs, ogd_lr, ogd_momentum: OPT for the backbone (``None``: plain training);
            ``opt_kwargs["exclude"]`` is extended with the T-Net heads; rotations start at ``R = I``
            unless ``opt_kwargs["r_init"]`` says otherwise.
        opt_lr_scale: learning-rate multiplier of the rotation parameters (not OGD's); see
            :data:`~lightning_hyper.models.opt.DEFAULT_LR_SCALE`.
        The other arguments are those of :class:`HypersphericalClassifier`.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "pointnet",
        num_classes: int = 40,
        backbone_kwargs: dict[str, Any] | None = None,
        head: str = "linear",
        head_kwargs: dict[str, Any] | None = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        scheduler: str | None = None,
        milestones: Sequence[int] | None = None,
        gamma: float = 0.7,
        step_size: int = 20,
        max_epochs_for_cosine: int | None = None,
        feature_transform_weight: float = 1e-3,
        opt_method: str | None = None,
        opt_kwargs: dict[str, Any] | None = None,
        ogd_lr: float = 0.02,
        ogd_momentum: float = 0.9,
        opt_lr_scale: float = DEFAULT_LR_SCALE,
    ) -> None:
        super().__init__(backbone=backbone, num_classes=num_classes, backbone_kwargs=backbone_kwargs, head=head,
                         head_kwargs=head_kwargs, optimizer=optimizer, lr=lr, momentum=momentum,
                         weight_decay=weight_decay, nesterov=nesterov, scheduler=scheduler, milestones=milestones,
                         gamma=gamma, step_size=step_size, max_epochs_for_cosine=max_epochs_for_cosine)
        check_number("feature_transform_weight", feature_transform_weight, low=0.0, low_inclusive=True,
                     owner=type(self).__name__)
        self.feature_transform_weight = float(feature_transform_weight)
        kwargs = dict(opt_kwargs or {})
        if opt_method is not None and any(n.endswith("transform_head") for n, _ in self.backbone.named_modules()):
            exclude = kwargs.get("exclude") or []
            exclude = [exclude] if isinstance(exclude, str) else list(exclude)
            kwargs["exclude"] = [*exclude, TNET_HEADS]
        self._init_opt(self.backbone, opt_method, kwargs or None, output_layer="none", ogd_lr=ogd_lr,
                       ogd_momentum=ogd_momentum, lr_scale=opt_lr_scale, r_init=DEFAULT_R_INIT)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        reg_fn = getattr(self.backbone, "feature_transform_loss", None)
        if self.feature_transform_weight > 0 and reg_fn is not None:
            reg = reg_fn()
            self.log("train/feature_transform_loss", reg.detach(), on_step=False, on_epoch=True)
            loss = loss + self.feature_transform_weight * reg
        return loss

    def configure_optimizers(self) -> Any:
        return self._prepare_optimizers(super().configure_optimizers())
