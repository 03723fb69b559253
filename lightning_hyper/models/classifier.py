"""``HypersphericalClassifier``: any backbone + any head, with optimizer/scheduler set by init args.

The module knows nothing about hyperspherical energies: MHE and friends are callbacks
(``lightning_hyper.callbacks``) that find the output layer through ``output_layer_name``
(= ``"head"``, registered after the backbone so it is also the last layer in ``named_modules()``).

Loss: cross-entropy on the head's logits. Heads with ``needs_labels = True`` (angular-margin heads)
are called as ``head(features, labels)`` in training, so the margin enters the training logits
(``train/acc`` is therefore measured on the margin logits), and as ``head(features)`` otherwise.
A margin head's λ step follows ``trainer.global_step`` (:class:`~lightning_hyper.models.margin_sync.MarginStepSync`,
the same rule as ``SphereFaceModule``'s). Accuracy: torchmetrics ``MulticlassAccuracy(average="micro")``,
i.e. the plain fraction correct.
Logged keys: ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``.
"""
from __future__ import annotations

from typing import Any
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_hyper.functional.checks import check_choice, check_number
from lightning_hyper.models.backbones import build_backbone
from lightning_hyper.models.margin_sync import MarginStepSync
from lightning_hyper.nn.registry import build_head

__all__ = ["HypersphericalClassifier"]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("step", "multistep", "cosine")


class HypersphericalClassifier(MarginStepSync, L.LightningModule):
    """Backbone -> head classifier trained with cross-entropy.

    Args:
        backbone: a registered backbone name (``"cnn6"``, ``"cnn9"``, ``"cnn15"``, ``"cnn1d"``,
            ``"resnet20"``/``32``/``56``/``110``, ``"resnet18"``, ...) or an ``nn.Module`` with an
            ``out_features`` attribute (then it is not saved in the hyperparameters and must be
            passed again to ``load_from_checkpoint``).
        num_classes: number of classes.
        backbone_kwargs: keyword arguments of the named backbone (e.g. ``in_channels``, ``widths``).
        head: a head name of ``lightning_hyper.nn.registry`` (``"linear"`` = ``nn.Linear``).
        head_kwargs: keyword arguments of the head (e.g. ``{"bias": False}`` for ``"linear"``).
        optimizer: ``"sgd"`` (momentum, nesterov), ``"adam"`` (L2 weight decay) or ``"adamw"``
            (decoupled weight decay).
        lr, momentum, weight_decay, nesterov: optimizer settings (weight decay on all parameters,
            as in the MHE experiments, D.1).
        scheduler: ``None``, ``"step"`` (StepLR: ``step_size``, ``gamma``), ``"multistep"``
            (MultiStepLR: ``milestones``, ``gamma``) or ``"cosine"`` (CosineAnnealingLR to 0 over
            ``max_epochs_for_cosine`` epochs, default ``trainer.max_epochs``). Epoch-wise.
    """

    output_layer_name = "head"

    def __init__(
        self,
        backbone: str | nn.Module = "cnn9",
        num_classes: int = 10,
        backbone_kwargs: dict[str, Any] | None = None,
        head: str = "linear",
        head_kwargs: dict[str, Any] | None = None,
        optimizer: str = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        nesterov: bool = False,
        scheduler: str | None = None,
        milestones: Sequence[int] | None = None,
        gamma: float = 0.1,
        step_size: int = 30,
        max_epochs_for_cosine: int | None = None,
    ) -> None:
        super().__init__()
        check_number("num_classes", num_classes, low=2, low_inclusive=True, integer=True, owner=type(self).__name__)
        check_choice("optimizer", optimizer, OPTIMIZERS, owner=type(self).__name__)
        check_choice("scheduler", scheduler, (*SCHEDULERS, None), owner=type(self).__name__)
        if scheduler == "multistep" and not milestones:
            raise ValueError("scheduler='multistep' needs milestones (a list of epochs), got none")
        check_number("lr", lr, low=0.0, owner=type(self).__name__)
        check_number("weight_decay", weight_decay, low=0.0, low_inclusive=True, owner=type(self).__name__)
        if nesterov and optimizer != "sgd":
            raise ValueError(f"nesterov=True needs optimizer='sgd', got optimizer={optimizer!r}")
        if isinstance(backbone, nn.Module):
            if backbone_kwargs:
                raise ValueError("backbone_kwargs is only used with a backbone name, not with an nn.Module backbone")
            self.save_hyperparameters(ignore=["backbone"])
        elif isinstance(backbone, str):
            self.save_hyperparameters()
            backbone = build_backbone(backbone, **(backbone_kwargs or {}))
        else:
            raise TypeError(f"backbone must be a backbone name (str) or an nn.Module, got {type(backbone).__name__}")
        out_features = getattr(backbone, "out_features", None)
        if not isinstance(out_features, int):
            raise TypeError("backbone must have an integer attribute out_features (its feature size)")

        # Order matters: the head is registered after the backbone (the output layer comes last).
        self.backbone = backbone
        self.head = build_head(head, out_features, num_classes, **(head_kwargs or {}))
        self.head_needs_labels = bool(getattr(self.head, "needs_labels", False))
        self.drive_margin_head()  # a margin head's λ step follows trainer.global_step (models/margin_sync.py)

        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    # ----------------------------------------------------------------- forward
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features (B, out_features)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) without any training-time margin."""
        return self.head(self.backbone(x))

    @staticmethod
    def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return batch[0], batch[1]
        raise TypeError(f"batch must be a tuple/list (inputs, labels, ...), got {type(batch).__name__}")

    # ------------------------------------------------------------------- steps
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = self._unpack(batch)
        self.sync_margin_step()
        features = self.backbone(x)
        logits = self.head(features, y) if self.head_needs_labels else self.head(features)
        loss = F.cross_entropy(logits, y)
        if self.head_needs_labels:  # accuracy of the plain logits: the margin is a training device only
            with torch.no_grad():
                self.train_acc(self.head(features.detach()), y)
        else:
            self.train_acc(logits.detach(), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def _eval_step(self, batch: Any, stage: str, metric: MulticlassAccuracy) -> torch.Tensor:
        x, y = self._unpack(batch)
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        metric(logits, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x)

    # -------------------------------------------------------------- optimizers
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = self.parameters()
        if hp.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=hp.nesterov
            )
        elif hp.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler is None:
            return opt
        if hp.scheduler == "step":
            sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.StepLR(
                opt, step_size=hp.step_size, gamma=hp.gamma
            )
        elif hp.scheduler == "multistep":
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(hp.milestones), gamma=hp.gamma)
        else:
            t_max = hp.max_epochs_for_cosine
            if t_max is None:
                t_max = self.trainer.max_epochs if self._trainer is not None else None
            if t_max is None or t_max < 1:
                raise ValueError(
                    "scheduler='cosine' needs max_epochs_for_cosine or a Trainer with max_epochs >= 1, "
                    f"got max_epochs_for_cosine={hp.max_epochs_for_cosine!r}, trainer max_epochs={t_max!r}"
                )
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
