"""One rule for every LightningModule that holds a margin head: its λ step follows ``trainer.global_step``.

:class:`MarginStepSync` is mixed into :class:`~lightning_hyper.models.HypersphericalClassifier` and
:class:`~lightning_hyper.models.SphereFaceModule`. It calls the head's
:meth:`~lightning_hyper.nn.heads.MarginHead.sync_step` (any head without one, e.g. ``nn.Linear``, is left alone):

* at the start of every ``training_step`` (:meth:`MarginStepSync.sync_margin_step`): the step ``t`` uses
  ``λ = lambda_schedule(t + 1)``, with ``t`` counting *optimizer* steps, so under gradient accumulation all
  micro-batches of one step share λ (a head stepping itself would anneal k times faster);
* at the end of every training batch and in every checkpoint: the head holds the number of optimizer steps done,
  which is where a resumed run continues (``ModelCheckpoint`` saves before the module's ``on_train_batch_end``,
  hence the ``on_save_checkpoint`` entry).

``margin_warm_start_steps`` (``SphereFaceModule``'s ``warm_start_steps``) keeps λ at ``inf`` (plain logits) for
that many steps first.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["MarginStepSync"]


class MarginStepSync:
    """Mixin for a ``LightningModule`` with a ``head`` attribute (see the module docstring)."""

    #: optimizer steps with λ = inf before the schedule starts (SphereFaceModule: ``warm_start_steps``)
    margin_warm_start_steps: int = 0

    def _margin_head_sync(self) -> Any:
        return getattr(getattr(self, "head", None), "sync_step", None)

    def drive_margin_head(self) -> None:
        """Call once the head is built: the head stops stepping itself (``auto_step = False``)."""
        if self._margin_head_sync() is not None:
            self.head.auto_step = False

    def sync_margin_step(self) -> None:
        """Set the head's λ step from ``trainer.global_step`` (0 without a trainer)."""
        sync = self._margin_head_sync()
        if sync is not None:
            step = self.trainer.global_step if self._trainer is not None else 0
            sync(step, self.margin_warm_start_steps)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.sync_margin_step()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        if self._margin_head_sync() is None or self._trainer is None or not state or "head.lambda_step" not in state:
            return
        steps_done = max(0, self.trainer.global_step - self.margin_warm_start_steps)
        state["head.lambda_step"] = torch.tensor(steps_done, dtype=torch.long)
