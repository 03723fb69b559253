"""Command line: ``lightning-hyper fit --config configs/digits_mhe.yaml`` (or ``python -m lightning_hyper``).

A ``LightningCLI`` in subclass mode for both the model and the data, so configs name them by
``class_path`` (any LightningModule / LightningDataModule, including the user's own) and short
class names such as ``--model HypersphericalClassifier`` resolve, because this module imports
``lightning_hyper.models``, ``lightning_hyper.data`` and ``lightning_hyper.callbacks``. After
``fit``/``validate``/``test`` a short summary of the final metrics (accuracy, loss and every
logged energy/penalty of ``trainer.callback_metrics``) is printed to stdout.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

import lightning_hyper.callbacks  # noqa: F401  (registers callback classes for short names)
import lightning_hyper.data  # noqa: F401
import lightning_hyper.models  # noqa: F401

__all__ = ["HyperCLI", "format_metrics", "main", "run_cli"]

_HEADLINE = ("val/acc", "val/loss", "test/acc", "test/loss", "train/acc_epoch", "train/loss_epoch")
_EXTRA_WORDS = ("energy", "penalty", "mhe")


def format_metrics(metrics: Mapping[str, Any], title: str = "final metrics") -> str:
    """Render accuracy/loss headline metrics, then every energy/penalty metric, one per line."""
    def value(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            v = v.detach().float().cpu()
            v = v.item() if v.numel() == 1 else v.tolist()
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    keys = [k for k in _HEADLINE if k in metrics]
    keys += sorted(k for k in metrics if k not in keys and any(w in k.lower() for w in _EXTRA_WORDS))
    if not keys:
        return f"{title}: (none logged)"
    width = max(len(k) for k in keys)
    return "\n".join([f"{title}:"] + [f"  {k:<{width}}  {value(metrics[k])}" for k in keys])


class HyperCLI(LightningCLI):
    """``LightningCLI`` that prints a summary of ``trainer.callback_metrics`` after each subcommand."""

    def _print_summary(self, subcommand: str) -> None:
        if self.trainer.is_global_zero:
            print(format_metrics(self.trainer.callback_metrics, title=f"{subcommand}: final metrics"), flush=True)

    def after_fit(self) -> None:
        self._print_summary("fit")

    def after_validate(self) -> None:
        self._print_summary("validate")

    def after_test(self) -> None:
        self._print_summary("test")


def run_cli(args: list[str] | None = None, run: bool = True) -> HyperCLI:
    """Build (and by default run) the CLI on ``args`` (``None``: ``sys.argv``); returns it."""
    return HyperCLI(
        model_class=LightningModule,
        datamodule_class=LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Console-script entry point ``lightning-hyper`` (returns ``None`` so the exit status is 0)."""
    run_cli(args)


if __name__ == "__main__":
    main()
