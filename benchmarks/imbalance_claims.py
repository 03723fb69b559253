"""MHE under class imbalance (MHE thesis §5.4, Table 5.7 / D.6 and Fig. 5.4), baseline vs MHE, paired seeds.

Two small-scale versions of the thesis' imbalance experiments:

1. ``classify`` — the CIFAR-10 "Single" / "Multiple" protocol (spec ``mhe.md`` §7.3) on MNIST-1D: a pool of
   ``--pool-per-class`` training sequences per class, then

   * ``single``: class 0 keeps ``--minority-fraction`` (10 %) of its pool, the other classes all of it;
   * ``multiple``: class k keeps the fraction (k + 1) / 10 of its pool (class 0: 10 %, ..., class 9: 100 %);

   the test set stays balanced. The 1-D CNN of ``comhe_claims.py`` (``cnn1d``, BN + ReLU, bias-free
   linear head), SGD + cosine schedule; ``mhe`` adds ``MHERegularizer()`` (full space, λ_h = 10,
   λ_o = 1, s = 2: the thesis' defaults). Reported: test error % (all classes) and the minority
   class's test error % ("Err.(S)").
2. ``toy`` — the 2-D-feature toy of Fig. 5.4 (spec T14): sklearn digits (70/30 split), class 0 reduced
   to ``--toy-minority`` training samples, MLP 64-64-64-2 (ReLU) then ``nn.Linear(2, 10)``, SGD lr 0.05,
   momentum 0.9, weight decay 1e-4, batch 64, 60 epochs, gradient norm clipped at 1 in both arms
   (s = 2 output MHE on a 2-D classifier diverges without it, spec §5.8). Reported: the minimum angle
   between two classifier neurons (degrees; the regular 10-gon has 36°), the minority class's recall
   and the test accuracy.

Within one seed both arms see the same subset, batch order and initialization.

    python benchmarks/imbalance_claims.py                 # 3 seeds, both parts
    python benchmarks/imbalance_claims.py --part toy --seeds 0 1 2 3 4
    python benchmarks/imbalance_claims.py --smoke         # tiny (tests)
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import lightning as L
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_hyper.callbacks import MHERegularizer
from lightning_hyper.data.sampling import epoch_loader
from lightning_hyper.models import HypersphericalClassifier

VARIANTS = ("baseline", "mhe")
MODES = ("single", "multiple")


class TensorDataModule(L.LightningDataModule):
    """Training / test tensors as a DataModule (the test split also serves validation)."""

    def __init__(self, train: TensorDataset, test: TensorDataset, batch_size: int) -> None:
        super().__init__()
        self.train_set, self.test_set, self.batch_size = train, test, batch_size

    def train_dataloader(self):
        return epoch_loader(self.train_set, batch_size=self.batch_size, shuffle=True, owner="TensorDataModule")

    def val_dataloader(self):
        return epoch_loader(self.test_set, batch_size=512, shuffle=False, owner="TensorDataModule")

    test_dataloader = val_dataloader


def keep_fractions(mode: str, num_classes: int = 10, minority_fraction: float = 0.1) -> list[float]:
    """Share of each class's pool that is kept: ``single`` (class 0 at ``minority_fraction``) or
    ``multiple`` (class k at (k + 1) / num_classes)."""
    if mode == "single":
        return [minority_fraction] + [1.0] * (num_classes - 1)
    if mode == "multiple":
        return [(k + 1) / num_classes for k in range(num_classes)]
    raise ValueError(f"mode={mode!r} is not supported; accepted values: {list(MODES)}")


def imbalanced_indices(y: torch.Tensor, fractions: list[float], pool_per_class: int | None,
                       generator: torch.Generator) -> torch.Tensor:
    """Per class: a random pool of ``pool_per_class`` samples (all if ``None``), then the first
    ``round(fraction · pool)`` (at least 1) of it; the kept indices in ascending order."""
    keep = []
    for c, frac in enumerate(fractions):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        pool = idx[:pool_per_class] if pool_per_class is not None else idx
        if pool_per_class is not None and len(pool) < pool_per_class:
            raise ValueError(f"class {c} has only {len(pool)} samples, fewer than pool_per_class={pool_per_class}")
        keep.append(pool[:max(1, round(frac * len(pool)))])
    return torch.cat(keep).sort().values


def _trainer(epochs: int, callbacks: list, clip: float | None = None) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                     num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=clip)


def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x).argmax(dim=1)


# ------------------------------------------------------------------------------------------ classify
def classify_one(variant: str, mode: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    """Test error % (all classes) and the minority class's (class 0) test error % of one run."""
    from lightning_hyper.data import MNIST1DDataModule

    full = MNIST1DDataModule(num_samples=args.num_samples, train_split=args.train_split)
    full.setup()
    x, y = full.train_set.tensors
    keep = imbalanced_indices(y, keep_fractions(mode, 10, args.minority_fraction), args.pool_per_class,
                              torch.Generator().manual_seed(1000 + seed))
    dm = TensorDataModule(TensorDataset(x[keep], y[keep]), full.test_set, args.batch_size)
    L.seed_everything(seed, verbose=False)
    model = HypersphericalClassifier(
        backbone="cnn1d", num_classes=10,
        backbone_kwargs={"blocks_per_stage": args.blocks_per_stage, "widths": list(args.widths), "kernel_size": 5},
        head="linear", head_kwargs={"bias": False}, optimizer="sgd", lr=args.lr, momentum=0.9,
        weight_decay=args.weight_decay, scheduler="cosine",
    )
    callbacks = [MHERegularizer()] if variant == "mhe" else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(args.epochs, callbacks).fit(model, datamodule=dm)
    xt, yt = full.test_set.tensors
    pred = _predict(model, xt)
    minority = yt == 0
    return {"error": 100.0 * (pred != yt).float().mean().item(),
            "minority_error": 100.0 * (pred[minority] != 0).float().mean().item(),
            "train_size": float(len(keep))}


