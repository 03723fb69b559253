"""``SphereFaceModule``: a face-embedding LightningModule (backbone + angular-margin head + CE)
with open-set verification at validation / test (thesis Ch. 2.3, spec sphereface.md §3, §5, §8, §9).

Training: ``logits = head(backbone(x), y)`` (margin on the target class, λ-annealed), loss =
cross-entropy. The module drives the head's λ step from ``trainer.global_step``
(:class:`~lightning_hyper.models.margin_sync.MarginStepSync`, the same rule as ``HypersphericalClassifier``'s), so
the λ schedule counts optimizer steps and continues correctly after a resume (with gradient accumulation all
micro-batches of one step share λ; Caffe counted forwards).

Evaluation batches are dispatched by kind (``eval_kinds`` of the module, else of the DataModule,
else inferred: 3- or 4-tuples are pairs, 2-tuples closed-set):

- ``"pairs"`` ``(x_a, x_b, is_same[, fold])``: embeddings -> :class:`VerificationAccuracy`
  (LFW 10-fold protocol) -> ``{stage}/verification_acc`` and ``{stage}/verification_std``;
- ``"openset"`` ``(x, y)`` of unseen identities -> ``{stage}/afs`` (angular Fisher score, lower
  is more discriminative);
- ``"closed"`` ``(x, y)`` of training identities -> ``{stage}/acc`` (plain logits, argmax =
  smallest angle for A-Softmax) and ``{stage}/loss`` (margin loss with the current λ).

Embeddings are the head's *input* (FC1 output); with ``flip_test`` the features of the image and
of its horizontally flipped copy are concatenated (thesis §9.2).

Convergence help (the most common trouble reports of the original code):

- a safe default λ schedule (``sphereface`` preset, see :mod:`lightning_hyper.nn.heads`), an LR
  decay at 57% / 86% of the run (the thesis's 16k/24k of 28k);
- ``warm_start_steps``: train with plain softmax logits (λ = ∞) first, then start the λ schedule;
  ``init_checkpoint``: start from the backbone/head weights of another checkpoint (for example a
  softmax-trained ``SphereFaceModule`` or ``HypersphericalClassifier``);
- divergence detection: a non-finite loss / features or a feature norm above
  ``max_feature_norm`` raises :class:`TrainingDivergedError` (or warns / stops, see
  ``on_divergence``) with the step, λ, learning rate and ‖x‖ statistics. ‖x‖ mean/min/max are
  logged every step as ``train/feature_norm_{mean,min,max}``, λ as ``margin/lambda``.

SphereFace+ (thesis §5.5.2): add
``MHERegularizer(hidden_weight=0, output_weight=1.0, output_mode="labels")`` as a callback; it finds
the classifier through ``output_layer_name = "head"`` and its ``.weight`` rows (the class
neurons), and uses the labels of each batch.
"""
from __future__ import annotations

import math
from typing import Any
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_hyper.functional.checks import check_choice, check_number
from lightning_hyper.metrics import AngularFisherScore, VerificationAccuracy
from lightning_hyper.models.backbones import build_backbone
from lightning_hyper.models.margin_sync import MarginStepSync
from lightning_hyper.nn.registry import build_head

__all__ = ["SphereFaceModule", "TrainingDivergedError"]

EVAL_KINDS = ("pairs", "openset", "closed")
ON_DIVERGENCE = ("raise", "warn", "stop")


class TrainingDivergedError(RuntimeError):
    """Raised by :class:`SphereFaceModule` when training diverges (``on_divergence="raise"``)."""


