"""OPT callbacks: relaxed orthogonal regularization, S-OPT episode re-drawing, orthogonality monitor.

Thesis Chapter 7 / spec ``opt.md`` §3.7, §4, §10. They act on layers converted by
:func:`lightning_hyper.nn.opt.apply_opt`.
"""
from __future__ import annotations

from typing import Any
from collections.abc import Callable, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_hyper.callbacks.base import (InstanceStateKey, PenaltyCallback, check_strategy, renamed_argument,
                                           step_in_schedule)
from lightning_hyper.functional.checks import argument_error, check_number
from lightning_hyper.functional.orthogonal import orthogonality_error, relaxed_orthogonality_penalty
from lightning_hyper.functional.seeding import seeded_generator
from lightning_hyper.nn.opt import get_opt, opt_layers, orthogonality_errors, sopt_resample
from lightning_hyper.nn.selection import NeuronGroup, call_whole

__all__ = ["OrthogonalRegularizer", "OrthogonalityMonitor", "SOPTResampler"]


def _rotation(layer: NeuronGroup) -> Tensor | None:
    param = get_opt(layer.module)
    if param is None:
        return None
    # (FSDP2: from the gathered P)
    return call_whole(layer.module, lambda m: param.rotation(m.parametrizations["weight"].original))


class OrthogonalRegularizer(PenaltyCallback):
    """Relaxed orthogonality (OR, thesis Eq. 7.7): adds ``λ Σ_l ‖R_lᵀR_l − I‖_F²`` over the OPT layers.

    Meant for ``apply_opt(model, method="relaxed")`` (``R = P`` free); on exact methods the penalty
    is zero up to rounding. ``squared=False`` uses the official code's ``λ Σ_l ‖R_l R_lᵀ − I‖_F``.
    Logs ``orthogonal/penalty`` and ``orthogonal/error/<layer>`` (``max|RᵀR − I|``).

    Args:
        weight: penalty strength λ (the thesis' β; 0.1 in its code, the best value is not reported). The
            name every single-term penalty callback uses.
        squared: thesis form (True) or the code's unsquared Frobenius norm (False).
        beta: deprecated name of ``weight`` (``DeprecationWarning``; removed in a future release).
        include, exclude, layer_types, inputs, verbose, mode, on_nonfinite, prefix, every_n_steps: see
            :class:`~lightning_hyper.callbacks.base.PenaltyCallback` (groups that are not OPT layers are
            skipped; no output role: the penalty reads each OPT layer's rotation, not its neurons, so
            ``max_grad_norm`` does not apply).
    """

    prefix = "orthogonal"

    def __init__(self, weight: float = 0.1, squared: bool = True, *, include: str | Sequence[str] | None = None,
                 exclude: str | Sequence[str] | None = None,
                 layer_types: str | type | Sequence[str | type] | None = None,
                 inputs: Callable[[Any], Any] | None = None, verbose: bool = True, mode: str = "auto",
                 on_nonfinite: str = "error", prefix: str | None = None, every_n_steps: int = 1,
                 beta: float | None = None) -> None:
        super().__init__(include=include, exclude=exclude, layer_types=layer_types, output_layer="none",
                         inputs=inputs, verbose=verbose, mode=mode, on_nonfinite=on_nonfinite, prefix=prefix,
                         every_n_steps=every_n_steps)
        owner = type(self).__name__
        if beta is not None:
            renamed_argument(owner, "beta", "weight=", beta)
            if weight != 0.1:
                argument_error("beta", beta, "only one of weight= and beta= (deprecated)", owner=owner,
                               fix=f"pass weight={beta!r} alone")
            weight = beta
            name = "beta"
        else:
            name = "weight"
        self.weight = check_number(name, weight, low=0, low_inclusive=True, owner=owner)
        self.squared = bool(squared)

    @property
    def beta(self) -> float:
        """Deprecated name of :attr:`weight`."""
        renamed_argument(type(self).__name__, "beta", "weight", self.weight)
        return self.weight

    def validate_layers(self, layers: list[NeuronGroup]) -> None:
        if not any(get_opt(layer.module) is not None for layer in layers):
            raise ValueError("OrthogonalRegularizer: none of the selected layers is an OPT layer; convert the "
                             "model with lightning_hyper.nn.opt.apply_opt(model, method='relaxed') first")

    def layer_terms(self, layer: NeuronGroup, labels: Tensor | None, step: int) -> dict[str, Tensor] | None:
        R = _rotation(layer)
        if R is None:
            return None
        R = R if R.dtype == torch.float64 else R.float()
        penalty = relaxed_orthogonality_penalty(R, squared=self.squared)
        return {"penalty": self.weight * penalty, "error": orthogonality_error(R.detach())}


