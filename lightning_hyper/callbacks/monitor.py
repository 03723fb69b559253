"""EnergyMonitor: logs per-layer hyperspherical energy; never changes training."""
from __future__ import annotations

import math
import warnings
from typing import Any
from collections.abc import Callable, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_hyper.callbacks.base import (MIN_NORM, NeuronCallback, TrainingDivergedError, check_strategy,
                                           logger_writes_this_batch, step_in_schedule)
from lightning_hyper.callbacks.strategies import has_sharded_parameters
from lightning_hyper.functional.checks import check_choice, check_number
from lightning_hyper.functional.distributed import SHARDED_ENERGY_METHODS, ring_hyperspherical_energy, use_ring
from lightning_hyper.functional.energy import hyperspherical_energy, pairwise_angles, validate_energy_args

__all__ = ["EnergyMonitor"]


class EnergyMonitor(NeuronCallback):
    """Log the mean pairwise hyperspherical energy of every selected neuron group every ``every_n_steps``.

    Computed under ``no_grad`` with autocast off; gradients, weights and the loss are untouched.
    Logged as ``<prefix>/energy/<layer>`` (and ``<prefix>/min_angle/<layer>`` in degrees, the Tammes
    view, if ``log_min_angle``). Values are also kept in :attr:`history` as
    ``{"step", "layer", "energy"}`` rows for notebooks and tests. With a logger, the energies are also
    measured on every batch whose metrics Lightning writes out (``Trainer(log_every_n_steps)``), so
    the logged values are always those of the logged step (not in :attr:`history`).

    Rows of zero norm (no direction) are left out; a group with fewer than two rows with a direction has
    no energy and is not logged. A grouped convolution's energy is the mean over its channel groups (its
    smallest angle: the smallest within any group).

    Args:
        every_n_steps: log period in optimizer steps (``trainer.global_step``, like every callback's
            ``every_n_steps``): measured after the optimizer steps of index 0, n, 2n, ... (the first step is
            always logged; under gradient accumulation a period spans ``n * accumulate_grad_batches`` batches).
        s, metric, half_space, angle_unit, eps: the energy variant (see ``hyperspherical_energy``).
        include, exclude, layer_types, output_layer, inputs, verbose: the selection, resolved on the first
            training batch and printed once (see :class:`~lightning_hyper.callbacks.base.NeuronCallback`).
        log_min_angle: also log the smallest pairwise angle per layer.
        prefix: metric-name prefix.
        log_histograms: also log each layer's pairwise angles (degrees) as a TensorBoard histogram
            ``<prefix>/angles/<layer>`` (``SummaryWriter.add_histogram``). Needs a
            ``TensorBoardLogger`` among the trainer's loggers; otherwise a warning is given at the
            start of ``fit`` and nothing is logged.
        histogram_every_n_steps: histogram period in optimizer steps (default: ``every_n_steps``; the
            first step is always logged).
        sharded_energy: the energy of a layer sharded by FSDP2 (a ``DTensor`` weight): ``"gather"`` (its
            full weight on every rank, one layer at a time), ``"ring"`` (row blocks passed around the ranks)
            or ``"auto"`` (default: the ring for large plain layers); see ``MHERegularizer``.
    """

    def __init__(self, every_n_steps: int = 50, s: float = 2.0, metric: str = "euclidean", half_space: bool = False,
                 angle_unit: str = "radian", eps: float = 1e-6, include: str | Sequence[str] | None = None,
                 exclude: str | Sequence[str] | None = None,
                 layer_types: str | type | Sequence[str | type] | None = None, output_layer: str | None = None,
                 log_min_angle: bool = False, prefix: str = "monitor", log_histograms: bool = False,
                 histogram_every_n_steps: int | None = None, inputs: Callable[[Any], Any] | None = None,
                 verbose: bool = True, sharded_energy: str = "auto") -> None:
        super().__init__()
        check_number("every_n_steps", every_n_steps, low=1, low_inclusive=True, integer=True, owner="EnergyMonitor")
        check_number("histogram_every_n_steps", histogram_every_n_steps, low=1, low_inclusive=True, integer=True,
                     allow_none=True, owner="EnergyMonitor", fix="None means every_n_steps")
        validate_energy_args(s, metric, "mean", angle_unit, eps)
        self.every_n_steps = every_n_steps
        self.s, self.metric, self.half_space, self.angle_unit, self.eps = float(s), metric, half_space, angle_unit, eps
        self.prefix = prefix
        self._init_selection(include, exclude, layer_types, output_layer, inputs, verbose)
        self.log_min_angle = log_min_angle
        self.log_histograms = bool(log_histograms)
        self.histogram_every_n_steps = histogram_every_n_steps or every_n_steps
        self.sharded_energy = check_choice("sharded_energy", sharded_energy, SHARDED_ENERGY_METHODS,
                                           owner="EnergyMonitor")
        self._writers: list[Any] = []
        self.history: list[dict[str, Any]] = []
        self._batches = 0  # training batches that stepped (Lightning's count for writing logs)
        self._last_step: int | None = None  # trainer.global_step after the previous training batch

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._assign_state_key(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step  # (restored by now when resuming)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_strategy(trainer, type(self).__name__)
        self._start_fit(trainer, pl_module)
        self._precheck(pl_module)
        self._writers = []
        if self.log_histograms:
            from lightning.pytorch.loggers import TensorBoardLogger

            self._writers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
            if not self._writers:
                rank_zero_warn(f"EnergyMonitor(log_histograms=True) needs a TensorBoardLogger; the trainer's loggers "
                               f"are {[type(lg).__name__ for lg in trainer.loggers]}: angle histograms are not "
                               "logged", category=UserWarning)

    @torch.no_grad()
    def log_angle_histograms(self, step: int) -> None:
        """Add ``<prefix>/angles/<layer>`` (pairwise angles in degrees) to every TensorBoard logger."""
        for layer in self.layers:
            sets = _sets(layer.neurons().detach())
            if not sets:
                continue
            angles = torch.cat([pairwise_angles(n.float(), degrees=True) for n in sets]).cpu()
            for logger in self._writers:
                logger.experiment.add_histogram(f"{self.log_prefix}/angles/{layer.name}", angles, global_step=step)

    @torch.no_grad()
    def compute(self, pl_module: torch.nn.Module | None = None) -> dict[str, float]:
        """Per-group energies now, ``{group name: energy}`` (resolves the groups of ``pl_module`` if given,
        without a forward pass)."""
        if pl_module is not None:
            self.layers, self.skipped = self.selection.resolve(pl_module, return_skipped=True)
        out = {}
        for layer in self.layers:
            ring = self._ring_energy(layer)
            if ring is not None:
                if not math.isnan(ring):
                    out[layer.name] = ring
                continue
            neurons = layer.neurons().detach()
            if neurons.shape[-2] < 2:
                continue
            if not bool(torch.isfinite(neurons).all()):
                raise TrainingDivergedError(
                    f"Training diverged: the weights of layer {layer.name!r} contain NaN or Inf, so EnergyMonitor "
                    "cannot measure their energy (the monitor only reads them: the model's own loss or gradients "
                    "blew up). To fix: lower the learning rate (lr) or clip gradients (Trainer(gradient_clip_val=1.0))")
            sets = _sets(neurons)
            if not sets:
                continue  # fewer than two rows with a direction (e.g. a zero-initialized classifier): no energy
            if neurons.dim() == 2:
                neurons = sets[0]  # (a grouped convolution: each group leaves out its own zero rows)
            energy = hyperspherical_energy(
                neurons, s=self.s, metric=self.metric, half_space=self.half_space and layer.role == "hidden",
                angle_unit=self.angle_unit, eps=self.eps, zero_norm="exclude")
            out[layer.name] = float(energy.mean() if energy.dim() else energy)
        return out

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        previous = step - 1 if self._last_step is None else self._last_step
        self._last_step = step
        stepped = step > previous or not pl_module.automatic_optimization
        if stepped:
            self._batches += 1
        # (a sharded model's weights are gathered by every rank; only rank zero's writer records them)
        if (self._writers and step_in_schedule(previous, step, self.histogram_every_n_steps)
                and (trainer.is_global_zero or has_sharded_parameters(pl_module))):
            self.log_angle_histograms(step)
        scheduled = step_in_schedule(previous, step, self.every_n_steps)
        # Lightning writes on-step metrics to the loggers only every log_every_n_steps batches, and then the
        # latest value logged this epoch: log a fresh value on those batches too, so the logger never records
        # an energy measured at an earlier step (or none at all when an epoch is shorter than the period)
        written = logger_writes_this_batch(trainer, stepped,
                                           step if pl_module.automatic_optimization else self._batches)
        if not (scheduled or written):
            return
        sync = trainer.world_size > 1
        prefix = self.log_prefix
        for name, value in self.compute().items():
            if scheduled:
                self.history.append({"step": trainer.global_step, "layer": name, "energy": value})
            pl_module.log(f"{prefix}/energy/{name}", value, on_step=True, on_epoch=False, sync_dist=sync,
                          batch_size=1)
        if self.log_min_angle:
            for layer in self.layers:
                sets = _sets(layer.neurons().detach())
                if sets:
                    angle = torch.stack([pairwise_angles(n.float(), degrees=True).min() for n in sets]).min()
                    pl_module.log(f"{prefix}/min_angle/{layer.name}", angle, on_step=True, on_epoch=False,
                                  sync_dist=sync, batch_size=1)

    def _ring_energy(self, layer: Any) -> float | None:
        """The energy of a row-sharded layer on the ring (``sharded_energy``), ``nan`` when it has fewer than two
        rows with a direction; ``None`` when the layer is read whole."""
        if self.sharded_energy == "gather" or not use_ring(getattr(layer.module, layer.parameter_name),
                                                           self.sharded_energy):
            return None
        local = layer.local_neurons()
        if local is None:
            return None
        import torch.distributed as dist

        rows, group = local
        rows = rows.detach()
        count = (torch.linalg.vector_norm(rows.float(), dim=-1) >= MIN_NORM).sum().reshape(1).cpu()
        dist.all_reduce(count, group=group)
        if int(count) < 2:
            return math.nan  # fewer than two rows with a direction: no energy (as unsharded layers)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                energy = ring_hyperspherical_energy(
                    rows, group=group, s=self.s, metric=self.metric,
                    half_space=self.half_space and layer.role == "hidden", angle_unit=self.angle_unit, eps=self.eps,
                    zero_norm="exclude")
        except ValueError as err:
            raise TrainingDivergedError(
                f"Training diverged: the weights of layer {layer.name!r} contain NaN or Inf, so EnergyMonitor "
                "cannot measure their energy. To fix: lower the learning rate (lr) or clip gradients "
                "(Trainer(gradient_clip_val=1.0))") from err
        return float(energy)

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self._batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._batches = int(state_dict.get("batches", 0))


def _sets(neurons: Tensor) -> list[Tensor]:
    """The neuron sets ``(N, d)`` of a group (one per channel group), rows without a direction dropped;
    sets with fewer than two rows left out."""
    sets = list(neurons) if neurons.dim() == 3 else [neurons]
    norms = [torch.linalg.vector_norm(n.float(), dim=-1) for n in sets]
    if bool(torch.stack([(v >= MIN_NORM).all() for v in norms]).all()):
        return [n for n in sets if n.shape[0] >= 2]
    kept = [n[v >= MIN_NORM] for n, v in zip(sets, norms)]
    return [n for n in kept if n.shape[0] >= 2]