class SphereFaceModule(MarginStepSync, L.LightningModule):
    """Backbone -> angular-margin head, trained with cross-entropy, evaluated by open-set verification.

    Args:
        backbone: registered backbone name (``"sphere20"``, ``"sphere4"``, ``"lsoftmax_cnn"``,
            ``"embedding_mlp"``, ...) or an ``nn.Module`` with ``out_features``.
        num_classes: number of training identities.
        backbone_kwargs: keyword arguments of a named backbone.
        head: registered head name (``"asoftmax"``, ``"lsoftmax"``, ``"cosface"``, ``"arcface"``,
            ``"normface"``, ``"modified_softmax"``, ``"linear"`` = plain softmax without bias...).
        head_kwargs: keyword arguments of the head (``m``, ``lambda_min``, ``lambda_schedule``...).
        lr, momentum, weight_decay: SGD settings (thesis: 0.1, 0.9, 5e-4).
        head_weight_decay: weight decay of the head (default: ``weight_decay``). With a
            reparametrized normalized classifier decay only shrinks the raw norm (spec §13.17).
        lr_milestones: LR ÷ ``lr_gamma`` at these points; values < 1 are fractions of the total
            number of training steps, values >= 1 are step numbers. Empty = constant LR.
        lr_gamma: LR decay factor.
        warm_start_steps: optimizer steps of plain-softmax training (λ = ∞) before the margin.
        init_checkpoint: path of a Lightning checkpoint (or a plain state dict) whose
            ``backbone.*`` / ``head.*`` weights initialise this model at the start of ``fit``
            (skipped when resuming with ``ckpt_path``).
        init_modules: which of ``"backbone"``, ``"head"`` to take from ``init_checkpoint``.
        flip_test: concatenate the features of the horizontally flipped input at evaluation.
        num_folds, n_thr: verification protocol settings (10 folds, threshold step 1e-4).
        eval_kinds: kind of each evaluation dataloader (``"pairs"``, ``"openset"``, ``"closed"``);
            default: the DataModule's ``eval_kinds`` or inferred from the batch.
        on_divergence: ``"raise"`` (default), ``"warn"`` (skip the step) or ``"stop"`` (skip and
            stop training).
        max_feature_norm: a mean feature norm above this counts as divergence.
    """

    output_layer_name = "head"

    def __init__(
        self,
        backbone: str | nn.Module = "sphere20",
        num_classes: int = 10572,
        backbone_kwargs: dict[str, Any] | None = None,
        head: str = "asoftmax",
        head_kwargs: dict[str, Any] | None = None,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        head_weight_decay: float | None = None,
        lr_milestones: Sequence[float] = (0.57, 0.86),
        lr_gamma: float = 0.1,
        warm_start_steps: int = 0,
        init_checkpoint: str | None = None,
        init_modules: Sequence[str] = ("backbone", "head"),
        flip_test: bool = False,
        num_folds: int = 10,
        n_thr: int = 10000,
        eval_kinds: Sequence[str] | None = None,
        on_divergence: str = "raise",
        max_feature_norm: float = 1e5,
    ) -> None:
        super().__init__()
        check_number("num_classes", num_classes, low=2, low_inclusive=True, integer=True, owner=type(self).__name__)
        check_number("lr", lr, low=0.0, owner=type(self).__name__)
        check_number("weight_decay", weight_decay, low=0.0, low_inclusive=True, owner=type(self).__name__)
        check_number("head_weight_decay", head_weight_decay, low=0.0, low_inclusive=True, allow_none=True,
                     owner=type(self).__name__)
        if any(not (ms > 0) for ms in lr_milestones):
            raise ValueError(
                f"lr_milestones must be positive (fractions < 1 or step numbers), got {list(lr_milestones)}"
            )
        check_number("warm_start_steps", warm_start_steps, low=0, low_inclusive=True, integer=True,
                     owner=type(self).__name__)
        check_choice("on_divergence", on_divergence, ON_DIVERGENCE, owner=type(self).__name__)
        bad = [m for m in init_modules if m not in ("backbone", "head")]
        if bad:
            raise ValueError(f"init_modules must be a subset of ['backbone', 'head'], got {list(init_modules)}")
        if eval_kinds is not None:
            bad = [k for k in eval_kinds if k not in EVAL_KINDS]
            if bad:
                raise ValueError(f"eval_kinds has unknown kinds {bad}; accepted values: {list(EVAL_KINDS)}")
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
            raise TypeError("backbone must have an integer attribute out_features (its embedding size)")
        self.backbone = backbone
        self.head = build_head(head, out_features, num_classes, **(head_kwargs or {}))  # registered last
        self.head_needs_labels = bool(getattr(self.head, "needs_labels", False))
        self.margin_warm_start_steps = warm_start_steps
        self.drive_margin_head()  # λ is driven by trainer.global_step (models/margin_sync.py)
        self.num_classes = num_classes
        self.embedding_dim = out_features * (2 if flip_test else 1)
        self.diverged_at: int | None = None

        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_verification = VerificationAccuracy(num_folds=num_folds, n_thr=n_thr, return_std=True)
        self.test_verification = VerificationAccuracy(num_folds=num_folds, n_thr=n_thr, return_std=True)
        self.val_afs = AngularFisherScore()
        self.test_afs = AngularFisherScore()

    # ------------------------------------------------------------------ forward
    def embed(self, x: Tensor) -> Tensor:
        """Embeddings (the head's input); ``[f(x), f(flip(x))]`` if ``flip_test``."""
        feats = self.backbone(x)
        if self.hparams.flip_test:
            feats = torch.cat([feats, self.backbone(x.flip(-1))], dim=1)
        return feats

    def forward(self, x: Tensor) -> Tensor:
        """Plain logits (no margin)."""
        return self.head(self.backbone(x))

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        x, y = batch[0], batch[1]
        self.sync_margin_step()
        feats = self.backbone(x)
        lam = float(getattr(self.head, "lambda_", 0.0))
        logits = self.head(feats, y) if self.head_needs_labels else self.head(feats)
        loss = F.cross_entropy(logits, y)
        with torch.no_grad():
            norms = feats.detach().float().norm(dim=1)
            stats = {"mean": norms.mean(), "min": norms.min(), "max": norms.max()}
        if self._diverged(loss, feats, stats, lam):
            return None
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        if self._log_now():  # the rest only on logging steps: self.log costs ~1 ms per call
            self.log("train/acc", (logits.detach().argmax(1) == y).float().mean(), on_step=True, on_epoch=False)
            for k, v in stats.items():
                self.log(f"train/feature_norm_{k}", v, on_step=True, on_epoch=False)
            if hasattr(self.head, "lambda_"):
                warm = not math.isfinite(lam)
                self.log("margin/warm_start", float(warm), on_step=True, on_epoch=False)
                if not warm:
                    self.log("margin/lambda", lam, on_step=True, on_epoch=False)
        return loss

    def _log_now(self) -> bool:
        if self._trainer is None:
            return True
        every = max(1, int(getattr(self.trainer, "log_every_n_steps", 50) or 1))
        # the same condition as Lightning's logger connector, so these values reach the logger
        return (self.trainer.global_step + 1) % every == 0

    def _diverged(self, loss: Tensor, feats: Tensor, stats: dict[str, Tensor], lam: float) -> bool:
        loss = loss.detach()
        finite = (bool(torch.isfinite(loss)) and bool(torch.isfinite(stats["mean"]))
                  and bool(torch.isfinite(stats["max"])))
        too_big = finite and float(stats["mean"]) > self.hparams.max_feature_norm
        if finite and not too_big:
            return False
        step = self.trainer.global_step if self._trainer is not None else -1
        self.diverged_at = step
        lrs = []
        if self._trainer is not None and self.trainer.optimizers:
            lrs = [g["lr"] for g in self.trainer.optimizers[0].param_groups]
        reason = ("non-finite loss or features" if not finite
                  else f"mean feature norm > max_feature_norm={self.hparams.max_feature_norm:g}")
        msg = (
            f"SphereFace training diverged ({reason}) at global_step={step}: loss={float(loss):.4g}, "
            f"lambda={lam:.4g}, lr={lrs}, feature norm mean/min/max = {float(stats['mean']):.4g} / "
            f"{float(stats['min']):.4g} / {float(stats['max']):.4g}. Logits scale with ||x|| and the margin "
            "target reaches 1-2m, so norms can explode: use a slower lambda schedule (larger lambda_min, "
            "or warm_start_steps), a smaller lr or an LR decay, gradient clipping (trainer.gradient_clip_val), "
            "or a smaller m."
        )
        if self.hparams.on_divergence == "raise":
            raise TrainingDivergedError(msg)
        rank_zero_warn(msg)
        if self.hparams.on_divergence == "stop" and self._trainer is not None:
            self.trainer.should_stop = True
        return True

    # ------------------------------------------------------------------ evaluation
    def _kind(self, batch: Any, dataloader_idx: int) -> str:
        kinds = self.hparams.eval_kinds
        if kinds is None and self._trainer is not None:
            kinds = getattr(self.trainer.datamodule, "eval_kinds", None)
        if kinds is not None:
            if dataloader_idx >= len(kinds):
                raise ValueError(f"eval_kinds={list(kinds)} has no entry for dataloader_idx={dataloader_idx}")
            return kinds[dataloader_idx]
        return "pairs" if len(batch) >= 3 else "closed"

    def _eval_step(self, batch: Any, dataloader_idx: int, stage: str) -> None:
        kind = self._kind(batch, dataloader_idx)
        if kind == "pairs":
            fold = batch[3] if len(batch) > 3 else None
            getattr(self, f"{stage}_verification").update(self.embed(batch[0]), self.embed(batch[1]), batch[2], fold)
        elif kind == "openset":
            getattr(self, f"{stage}_afs").update(self.embed(batch[0]), batch[1])
        else:
            x, y = batch[0], batch[1]
            feats = self.backbone(x)
            acc = getattr(self, f"{stage}_acc")
            acc.update(self.head(feats), y)
            loss = F.cross_entropy(self.head(feats, y) if self.head_needs_labels else self.head(feats), y)
            self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, add_dataloader_idx=False)

    def _eval_epoch_end(self, stage: str) -> None:
        ver, afs, acc = (getattr(self, f"{stage}_{n}") for n in ("verification", "afs", "acc"))
        if self._trainer is not None and self.trainer.sanity_checking:
            for metric in (ver, afs, acc):  # a couple of batches: too few pairs / folds to score
                metric.reset()
            return
        if ver.update_called:
            mean, std = ver.compute()
            self.log(f"{stage}/verification_acc", mean, prog_bar=True)
            self.log(f"{stage}/verification_std", std)
            ver.reset()
        if afs.update_called:
            self.log(f"{stage}/afs", afs.compute())
            afs.reset()
        if acc.update_called:
            self.log(f"{stage}/acc", acc.compute(), prog_bar=True)
            acc.reset()

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "val")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "test")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Embeddings of ``batch[0]`` (or of the batch itself)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.embed(x)

    # ------------------------------------------------------------------ warm start
    def setup(self, stage: str) -> None:
        path = self.hparams.init_checkpoint
        if stage != "fit" or path is None or getattr(self, "_init_loaded", False):
            return
        if self._trainer is not None and getattr(self.trainer, "ckpt_path", None):
            return  # resuming: the checkpoint being resumed wins
        self.load_init_checkpoint(path, self.hparams.init_modules)
        self._init_loaded = True

    def load_init_checkpoint(self, path: str, modules: Sequence[str] = ("backbone", "head")) -> list[str]:
        """Copy ``backbone.*`` / ``head.*`` weights from a checkpoint; returns the loaded keys."""
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
        own = self.state_dict()
        wanted = tuple(f"{m}." for m in modules)
        loaded = []
        for key, value in state.items():
            if not key.startswith(wanted) or key not in own:
                continue
            if isinstance(value, Tensor) and own[key].shape != value.shape:
                raise ValueError(
                    f"init_checkpoint {path!r}: {key} has shape {tuple(value.shape)} but this model has "
                    f"{tuple(own[key].shape)} (different num_classes? use init_modules=['backbone'])"
                )
            loaded.append(key)
        if not loaded:
            raise ValueError(f"init_checkpoint {path!r} has no weights for {list(modules)} (keys like 'backbone.*')")
        self.load_state_dict({k: state[k] for k in loaded}, strict=False)
        return loaded

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        head_params = list(self.head.parameters())
        head_ids = {id(p) for p in head_params}
        other = [p for p in self.parameters() if id(p) not in head_ids]
        head_wd = hp.weight_decay if hp.head_weight_decay is None else hp.head_weight_decay
        opt = torch.optim.SGD(
            [{"params": other, "weight_decay": hp.weight_decay}, {"params": head_params, "weight_decay": head_wd}],
            lr=hp.lr, momentum=hp.momentum,
        )
        if not hp.lr_milestones:
            return opt
        total = None
        if any(m < 1 for m in hp.lr_milestones):
            est = float(self.trainer.estimated_stepping_batches)
            if not math.isfinite(est) or est < 1:
                raise ValueError("fractional lr_milestones need a Trainer with max_steps or max_epochs")
            total = int(est)
        milestones = sorted({int(round(m * total)) if m < 1 else int(m) for m in hp.lr_milestones})
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=hp.lr_gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
