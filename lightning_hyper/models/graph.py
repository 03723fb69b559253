"""``GraphClassifier``: full-batch node classification with a GCN, optionally trained with OPT.

Thesis §7.4.5 / spec §7.6: Kipf & Welling's two-layer GCN (hidden 16, dropout 0.5, Adam lr 0.01,
weight decay 5e-4); OPT reparameterizes ``W₀`` (the first ``GCNConv.lin``), never the classifier
``W₁``. Batches are torch-geometric graphs with ``train_mask`` / ``val_mask`` / ``test_mask`` (see
:mod:`lightning_hyper.data.graphs`); each stage uses its mask. Logged keys: ``train/loss``,
``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc`` (torchmetrics accuracy).
"""
from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from lightning_hyper.functional.checks import argument_error, check_choice, check_number
from lightning_hyper.models.backbones.gcn import GCN
from lightning_hyper.models.opt import DEFAULT_LR_SCALE, DEFAULT_R_INIT, OPTMixin
from lightning_hyper.nn.opt import get_opt, opt_layers

__all__ = ["GraphClassifier"]

OPTIMIZERS = ("adam", "sgd", "adamw")
V_INITS = ("init", "orthogonal")

#: learning-rate multiplier of the learned output scale of ``opt_scale`` (``opt_scale_lr``). Adam moves a
#: scalar by about ``lr`` per step, so at the GCN's lr 0.01 the scale could grow at most from 1 to 3 in 200
#: epochs, and it ended near 2.8 (KarateClub) while the plain GCN's largest singular value of ``W₀`` grows
#: about 4x: the scale was held back by its learning rate. At 10x the gap on KarateClub went from -2.1 to
#: -1.0 points (50 exploration seeds 100-149; 3x and 30x: -1.2), SBM -0.1 → -0.4 (docs/opt.md)
DEFAULT_SCALE_LR = 10.0


@torch.no_grad()
def _equalize_singular_values(V: Tensor) -> None:
    """In place: ``V = U S Qᵀ`` (neurons as columns) → ``U Qᵀ · ‖V‖_F / √rank``: orthogonal neurons of equal
    norm, the nearest such matrix to ``V`` (polar factor), with ``V``'s Frobenius norm."""
    U, S, Qt = torch.linalg.svd(V.double(), full_matrices=False)
    V.copy_((U @ Qt * (S.square().sum() / S.numel()).sqrt()).to(V.dtype))


