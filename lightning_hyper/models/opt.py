"""OPT-trained LightningModules: a shared mixin and the CNN image classifier ``OPTClassifier``.

Thesis Chapter 7 (spec ``opt.md`` §7.2, §10). :class:`OPTMixin` converts a module's layers with
:func:`~lightning_hyper.nn.opt.apply_opt` and, for ``method="ogd"``, takes the rotations out of the
main optimizer and steps them with :class:`~lightning_hyper.optim.StiefelCayleySGD` right after
every main optimizer step (its state is saved in checkpoints). The CNNs of the thesis (Table F.1,
CNN-6/9: [3×3, 64]×k per stage, BN + ReLU, 2×2 max-pool, FC 64 without BN/ReLU/bias, He init) are the
library's plain ``cnn6`` / ``cnn9`` backbones with ``widths=[64, 64, 64]`` and ``fc_features=64``;
``OPTClassifier`` uses those widths unless ``backbone_kwargs`` say otherwise.
"""
from __future__ import annotations

from typing import Any
from collections.abc import Sequence

import torch
from torch import nn

from lightning_hyper.functional.checks import check_number
from lightning_hyper.models.classifier import HypersphericalClassifier
from lightning_hyper.nn.opt import apply_opt, canonical_method, rotation_parameters
from lightning_hyper.optim import attach_ogd

__all__ = ["OPTClassifier", "OPTMixin"]

#: Table F.1 widths of CNN-6/9 for the OPT experiments
OPT_CNN_KWARGS = {"widths": [64, 64, 64], "fc_features": 64}

#: the rotation initialization of ``GraphClassifier`` / ``PointCloudClassifier`` (Adam by default;
#: ``opt_kwargs["r_init"]`` overrides it): ``R = I`` at the start, so ``W = V`` = the plain model's initial
#: weights. The thesis' ``P ~ N(0, 1)`` (``"normal"``, apply_opt's and ``OPTClassifier``'s default) puts the
#: Cayley map far from ``I``, where ``R`` barely responds to ``P`` (the angles move by ``2 / (1 + λ²)`` per
#: unit of ``S``'s eigenvalue λ ~ √d): at Adam's lr 1e-3 the rotations hardly train and PointNet lost 16
#: points on the synthetic shapes; with ``"identity"`` it matches the plain model (ablation in docs/opt.md)
DEFAULT_R_INIT = "identity"

#: the learning-rate multiplier of the rotation parameters ``P`` in ``GraphClassifier`` /
#: ``PointCloudClassifier`` (``opt_lr_scale``; not OGD, which has ``ogd_lr``). With Adam every one of a layer's
#: d(d-1)/2 rotation generators steps by about ``lr``, which moves ``W = R V`` about ``2·rms(V)·√d`` (1-2.5
#: here) times as fast as a plain weight at the same ``lr``; 10x was clearly worse on the GCN and PointNet
#: tasks, 0.3 as good as or better than 1 on all three (docs/opt.md). ``OPTClassifier`` (SGD, the thesis'
#: CNN setting) keeps 1 and ``"normal"``: at its defaults (SGD lr 0.1, 3 epochs on the digits) ``"identity"``
#: with 0.3 reached 0.92 / 0.79 against 0.95 / 0.92 (seeds 0 / 1)
DEFAULT_LR_SCALE = 0.3


