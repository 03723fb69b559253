"""``every_n_steps`` of the penalty callbacks (one implementation in callbacks/base.py) and of the monitors:
optimizer steps, not batches; the penalty is computed every k steps, multiplied by k there, logged only then.
Also MHERegularizer's ``output_mode="auto"`` on a large (> 4096 classes) output layer."""
from __future__ import annotations

import logging

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hyper.callbacks import (EnergyMonitor, HierarchicalRegularizer, MHERegularizer, OrthogonalRegularizer,
                                       SphereOrthogonalityRegularizer)
from lightning_hyper.callbacks.base import step_in_schedule
from lightning_hyper.callbacks.comhe import CoMHERegularizer
from lightning_hyper.functional import hyperspherical_energy, output_energy_from_labels
from tests.callbacks.helpers import PlainNet, WeightsAtBatchStart, make_loader, trainer
from tests.callbacks.test_mhe import hand_penalty

HW, OW = 3.0, 0.5


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


class HandEveryK(PlainNet):
    """Adds ``k * penalty`` by hand to every batch of the optimizer steps whose index is a multiple of k."""

    def __init__(self, k: int, **kw):
        super().__init__(**kw)
        self.k = k

    def extra_loss(self, batch):
        if self.trainer.global_step % self.k:
            return torch.zeros(())
        return self.k * hand_penalty(self, HW, OW)


@pytest.mark.parametrize("mode", ["loss", "gradient"])
@pytest.mark.parametrize("k,accumulate", [(2, 1), (3, 2)])
def test_every_k_steps_matches_k_times_the_penalty_added_by_hand(tmp_path, mode, k, accumulate):
    L.seed_everything(0)
    ref = HandEveryK(k)
    trainer(tmp_path, max_steps=6, accumulate_grad_batches=accumulate).fit(ref, make_loader(n=192))
    L.seed_everything(0)
    model = PlainNet()
    cb = MHERegularizer(hidden_weight=HW, output_weight=OW, mode=mode, every_n_steps=k)
    t = trainer(tmp_path, max_steps=6, accumulate_grad_batches=accumulate, callbacks=[cb])
    t.fit(model, make_loader(n=192))
    assert t.global_step == 6
    torch.testing.assert_close(params(model), params(ref), rtol=1e-5, atol=1e-6)
    L.seed_everything(0)
    every = PlainNet()
    trainer(tmp_path, max_steps=6, accumulate_grad_batches=accumulate,
            callbacks=[MHERegularizer(hidden_weight=HW, output_weight=OW, mode=mode)]).fit(every, make_loader(n=192))
    assert not torch.allclose(params(every), params(model), atol=1e-4)  # k changed training


class PenaltyOnly(PlainNet):
    """The data loss is multiplied by 0: only the penalty moves the weights (plain SGD, no momentum)."""

    def training_step(self, batch, batch_idx):
        return 0.0 * super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


@pytest.mark.parametrize("mode", ["loss", "gradient"])
def test_a_chosen_step_gets_k_times_the_every_step_gradient_under_accumulation(tmp_path, mode):
    """Hand computation: with k=2 and accumulate_grad_batches=2, step 0 moves W by lr * 2 * dP/dW(W0) (each of
    its two micro-batches adds 2P, Lightning halves each), step 1 does not move it; over the two steps the
    mean penalty gradient is the every-step one."""
    L.seed_everything(0)
    model = PenaltyOnly(lr=0.01)
    w0 = {n: p.detach().double().clone().requires_grad_(True) for n, p in model.named_parameters()}
    p0 = (HW * (hyperspherical_energy(w0["fc1.weight"]) + hyperspherical_energy(w0["fc2.weight"]))
          + OW * hyperspherical_energy(w0["out.weight"]))
    grads = dict(zip(w0, torch.autograd.grad(p0, list(w0.values()), allow_unused=True)))
    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append({n: p.detach().double().clone() for n, p in pl_module.named_parameters()})

    cb = MHERegularizer(hidden_weight=HW, output_weight=OW, mode=mode, every_n_steps=2, max_grad_norm=None)
    trainer(tmp_path, max_steps=2, accumulate_grad_batches=2, callbacks=[cb, Record()]).fit(model, make_loader())
    assert len(seen) == 4
    for name in ("fc1.weight", "fc2.weight", "out.weight"):
        expected = w0[name].detach() - 0.01 * 2 * grads[name]
        torch.testing.assert_close(seen[1][name], expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(seen[3][name], seen[1][name])  # step 1: no penalty, zero data loss


def test_penalty_is_logged_only_on_the_steps_it_is_computed(tmp_path):
    L.seed_everything(0)
    model = PlainNet()
    logged = []
    log = model.log

    def spy(name, value, *args, **kwargs):
        logged.append((model.trainer.global_step, name))
        return log(name, value, *args, **kwargs)

    model.log = spy
    cb = MHERegularizer(every_n_steps=3)
    trainer(tmp_path, max_steps=7, callbacks=[cb]).fit(model, make_loader(n=128))
    assert sorted({step for step, name in logged if name == "mhe/penalty"}) == [0, 3, 6]
    assert sorted({step for step, name in logged if name == "mhe/energy/fc1"}) == [0, 3, 6]


@pytest.mark.parametrize("make", [
    lambda k: MHERegularizer(every_n_steps=k), lambda k: CoMHERegularizer(every_n_steps=k),
    lambda k: HierarchicalRegularizer(every_n_steps=k), lambda k: OrthogonalRegularizer(every_n_steps=k),
    lambda k: SphereOrthogonalityRegularizer(every_n_steps=k)])
def test_every_penalty_callback_takes_every_n_steps(make):
    assert make(4).every_n_steps == 4
    assert make(1).due(5) and make(4).due(8) and not make(4).due(9)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=rf"every_n_steps={bad!r} is not supported; accepted values: an int >= 1"):
            make(bad)


