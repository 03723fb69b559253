"""MHE every k optimizer steps (``MHERegularizer(every_n_steps=k)``, the penalty multiplied by k on those steps):
step time, accuracy and energy against k = 1 (every step).

Digits (scikit-learn's 8x8, offline), the plain CNN-9 of configs/digits_mhe.yaml at widths 32/64/128, MHE on every
hidden layer and the output layer (thesis defaults: hidden_weight 10, output_weight 1), SGD + cosine, a few seeds.
Prints one row per k (and a row without MHE):

* step time: the mean CPU time of a training batch (forward, backward, penalty, optimizer step), as a ratio to
  k = 1, measured in the same process;
* val acc: the final validation accuracy (mean ± std over the seeds);
* hidden energy: the final mean pairwise Riesz s=2 energy of the hidden layers' neurons, averaged over those layers
  (``EnergyMonitor.compute``; lower = more diverse).

    python benchmarks/every_n_steps.py [--seeds 0 1 2] [--epochs 6] [--ks 1 2 4 8]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import lightning as L
import torch

from lightning_hyper.callbacks import EnergyMonitor, MHERegularizer
from lightning_hyper.data import DigitsDataModule
from lightning_hyper.models import HypersphericalClassifier


class StepTimer(L.Callback):
    """CPU time of every training batch (hook to hook: forward, backward, penalty, optimizer step; process time,
    so other processes on a shared machine do not count)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.process_time() - self._t0)


def run(k: int | None, seed: int, epochs: int) -> dict[str, float]:
    """One training run; ``k=None``: no MHE."""
    L.seed_everything(seed, verbose=False)
    model = HypersphericalClassifier(backbone="cnn9", num_classes=10, head="linear", head_kwargs={"bias": False},
                                     backbone_kwargs={"in_channels": 1, "input_size": 8, "widths": [32, 64, 128]},
                                     optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4, scheduler="cosine")
    timer = StepTimer()
    callbacks: list[L.Callback] = [timer]
    if k is not None:
        callbacks.append(MHERegularizer(every_n_steps=k, verbose=False))
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=callbacks)
    data = DigitsDataModule(batch_size=64, val_fraction=0.3, seed=0)
    trainer.fit(model, data)
    acc = float(trainer.validate(model, data, verbose=False)[0]["val/acc"])
    monitor = EnergyMonitor(verbose=False)
    energies = monitor.compute(model)
    hidden = [energies[g.name] for g in monitor.layers if g.role == "hidden" and g.name in energies]
    return {"time": statistics.fmean(timer.times[5:]), "acc": acc, "energy": statistics.fmean(hidden)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    settings: list[int | None] = [*args.ks, None]
    results: dict[int | None, list[dict[str, float]]] = {k: [] for k in settings}
    for seed in args.seeds:  # seeds outermost: every k sees the same machine load on average
        for k in settings:
            results[k].append(run(k, seed, args.epochs))
    base = statistics.median(r["time"] for r in results[settings[0]])

    def stat(values: list[float], fmt: str) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{format(statistics.fmean(values), fmt)} ± {format(sd, fmt)}"

    print(f"digits, CNN-9 (32/64/128), {args.epochs} epochs, seeds {args.seeds}, 1 CPU thread")
    print(f"| every_n_steps | step time vs k={settings[0]} | val acc | hidden energy (s=2) |")
    print("|---|---|---|---|")
    for k in settings:
        rows = results[k]
        ratio = statistics.median(r["time"] for r in rows) / base
        name = "no MHE" if k is None else str(k)
        print(f"| {name} | {ratio:.2f} | {stat([r['acc'] for r in rows], '.4f')} | "
              f"{stat([r['energy'] for r in rows], '.4f')} |")


if __name__ == "__main__":
    main()