class GraphClassifier(OPTMixin, L.LightningModule):
    """GCN node classifier.

    Args:
        num_features: node feature size (``datamodule.num_features``; 34 for KarateClub, 1433 for Cora).
        num_classes: number of classes (4 for KarateClub, 7 for Cora).
        hidden_channels, num_layers, dropout: the :class:`~lightning_hyper.models.backbones.gcn.GCN`.
        optimizer: ``"adam"`` (default, Kipf & Welling), ``"adamw"`` or ``"sgd"`` (momentum 0.9).
        lr, weight_decay: optimizer settings (weight decay on every parameter).
        opt_method: OPT method for the hidden convs (``None``: plain GCN); see :func:`apply_opt`.
        opt_kwargs: further ``apply_opt`` options.
        ogd_lr, ogd_momentum: rotation optimizer for ``opt_method="ogd"``.
        opt_scale: with OPT, multiply each OPT conv's output by a learned scalar (``True``, initialized to
            1) or by a learned scale per output channel (``"channel"``: BN's γ, which the thesis trains after
            every OPT conv of its CNNs; it changes neuron norms, never the angles between neurons, so the
            hyperspherical energy stays that of ``V``); ``False``: none. OPT keeps the neurons' norms at
            their initial values and no BN follows a GCN layer, so without it the hidden layer's scale
            stays at Glorot's: on KarateClub the plain GCN grows ``‖W₀‖`` 2.5x and OPT without the scale
            lost 13 points (ablation in docs/opt.md).
        opt_scale_lr: learning-rate multiplier of the learned output scale(s) of ``opt_scale`` (default
            :data:`DEFAULT_SCALE_LR`, 10: at 1 the scale is held back by Adam's per-step size).
        opt_v_init: the fixed neurons ``V`` of the OPT convs: ``"init"`` (the conv's Glorot init, the
            thesis) or ``"orthogonal"`` (the same init with its singular values equalized: the nearest
            matrix with orthogonal neurons of equal norm, Frobenius norm kept; the optimum of the half-space
            energy that ``refine="hs_mhe"`` approaches, with the norms ``normalize_v`` equalizes).
        opt_lr_scale: learning-rate multiplier of the rotation parameters (not OGD's); see
            :data:`~lightning_hyper.models.opt.DEFAULT_LR_SCALE`.
    """

    def __init__(self, num_features: int, num_classes: int, hidden_channels: int = 16, num_layers: int = 2,
                 dropout: float = 0.5, optimizer: str = "adam", lr: float = 0.01, weight_decay: float = 5e-4,
                 opt_method: str | None = None, opt_kwargs: dict[str, Any] | None = None, ogd_lr: float = 0.02,
                 ogd_momentum: float = 0.9, opt_scale: bool | str = True, opt_lr_scale: float = DEFAULT_LR_SCALE,
                 opt_v_init: str = "init", opt_scale_lr: float = DEFAULT_SCALE_LR) -> None:
        super().__init__()
        check_number("num_classes", num_classes, low=2, low_inclusive=True, integer=True, owner=type(self).__name__)
        check_choice("optimizer", optimizer, OPTIMIZERS, owner=type(self).__name__)
        check_number("lr", lr, low=0.0, owner=type(self).__name__)
        check_number("weight_decay", weight_decay, low=0.0, low_inclusive=True, owner=type(self).__name__)
        if opt_scale not in (True, False, "channel") or not isinstance(opt_scale, (bool, str)):
            argument_error("opt_scale", opt_scale, "True, False, 'channel'", owner=type(self).__name__)
        check_number("opt_scale_lr", opt_scale_lr, low=0.0, owner=type(self).__name__)
        check_choice("opt_v_init", opt_v_init, V_INITS, owner=type(self).__name__)
        self.save_hyperparameters()
        scaled = range(num_layers - 1) if opt_method is not None and opt_scale else ()
        self.gcn = GCN(num_features, hidden_channels, num_classes, num_layers=num_layers, dropout=dropout,
                       learn_scale=scaled, channel_scale=opt_scale == "channel")
        self.output_layer_name = f"gcn.{self.gcn.output_layer_name}"
        self._init_opt(self, opt_method, opt_kwargs, output_layer=None, ogd_lr=ogd_lr, ogd_momentum=ogd_momentum,
                       lr_scale=opt_lr_scale, r_init=DEFAULT_R_INIT)
        if opt_method is not None and opt_v_init == "orthogonal":
            for layer in opt_layers(self).values():
                _equalize_singular_values(get_opt(layer).V)
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None) -> Tensor:
        """Node logits ``(num_nodes, num_classes)``."""
        return self.gcn(x, edge_index, edge_weight)

    def _step(self, batch: Any, stage: str, metric: MulticlassAccuracy) -> Tensor:
        mask = getattr(batch, f"{stage}_mask", None)
        if mask is None:
            raise ValueError(f"GraphClassifier: the batch has no {stage}_mask (node masks select each stage's nodes)")
        x = batch.x.to(self.dtype) if batch.x.is_floating_point() else batch.x  # e.g. precision="64-true"
        logits = self(x, batch.edge_index, getattr(batch, "edge_weight", None))
        loss = F.cross_entropy(logits[mask], batch.y[mask])
        metric(logits[mask].detach(), batch.y[mask])
        n = int(mask.sum())
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self(batch.x.to(self.dtype), batch.edge_index).argmax(-1)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params: Any = self.parameters()
        factor = hp.get("opt_scale_lr", 1.0)
        if len(self.gcn.scales) and factor != 1.0:
            ids = {id(p) for p in self.gcn.scales.parameters()}
            params = [{"params": [p for p in self.parameters() if id(p) not in ids]},
                      {"params": list(self.gcn.scales.parameters()), "lr": hp.lr * factor}]
        if hp.optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)
        return self._prepare_optimizers(opt)
