"""Issue 8, part 5: nothing lost when a penalty becomes non-finite mid-training.

For every penalty family (MHE, CoMHE, hierarchical, orthogonal) and both injection modes:

* ``on_nonfinite="error"``: training stops with a ``FloatingPointError`` that names the callback,
  the layer and the global step; the last checkpoint ``ModelCheckpoint`` wrote before (step k) loads
  into a fresh model, is finite, holds the weights the model had when training stopped, and resumes.
* ``on_nonfinite="skip"``: a warning names the layer and step, that optimizer step is skipped
  (parameters and optimizer state unchanged, the step counter advances), training goes on and the
  other steps do change the weights; the skipped step's logged penalty is the non-finite value.
* a NaN that reaches a weight stops training with an error naming the layer and step.
* under DDP, a non-finite penalty on one rank only makes both ranks skip that step (replicas stay
  identical).

The unit-level check of the policy on ``MHERegularizer.penalty`` lives in tests/callbacks/test_mhe.py.
"""
from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_hyper.callbacks import MHERegularizer
from tests.callbacks.helpers import trainer
from tests.distributed import free_port
from tests.reliability.families import (
    PENALTY_FAMILIES,
    flat,
    loader,
    make,
    penalty_callback,
    replica,
)

K = 3  # the step whose penalty is poisoned
STEPS = 6
BAD_LAYER = {"mhe": "fc2", "comhe": "fc2", "hierarchical": "out", "orthogonal": "fc2"}


pytestmark = pytest.mark.usefixtures("one_thread")


def poison(cb, layer_name: str, step: int) -> None:
    """Make ``cb``'s penalty of ``layer_name`` NaN at global step ``step``."""
    original = cb.layer_terms

    def layer_terms(layer, labels, s):
        terms = original(layer, labels, s)
        if terms is not None and s == step and layer.name == layer_name:
            terms = {**terms, "penalty": terms["penalty"] * float("nan")}
        return terms

    cb.layer_terms = layer_terms


