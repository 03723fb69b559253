"""Plain LightningModules that know nothing about lightning_hyper (as a user's would)."""
from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_loader(n: int = 64, batch_size: int = 16, seed: int = 0, in_features: int = 12, classes: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class PlainNet(L.LightningModule):
    """A tiny MLP: two hidden Linear layers and a Linear classifier."""

    def __init__(self, in_features: int = 12, hidden: int = 16, classes: int = 5, lr: float = 0.1):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, classes)
        self.lr = lr

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    def extra_loss(self, batch) -> torch.Tensor:
        return torch.zeros(())

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        return loss + self.extra_loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class ManualNet(PlainNet):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y) + self.extra_loss(batch)
        self.manual_backward(loss)
        opt.step()


def trainer(tmp_path, **kw) -> L.Trainer:
    defaults = dict(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu", devices=1)
    defaults.update(kw)
    return L.Trainer(**defaults)


class WeightsAtBatchStart(L.Callback):
    """Keeps a copy of the module's parameters as they were when the last training batch started:
    the weights that step's penalty and logged energies were computed from."""

    def __init__(self) -> None:
        self.params: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.params = {k: v.detach().clone() for k, v in pl_module.named_parameters()}