class SOPTResampler(InstanceStateKey, Callback):
    """Stochastic OPT episodes (spec §4): every ``every_n_steps`` optimizer steps (``trainer.global_step``
    ``n, 2n, ...``), absorb ``V ← R'V``,
    reset ``P' ← I`` and its optimizer state, and draw a new coordinate subset in every S-OPT layer
    (``apply_opt(..., sopt=True)``). 750 steps per episode in the official code. The subsets live in
    buffers, so checkpoints restore them. The draw of step ``t`` comes from a generator seeded with
    ``(seed, t)``; ``seed=None`` draws the seed once at the start of ``fit`` (from the global RNG, so
    ``seed_everything`` fixes it; rank 0's under DDP, so every rank draws the same subsets) and keeps it
    in the callback state (``state_key`` ``"SOPTResampler"``, ``"SOPTResampler#k"`` for the k-th instance in
    one Trainer), so a resumed run draws what the uninterrupted one draws."""

    def __init__(self, every_n_steps: int = 750, seed: int | None = None) -> None:
        super().__init__()
        self.every_n_steps = check_number("every_n_steps", every_n_steps, low=1, low_inclusive=True, integer=True,
                                          owner="SOPTResampler")
        check_number("seed", seed, integer=True, allow_none=True, owner="SOPTResampler")
        self.seed = seed
        self._seed = seed  # the seed in force (drawn in on_fit_start if seed is None)
        self.episodes = 0
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._assign_state_key(trainer)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_strategy(trainer, type(self).__name__)
        if not any(get_opt(m).sopt for m in opt_layers(pl_module).values()):
            raise ValueError("SOPTResampler: the model has no S-OPT layer; use apply_opt(..., sopt=True)")
        if self._seed is None:
            drawn = int(torch.randint(0, 2**31 - 1, (1,)).item())
            self._seed = int(trainer.strategy.broadcast(drawn, src=0))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        gen = None if self._seed is None else seeded_generator(self._seed, step)
        optimizers = list(trainer.optimizers)
        # an OGD optimizer that rides along with the main one (OPTClassifier(opt_method="ogd")) holds the
        # rotations' state too: the model names it with the public property ogd_optimizer
        ogd = getattr(pl_module, "ogd_optimizer", None)
        if ogd is not None:
            optimizers.append(ogd)
        sopt_resample(pl_module, optimizers, generator=gen)
        self.episodes += 1

    def state_dict(self) -> dict[str, Any]:
        return {"episodes": self.episodes, "seed": self._seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.episodes = int(state_dict.get("episodes", 0))
        if state_dict.get("seed") is not None:
            self._seed = int(state_dict["seed"])


class OrthogonalityMonitor(Callback):
    """Logs ``<prefix>/error/<layer>`` = ``max|RᵀR − I|`` of every OPT layer every ``every_n_steps``
    optimizer steps (``trainer.global_step``; measured after the steps of index 0, n, 2n, ..., as
    ``EnergyMonitor``), essential for OGD and OR (spec §10). Values are also kept in :attr:`history`."""

    def __init__(self, every_n_steps: int = 50, prefix: str = "orthogonality") -> None:
        super().__init__()
        self.every_n_steps = check_number("every_n_steps", every_n_steps, low=1, low_inclusive=True, integer=True,
                                          owner="OrthogonalityMonitor")
        self.prefix = prefix
        self.history: list[dict[str, Any]] = []
        self._last_step: int | None = None  # trainer.global_step after the previous training batch

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_strategy(trainer, type(self).__name__)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        previous = step - 1 if self._last_step is None else self._last_step
        self._last_step = step
        if not step_in_schedule(previous, step, self.every_n_steps):
            return
        for name, err in orthogonality_errors(pl_module).items():
            self.history.append({"step": trainer.global_step, "layer": name, "error": err})
            pl_module.log(f"{self.prefix}/error/{name}", err, on_step=True, on_epoch=False, batch_size=1,
                          sync_dist=trainer.world_size > 1)
