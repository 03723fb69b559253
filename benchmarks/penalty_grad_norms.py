"""Per-group penalty-gradient norms in normal training: the measurement behind ``max_grad_norm``'s default.

For each case, the penalty callback runs with its bound disabled (``max_grad_norm=None``) and a tensor
hook records, at every optimizer step, the Frobenius norm of d penalty / d neurons of every selected
group (what the bound caps). Printed per case: the largest norm over groups and steps, its group, and
the 99th percentile.

Cases (CPU, a few epochs each):
  * digits CNN-9 (``HypersphericalClassifier(backbone="cnn9", ...)`` on the bundled 8x8 digits, SGD lr 0.01)
    with ``MHERegularizer()`` and ``CoMHERegularizer()``;
  * a tiny torchvision ``VisionTransformer`` (2 layers, hidden 16) on 10 synthetic classes, batch 4 (most
    classes missing from a batch), SGD lr 0.01, with a randomly initialized head (normal training) and
    with torchvision's zero-initialized head (whose missing classes keep identical rows: the case the
    bound is for).

    python benchmarks/penalty_grad_norms.py [--epochs 3] [--steps 60]
"""
from __future__ import annotations

import argparse
import logging
import warnings

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hyper.callbacks import CoMHERegularizer, MHERegularizer
from lightning_hyper.data import DigitsDataModule
from lightning_hyper.models import HypersphericalClassifier


def recording(cls: type) -> type:
    """``cls`` whose ``neurons()`` records the norm of the gradient that reaches each group's neurons."""

    class Recording(cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, max_grad_norm=None, verbose=False, **kwargs)
            self.norms: list[tuple[str, float]] = []

        def neurons(self, group):
            n = super().neurons(group)
            if n.requires_grad and self._cache is not None and not getattr(n, "_recorded", False):
                n.register_hook(lambda g, name=group.name: self.norms.append((name, float(g.norm()))))
                n._recorded = True
            return n

    Recording.__name__ = cls.__name__
    return Recording


class ViTNet(L.LightningModule):
    def __init__(self, zero_head: bool, lr: float = 0.01) -> None:
        super().__init__()
        import torchvision

        self.net = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2,
                                                        hidden_dim=16, mlp_dim=32, num_classes=10)
        if not zero_head:
            nn.init.normal_(self.net.heads.head.weight, std=0.1)
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def synthetic_images(n: int = 512, batch_size: int = 4, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    proto = torch.randn(10, 3, 16, 16, generator=g)
    x = proto[y] + 0.5 * torch.randn(n, 3, 16, 16, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def summarize(name: str, norms: list[tuple[str, float]]) -> None:
    values = sorted(v for _, v in norms)
    top = max(norms, key=lambda r: r[1])
    p99 = values[min(len(values) - 1, int(0.99 * len(values)))]
    print(f"{name}\n    groups x steps {len(values):5d}  max {top[1]:10.4g} ({top[0]})  p99 {p99:.4g}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3, help="digits epochs")
    parser.add_argument("--steps", type=int, default=60, help="ViT steps")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    kw = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              accelerator="cpu", num_sanity_val_steps=0, limit_val_batches=0)
    for cls in (MHERegularizer, CoMHERegularizer):
        L.seed_everything(0, verbose=False)
        model = HypersphericalClassifier(backbone="cnn9", num_classes=10,
                                         backbone_kwargs={"in_channels": 1, "input_size": 8})
        cb = recording(cls)()
        L.Trainer(max_epochs=args.epochs, callbacks=[cb], **kw).fit(model, DigitsDataModule(batch_size=64))
        summarize(f"digits CNN-9, {cls.__name__}()", cb.norms)
    for zero_head in (False, True):
        for cls in (MHERegularizer, CoMHERegularizer):
            L.seed_everything(0, verbose=False)
            cb = recording(cls)()
            head = "zero-init head" if zero_head else "random head"
            try:
                L.Trainer(max_steps=args.steps, callbacks=[cb], **kw).fit(ViTNet(zero_head), synthetic_images())
            except FloatingPointError as err:  # TrainingDivergedError: the unbounded run blows up
                head += f"; diverged: {str(err)[:48]}..."
            summarize(f"tiny ViT ({head}), {cls.__name__}()", cb.norms)
            if zero_head:
                rest = [r for r in cb.norms if r[0] != "net.heads.head"]
                summarize("  ... every group but the head", rest)


if __name__ == "__main__":
    main()
