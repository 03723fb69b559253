"""Defaults that survive real models (issue "Any model", item 5): a zero-initialized classifier trains with
MHERegularizer() / CoMHERegularizer() defaults (its zero rows are left out until they have a direction, with
one warning), and the bounded per-group penalty gradient (max_grad_norm) keeps nearly identical neurons
from blowing up the weights; the bound is exact in both injection modes and per optimizer step."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hyper.callbacks import CoMHERegularizer, EnergyMonitor, MHERegularizer, TrainingDivergedError
from lightning_hyper.functional import hyperspherical_energy
from tests.callbacks.helpers import PlainNet, make_loader, trainer

torchvision = pytest.importorskip("torchvision")
HEAD = "net.heads.head"


class ViT(L.LightningModule):
    """torchvision's VisionTransformer at toy size; its classifier ``heads.head`` is zero-initialized."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2,
                                                        hidden_dim=16, mlp_dim=32, num_classes=10)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def images(n: int = 160, batch_size: int = 4) -> DataLoader:
    """10 classes, batches of 4: most classes are missing from every batch, so their zero rows get identical
    updates and stay identical (the case that blew up)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randn(10, 3, 16, 16, generator=g)[y] + 0.5 * torch.randn(n, 3, 16, 16, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class HeadEnergy(L.Callback):
    def __init__(self, key: str) -> None:
        self.key, self.values = key, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.key in trainer.callback_metrics:
            self.values.append(float(trainer.callback_metrics[self.key]))


@pytest.mark.slow
@pytest.mark.parametrize("cls,prefix", [(MHERegularizer, "mhe"), (CoMHERegularizer, "comhe")])
def test_zero_initialized_vit_head_trains_with_default_arguments(tmp_path, cls, prefix):
    L.seed_everything(0)
    model = ViT()
    assert not model.net.heads.head.weight.any()
    energy = HeadEnergy(f"{prefix}/energy/{HEAD}")
    with pytest.warns(UserWarning, match=rf"zero norm.*'{HEAD}' \(10 of 10\)") as record:
        trainer(tmp_path, max_steps=30, callbacks=[cls(), EnergyMonitor(every_n_steps=1), energy]).fit(model, images())
    assert sum("zero norm" in str(w.message) for w in record) == 1  # one warning for the whole fit
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the head's rows got directions; identical rows give the kernel's ceiling 1/eps = 1e6 per pair, the
    # energy stays at or below it and falls once the rows separate
    assert len(energy.values) >= 28
    assert all(v == v and v <= 1e6 for v in energy.values)
    assert max(energy.values) > 1e4  # identical rows did occur (what the test is about)
    w = model.net.heads.head.weight.detach().double()
    assert hyperspherical_energy(w).item() < 10.0


@pytest.mark.slow
def test_without_the_bound_the_same_run_diverges(tmp_path):
    """The bound is what saves the run above (max_grad_norm=None: the weights blow up within a few steps)."""
    L.seed_everything(0)
    with pytest.raises(TrainingDivergedError, match="Training diverged at global step"):
        trainer(tmp_path, max_steps=30, callbacks=[MHERegularizer(max_grad_norm=None, verbose=False)]).fit(
            ViT(), images())


LR, HW, OW = 1.0, 3.0, 0.5


class PenaltyOnly(PlainNet):
    """Its own loss has a zero gradient: an SGD step moves the weights by the penalty gradient alone."""

    def training_step(self, batch, batch_idx):
        x, _ = batch
        return (self(x) * 0.0).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


@pytest.mark.parametrize("mode,accumulate", [("loss", 1), ("loss", 2), ("gradient", 1), ("gradient", 2)])
@pytest.mark.parametrize("limit", [0.05, None])
def test_the_bound_caps_each_groups_penalty_gradient_per_optimizer_step(tmp_path, mode, accumulate, limit):
    L.seed_everything(0)
    model = PenaltyOnly()
    before = {k: v.detach().double().clone().requires_grad_() for k, v in model.named_parameters()}
    cb = MHERegularizer(hidden_weight=HW, output_weight=OW, mode=mode, max_grad_norm=limit, verbose=False)
    trainer(tmp_path, max_steps=1, accumulate_grad_batches=accumulate, callbacks=[cb]).fit(model, make_loader())
    for name, weight in (("fc1", HW), ("fc2", HW), ("out", OW)):
        w = before[f"{name}.weight"]
        (g,) = torch.autograd.grad(weight * hyperspherical_energy(w), w)
        norm = float(g.norm())
        if limit is not None:
            assert norm > 2 * limit  # the bound binds here
            g = g * (limit / norm)
        step = getattr(model, name).weight.detach().double() - w.detach()
        torch.testing.assert_close(step, -LR * g, rtol=2e-4, atol=1e-8)


def test_bad_max_grad_norm():
    for value in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match=r"max_grad_norm=.* accepted values: None or a finite number > 0"):
            MHERegularizer(max_grad_norm=value)