def test_step_in_schedule_counts_optimizer_steps():
    # one step per batch: after steps 0, 3, 6 (global_step 1, 4, 7 at on_train_batch_end)
    assert [g for g in range(1, 10) if step_in_schedule(g - 1, g, 3)] == [1, 4, 7]
    assert not step_in_schedule(4, 4, 1)  # an accumulating batch ran no optimizer step
    assert step_in_schedule(2, 4, 3)  # a batch that ran two optimizer steps (two optimizers): index 3 ran


def test_monitor_counts_optimizer_steps_under_accumulation(tmp_path):
    L.seed_everything(0)
    mon = EnergyMonitor(every_n_steps=2)
    t = trainer(tmp_path, max_steps=5, accumulate_grad_batches=3, callbacks=[mon])
    t.fit(PlainNet(), make_loader(n=16 * 15))
    assert t.global_step == 5
    # after optimizer steps 0, 2, 4 (global_step 1, 3, 5), each logged once although a step spans 3 batches
    assert [r["step"] for r in mon.history if r["layer"] == "fc1"] == [1, 3, 5]


# ----------------------------------------------------------------------------------- large output layers
VOCAB, DIM = 5000, 8


class TinyLM(L.LightningModule):
    """A bigram language model: token embedding -> a 5000-word decoder (an LM's output layer, tiny d)."""

    def __init__(self, vocab: int = VOCAB, dim: int = DIM):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.decoder = nn.Linear(dim, vocab)

    def forward(self, tokens):
        return self.decoder(self.embed(tokens))

    def training_step(self, batch, batch_idx):
        tokens, next_tokens = batch
        return nn.functional.cross_entropy(self(tokens), next_tokens)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _lm_loader():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (64,), generator=g)
    return DataLoader(TensorDataset(tokens, torch.roll(tokens, -1)), batch_size=16)


def test_large_output_layer_uses_the_labels_term_by_default(tmp_path, caplog):
    L.seed_everything(0)
    model = TinyLM()
    seen = WeightsAtBatchStart()
    cb = MHERegularizer(hidden_weight=0.0, output_weight=2.0)
    assert cb.output_mode == "auto"
    with caplog.at_level(logging.INFO):
        t = trainer(tmp_path, max_steps=1, callbacks=[cb, seen])
        t.fit(model, _lm_loader())
    assert cb.resolved_output_mode == "labels"
    notice = [r.getMessage() for r in caplog.records if "output_mode='full'" in r.getMessage()]
    assert len(notice) == 1 and "'decoder'" in notice[0] and "5000 neurons" in notice[0]
    w = seen.params["decoder.weight"].double()
    labels = next(iter(_lm_loader()))[1]
    # the term is the mini-batch one (float64 reference with the batch's labels), not the full energy
    expected = output_energy_from_labels(w, labels).item()
    assert t.callback_metrics["mhe/energy/decoder"].item() == pytest.approx(expected, rel=1e-5)
    assert t.callback_metrics["mhe/penalty"].item() == pytest.approx(2.0 * expected, rel=1e-5)
    assert expected != pytest.approx(hyperspherical_energy(w).item(), rel=1e-4)  # (they differ by 9e-4)


def test_output_mode_full_or_a_small_output_keeps_the_full_energy(tmp_path):
    forced = MHERegularizer(hidden_weight=0.0, output_mode="full")
    forced.resolve(TinyLM(vocab=4200))
    assert forced.resolved_output_mode == "full"
    at_limit = MHERegularizer(hidden_weight=0.0)
    at_limit.resolve(TinyLM(vocab=4096))  # exactly 4096: not more
    assert at_limit.resolved_output_mode == "full"
    L.seed_everything(0)
    model = PlainNet()
    seen = WeightsAtBatchStart()
    t = trainer(tmp_path, max_steps=2, callbacks=[MHERegularizer(hidden_weight=0.0, output_weight=1.0), seen])
    t.fit(model, make_loader())
    w = seen.params["out.weight"].double()
    assert t.callback_metrics["mhe/penalty"].item() == pytest.approx(hyperspherical_energy(w).item(), rel=1e-5)
    assert np.isfinite(t.callback_metrics["mhe/energy/out"].item())