class OPTMixin:
    """Adds OPT to a LightningModule: ``_init_opt`` in ``__init__``, ``_prepare_optimizers`` on the
    result of ``configure_optimizers``. ``_init_opt(r_init=...)`` is the model's default rotation init
    (``opt_kwargs["r_init"]`` overrides it); the rotations train at ``lr × lr_scale`` (own param groups)."""

    opt_method: str | None = None
    _ogd = None
    _pending_ogd_state: dict | None = None

    def _init_opt(self, target: nn.Module, method: str | None, opt_kwargs: dict[str, Any] | None,
                  output_layer: str | None, ogd_lr: float, ogd_momentum: float, lr_scale: float = 1.0,
                  r_init: str | None = None) -> None:
        """``apply_opt(target, method, output_layer=output_layer, **opt_kwargs)`` (``opt_kwargs`` may set
        ``output_layer`` themselves, or the deprecated ``exclude_output`` / ``layers``)."""
        check_number("opt_lr_scale", lr_scale, low=0.0)
        self._opt_lr_scale = float(lr_scale)
        kwargs = dict(opt_kwargs or {})
        if method is None:
            if kwargs:
                raise ValueError(f"opt_kwargs={kwargs!r} given without opt_method; set opt_method (e.g. 'cayley')")
            self.opt_method = None
            return
        self.opt_method = canonical_method(method)
        check_number("ogd_lr", ogd_lr, low=0.0)
        self._ogd_lr, self._ogd_momentum = float(ogd_lr), float(ogd_momentum)
        if not {"output_layer", "exclude_output", "layers"} & kwargs.keys():
            kwargs["output_layer"] = output_layer
        if r_init is not None:
            kwargs.setdefault("r_init", r_init)
        apply_opt(target, method, **kwargs)

    def _prepare_optimizers(self, result: Any) -> Any:
        if self.opt_method is None:
            return result
        if self.opt_method != "ogd":
            return self._scale_rotation_lr(result)
        optimizer = result if isinstance(result, torch.optim.Optimizer) else result["optimizer"]
        rotations = rotation_parameters(self)  # type: ignore[arg-type]
        ids = {id(p) for p in rotations}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        self._ogd = attach_ogd(optimizer, rotations, lr=self._ogd_lr, momentum=self._ogd_momentum)
        if self._pending_ogd_state is not None:
            self._ogd.load_state_dict(self._pending_ogd_state)
            self._pending_ogd_state = None
        return result

    def _scale_rotation_lr(self, result: Any) -> Any:
        """Move the rotation parameters into their own param group(s) with ``lr × opt_lr_scale`` (other
        settings copied); a scheduler returned with the optimizer gets the new groups' base learning rates."""
        scale = getattr(self, "_opt_lr_scale", 1.0)
        if scale == 1.0:
            return result
        optimizer = result if isinstance(result, torch.optim.Optimizer) else result["optimizer"]
        ids = {id(p) for p in rotation_parameters(self)}  # type: ignore[arg-type]
        new_groups = []
        for group in optimizer.param_groups:
            mine = [p for p in group["params"] if id(p) in ids]
            if not mine:
                continue
            group["params"] = [p for p in group["params"] if id(p) not in ids]
            settings = {k: v for k, v in group.items() if k != "params"}
            settings["lr"] = group["lr"] * scale
            if "initial_lr" in group:
                settings["initial_lr"] = group["initial_lr"] * scale
            new_groups.append({"params": mine, **settings})
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        for group in new_groups:
            optimizer.add_param_group(group)
        sched = result.get("lr_scheduler") if isinstance(result, dict) else None
        sched = sched.get("scheduler") if isinstance(sched, dict) else sched
        if sched is not None and hasattr(sched, "base_lrs"):
            sched.base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
            sched._last_lr = [g["lr"] for g in optimizer.param_groups]
        return result

    @property
    def ogd_optimizer(self) -> torch.optim.Optimizer | None:
        """The OGD optimizer of the rotations (``opt_method="ogd"``: built in ``configure_optimizers``, stepped
        after the main optimizer), else ``None``. Callbacks that reset the rotations' optimizer state
        (``SOPTResampler``) read it here."""
        return self._ogd

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._ogd is not None:
            checkpoint["ogd_optimizer"] = self._ogd.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._pending_ogd_state = checkpoint.get("ogd_optimizer")


class OPTClassifier(OPTMixin, HypersphericalClassifier):
    """Image classifier whose backbone is trained with OPT (the head/classifier stays standard).

    Args:
        opt_method: OPT method for every conv/linear layer of the backbone (``"cayley"``,
            ``"gram_schmidt"``, ``"householder"``, ``"lowdin"``, ``"matrix_exp"``, ``"ogd"``,
            ``"relaxed"``, ``"unconstrained"``) or ``None`` for the plain baseline.
        opt_kwargs: further :func:`~lightning_hyper.nn.opt.apply_opt` options (``include``, ``exclude``,
            ``r_init`` (default ``"normal"``, the thesis' N(0, 1); ``"identity"``: ``R = I`` at the start,
            see :data:`DEFAULT_R_INIT`), ``blocks``, ``sopt``, ``refine``, ``seed``, ...); every selected
            backbone layer is converted (``output_layer="none"`` on the backbone: the head is outside it).
        ogd_lr, ogd_momentum: the rotation optimizer of ``opt_method="ogd"`` (0.02, 0.9 in the thesis).
        opt_lr_scale: learning-rate multiplier of the rotation parameters (not OGD's); 1 (default) trains
            them like every other parameter (the thesis); see :data:`DEFAULT_LR_SCALE`.
        The other arguments are those of :class:`HypersphericalClassifier` (defaults: CNN-6 with the
        thesis widths, SGD lr 0.1, momentum 0.9, weight decay 5e-4).
    """

    def __init__(
        self,
        backbone: str | nn.Module = "cnn6",
        num_classes: int = 10,
        backbone_kwargs: dict[str, Any] | None = None,
        head: str = "linear",
        head_kwargs: dict[str, Any] | None = None,
        optimizer: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        scheduler: str | None = None,
        milestones: Sequence[int] | None = None,
        gamma: float = 0.1,
        step_size: int = 30,
        max_epochs_for_cosine: int | None = None,
        opt_method: str | None = "cayley",
        opt_kwargs: dict[str, Any] | None = None,
        ogd_lr: float = 0.02,
        ogd_momentum: float = 0.9,
        opt_lr_scale: float = 1.0,
    ) -> None:
        if isinstance(backbone, str) and backbone in ("cnn6", "cnn9"):
            backbone_kwargs = {**OPT_CNN_KWARGS, **(backbone_kwargs or {})}
        super().__init__(backbone=backbone, num_classes=num_classes, backbone_kwargs=backbone_kwargs, head=head,
                         head_kwargs=head_kwargs, optimizer=optimizer, lr=lr, momentum=momentum,
                         weight_decay=weight_decay, nesterov=nesterov, scheduler=scheduler, milestones=milestones,
                         gamma=gamma, step_size=step_size, max_epochs_for_cosine=max_epochs_for_cosine)
        self._init_opt(self.backbone, opt_method, opt_kwargs, output_layer="none", ogd_lr=ogd_lr,
                       ogd_momentum=ogd_momentum, lr_scale=opt_lr_scale)

    def configure_optimizers(self) -> Any:
        return self._prepare_optimizers(super().configure_optimizers())
