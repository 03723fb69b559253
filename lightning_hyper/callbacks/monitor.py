"""EnergyMonitor: logs per-layer hyperspherical energy; never changes training."""
from __future__ import annotations

from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_hyper.callbacks.base import LayerRef, LayerSelection
from lightning_hyper.functional.energy import _validate, hyperspherical_energy, pairwise_angles

__all__ = ["EnergyMonitor"]


class EnergyMonitor(Callback):
    """Log the mean pairwise hyperspherical energy of every selected layer every ``every_n_steps``.

    Computed under ``no_grad`` with autocast off; gradients, weights and the loss are untouched.
    Logged as ``<prefix>/energy/<layer>`` (and ``<prefix>/min_angle/<layer>`` in degrees, the Tammes
    view, if ``log_min_angle``). Values are also kept in :attr:`history` as
    ``{"step", "layer", "energy"}`` rows for notebooks and tests.

    Args:
        every_n_steps: log period in training batches (the first batch is always logged).
        s, metric, half_space, angle_unit, eps: the energy variant (see ``hyperspherical_energy``).
        include, exclude, layer_types, output_layer: layer selection (see ``LayerSelection``).
        log_min_angle: also log the smallest pairwise angle per layer.
        prefix: metric-name prefix.
    """

    def __init__(self, every_n_steps: int = 50, s: float = 2.0, metric: str = "euclidean", half_space: bool = False,
                 angle_unit: str = "radian", eps: float = 1e-6, include: str | Sequence[str] | None = None,
                 exclude: str | Sequence[str] | None = None, layer_types: str | Sequence[str] | None = None,
                 output_layer: str | None = None, log_min_angle: bool = False, prefix: str = "monitor") -> None:
        super().__init__()
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps!r} is not supported; accepted values: an int >= 1")
        _validate(s, metric, "mean", angle_unit, eps)
        self.every_n_steps = every_n_steps
        self.s, self.metric, self.half_space, self.angle_unit, self.eps = float(s), metric, half_space, angle_unit, eps
        self.selection = LayerSelection(include, exclude, layer_types, output_layer)
        self.log_min_angle = log_min_angle
        self.prefix = prefix
        self.layers: list[LayerRef] = []
        self.history: list[dict[str, Any]] = []
        self._batches = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.layers = self.selection.resolve(pl_module)

    @torch.no_grad()
    def compute(self, pl_module: torch.nn.Module | None = None) -> dict[str, float]:
        """Per-layer energies now, ``{layer name: energy}`` (resolves layers of ``pl_module`` if given)."""
        if pl_module is not None:
            self.layers = self.selection.resolve(pl_module)
        out = {}
        for layer in self.layers:
            neurons = layer.neurons().detach()
            if neurons.shape[0] < 2:
                continue
            out[layer.name] = float(hyperspherical_energy(
                neurons, s=self.s, metric=self.metric, half_space=self.half_space and layer.role == "hidden",
                angle_unit=self.angle_unit, eps=self.eps, zero_norm="exclude"))
        return out

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batches += 1
        if (self._batches - 1) % self.every_n_steps:
            return
        sync = trainer.world_size > 1
        for name, value in self.compute().items():
            self.history.append({"step": trainer.global_step, "layer": name, "energy": value})
            pl_module.log(f"{self.prefix}/energy/{name}", value, on_step=True, on_epoch=False, sync_dist=sync,
                          batch_size=1)
        if self.log_min_angle:
            for layer in self.layers:
                neurons = layer.neurons().detach()
                if neurons.shape[0] >= 2:
                    angle = pairwise_angles(neurons.float(), degrees=True).min()
                    pl_module.log(f"{self.prefix}/min_angle/{layer.name}", angle, on_step=True, on_epoch=False,
                                  sync_dist=sync, batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self._batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._batches = int(state_dict.get("batches", 0))