# ------------------------------------------------------------------------------------------ toy
def min_angle_degrees(weight: torch.Tensor) -> float:
    """Smallest angle between two rows of ``weight`` (degrees)."""
    w = nn.functional.normalize(weight.detach().double(), dim=1)
    cos = (w @ w.T).clamp(-1.0, 1.0)
    cos.fill_diagonal_(-1.0)
    return math.degrees(math.acos(float(cos.max())))


class FeatureMLP(nn.Module):
    """64 -> 64 -> 64 -> 2 with ReLU (the 2-D feature of Fig. 5.4); ``out_features = 2``."""

    def __init__(self, in_features: int = 64, hidden: int = 64, out_features: int = 2) -> None:
        super().__init__()
        self.out_features = out_features
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def toy_one(variant: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    """Minimum angle between classifier neurons, minority recall % and test accuracy % of one run."""
    from lightning_hyper.data import DigitsDataModule

    digits = DigitsDataModule(val_fraction=0.3, seed=0, flatten=True)
    digits.setup()
    x, y = digits.train_set.tensors
    fractions = [args.toy_minority / int((y == 0).sum())] + [1.0] * 9
    keep = imbalanced_indices(y, fractions, None, torch.Generator().manual_seed(1000 + seed))
    dm = TensorDataModule(TensorDataset(x[keep], y[keep]), digits.val_set, 64)
    L.seed_everything(seed, verbose=False)
    model = HypersphericalClassifier(backbone=FeatureMLP(), num_classes=10, head="linear", optimizer="sgd",
                                     lr=0.05, momentum=0.9, weight_decay=1e-4)
    callbacks = [MHERegularizer()] if variant == "mhe" else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(args.toy_epochs, callbacks, clip=1.0).fit(model, datamodule=dm)
    xt, yt = digits.val_set.tensors
    pred = _predict(model, xt)
    return {"min_angle": min_angle_degrees(model.head.weight),
            "minority_recall": 100.0 * (pred[yt == 0] == 0).float().mean().item(),
            "accuracy": 100.0 * (pred == yt).float().mean().item()}


# ------------------------------------------------------------------------------------------ driver
def _fmt(values: list[float]) -> str:
    return f"{values[0]:.2f}" if len(values) < 2 else f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def claim(args: argparse.Namespace) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{setting: {variant: {metric: [per-seed values]}}}`` for ``single``, ``multiple`` and ``toy``."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    jobs = ([(m, lambda v, s, m=m: classify_one(v, m, s, args)) for m in args.modes]
            if args.part in ("classify", "both") else [])
    if args.part in ("toy", "both"):
        jobs.append(("toy", lambda v, s: toy_one(v, s, args)))
    for name, fn in jobs:
        out[name] = {}
        for variant in VARIANTS:
            rows = []
            for seed in args.seeds:
                t0 = time.perf_counter()
                rows.append(fn(variant, seed))
                print(f"  {name:<9} {variant:<9} seed {seed}: "
                      + "  ".join(f"{k} {v:.2f}" for k, v in rows[-1].items())
                      + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
            out[name][variant] = {k: [r[k] for r in rows] for k in rows[0]}
        for variant in VARIANTS:
            print(f"{name:<9} {variant:<9} " + "  ".join(f"{k} {_fmt(v)}" for k, v in out[name][variant].items()))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line options (``--smoke`` applied), also used by ``benchmarks/reproduce.py``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="both", choices=["classify", "toy", "both"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--num-samples", type=int, default=5000, help="generated MNIST-1D sequences (train + test)")
    p.add_argument("--train-split", type=float, default=0.5, help="training share of the generated sequences")
    p.add_argument("--pool-per-class", type=int, default=100, help="training pool per class before imbalance")
    p.add_argument("--minority-fraction", type=float, default=0.1)
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--blocks-per-stage", type=int, default=1)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--toy-minority", type=int, default=5, help="training samples left of digit 0 in the toy")
    p.add_argument("--toy-epochs", type=int, default=60)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="one seed, one epoch, tiny pools")
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.epochs, args.toy_epochs, args.pool_per_class = [0], 1, 1, 20
        args.num_samples, args.widths = 1000, [8, 8, 8]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    return claim(args)


if __name__ == "__main__":
    main()