class StepWatch(Callback):
    """Parameters and optimizer state before / after every optimizer step, and the logged penalty."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.before: dict[int, torch.Tensor] = {}
        self.after: dict[int, torch.Tensor] = {}
        self.opt_before: dict[int, torch.Tensor] = {}
        self.opt_after: dict[int, torch.Tensor] = {}
        self.logged: dict[int, float] = {}

    @staticmethod
    def _opt_state(trainer) -> torch.Tensor:
        bufs = [s["momentum_buffer"].flatten() for s in trainer.optimizers[0].state.values()
                if s.get("momentum_buffer") is not None]
        return torch.cat(bufs) if bufs else torch.zeros(0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = flat(pl_module)
        self.opt_before[trainer.global_step] = self._opt_state(trainer).clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        self.after[step] = flat(pl_module)
        self.opt_after[step] = self._opt_state(trainer).clone()
        self.logged[step] = float(trainer.callback_metrics[self.key])


def _fit(tmp_path, family, mode, policy, callbacks=(), ckpt_path=None, poisoned=True, **kw):
    L.seed_everything(0, verbose=False)
    model, cbs = make(family, mode=mode, on_nonfinite=policy)
    cb = penalty_callback(cbs)
    if poisoned:
        poison(cb, BAD_LAYER[family], K)
    t = trainer(tmp_path, max_steps=STEPS, callbacks=[*cbs, *callbacks], **kw)
    return model, cb, t


@pytest.mark.parametrize("mode", ["loss", "gradient"])
@pytest.mark.parametrize("family", PENALTY_FAMILIES)
def test_error_names_layer_and_step_and_last_checkpoint_survives(tmp_path, family, mode):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, save_last=True,
                            filename="{step}")
    model, cb, t = _fit(tmp_path, family, mode, "error", [saver], enable_checkpointing=True)
    with pytest.raises(FloatingPointError) as err:
        t.fit(model, loader())
    msg = str(err.value)
    assert type(cb).__name__ in msg and repr(BAD_LAYER[family]) in msg and f"global step {K}" in msg
    assert t.global_step == K
    # the last good checkpoint: written after step K, finite, the weights training stopped with, loadable
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == K
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    fresh, _ = make(family)
    fresh.load_state_dict(ckpt["state_dict"])  # strict
    assert torch.equal(flat(fresh), flat(model))
    # ... and training resumes from it once the cause is gone
    L.seed_everything(0, verbose=False)
    model2, cbs2 = make(family, mode=mode)
    t2 = trainer(tmp_path / "resumed", max_steps=STEPS, callbacks=cbs2)
    t2.fit(model2, loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert t2.global_step == STEPS and torch.isfinite(flat(model2)).all()


@pytest.mark.parametrize("mode", ["loss", "gradient"])
@pytest.mark.parametrize("family", PENALTY_FAMILIES)
def test_skip_leaves_weights_and_optimizer_state_unchanged_for_that_step(tmp_path, family, mode):
    model, cb, t = _fit(tmp_path, family, mode, "skip")
    watch = StepWatch(f"{cb.prefix}/penalty")
    t.callbacks.insert(0, watch)  # before SOPTResampler, whose episode end also resets P
    with pytest.warns(RuntimeWarning, match=rf"{BAD_LAYER[family]}.*global step {K}.*skipped"):
        t.fit(model, loader())
    assert t.global_step == STEPS  # training went on
    assert torch.equal(watch.after[K], watch.before[K])  # the poisoned step did not move the weights
    assert torch.equal(watch.opt_after[K], watch.opt_before[K])  # nor the momentum buffers
    for step in set(range(STEPS)) - {K}:
        assert not torch.equal(watch.after[step], watch.before[step]), step
    assert torch.isfinite(flat(model)).all()
    assert all(torch.isfinite(torch.tensor(v)) for s, v in watch.logged.items() if s != K)
    assert not torch.isfinite(torch.tensor(watch.logged[K]))  # what was skipped shows in the log


@pytest.mark.parametrize("family", PENALTY_FAMILIES)
def test_nan_weight_stops_training_naming_layer_and_step(tmp_path, family):
    class NaNAt(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == K:
                with torch.no_grad():
                    layer = pl_module.get_submodule(BAD_LAYER[family])
                    param = layer.parametrizations.weight.original if hasattr(layer, "parametrizations") else \
                        next(layer.parameters())
                    param.view(-1)[0] = float("nan")

    model, cb, t = _fit(tmp_path, family, "loss", "error", [NaNAt()], poisoned=False)
    with pytest.raises((FloatingPointError, ValueError)) as err:
        t.fit(model, loader())
    msg = str(err.value)
    assert repr(BAD_LAYER[family]) in msg and f"global step {K}" in msg, msg


# ------------------------------------------------------------------ DDP: the ranks agree to skip
class PoisonedMHE(MHERegularizer):
    """MHERegularizer whose ``fc2`` penalty is NaN at step K on rank 1 only (picklable, for ddp_spawn)."""

    def layer_terms(self, layer, labels, step):
        terms = super().layer_terms(layer, labels, step)
        if terms is not None and step == K and layer.name == "fc2" and self._trainer.global_rank == 1:
            terms = {**terms, "penalty": terms["penalty"] * float("nan")}
        return terms


class RankSteps(Callback):
    def __init__(self, folder) -> None:
        self.folder = str(folder)
        self.before: dict[int, torch.Tensor] = {}
        self.after: dict[int, torch.Tensor] = {}

    def setup(self, trainer, pl_module, stage):
        torch.set_num_threads(1)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = flat(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = flat(pl_module)

    def on_train_end(self, trainer, pl_module):
        torch.save({"before": self.before, "after": self.after, "replica": replica(pl_module)},
                   f"{self.folder}/rank{trainer.global_rank}.pt")


@pytest.mark.slow
@pytest.mark.spawn
@pytest.mark.timeout(300)
def test_ddp_skip_on_one_rank_skips_on_all(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    L.seed_everything(0, verbose=False)
    model, _ = make("mhe")
    cb = PoisonedMHE(output_mode="labels", mode="loss", on_nonfinite="skip")
    t = trainer(tmp_path, max_steps=STEPS, callbacks=[RankSteps(tmp_path), cb], strategy="ddp_spawn", devices=2)
    t.fit(model, loader(shuffled=True))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for rank in (r0, r1):
        assert torch.equal(rank["after"][K], rank["before"][K])
        assert not torch.equal(rank["after"][K + 1], rank["before"][K + 1])
    for key in r0["replica"]:
        assert torch.equal(r0["replica"][key], r1["replica"][key]), key
