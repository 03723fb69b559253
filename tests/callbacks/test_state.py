"""Checkpoint state of the callbacks: several instances of one class in one Trainer get their own state
keys (and metric prefixes), WeightProjection / PretrainedInit / SOPTResampler keep their state under a
state key, and a checkpoint that holds no state for a callback warns when it is loaded."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_hyper.callbacks import (
    EnergyMonitor,
    MHERegularizer,
    PretrainedInit,
    SOPTResampler,
    WeightProjection,
)
from tests.callbacks.helpers import PlainNet, make_loader, trainer
from tests.reliability.families import DCNet, loader


def _fit(tmp_path, model, callbacks, data=None, **kw):
    kw.setdefault("max_steps", 4)
    ckpt_path = kw.pop("ckpt_path", None)
    t = trainer(tmp_path, callbacks=list(callbacks), **kw)
    t.fit(model, data if data is not None else make_loader(), ckpt_path=ckpt_path)
    return t


def test_two_instances_of_one_class_get_distinct_keys_and_prefixes(tmp_path):
    """Two MHERegularizer() (same prefix) and two EnergyMonitor(): Lightning's duplicate-key check passes,
    the second of each is numbered, and their metrics do not overwrite each other."""
    a, b = MHERegularizer(hidden_weight=0.0, verbose=False), MHERegularizer(output_weight=0.0, verbose=False)
    m1, m2 = EnergyMonitor(every_n_steps=1, verbose=False), EnergyMonitor(every_n_steps=2, verbose=False)
    t = _fit(tmp_path, PlainNet(), [a, m1, b, m2])
    assert a.state_key == "MHERegularizer{'prefix': 'mhe'}" and b.state_key == "MHERegularizer{'prefix': 'mhe'}#2"
    assert m1.state_key == "EnergyMonitor{'prefix': 'monitor'}" and m2.state_key.endswith("#2")
    assert (a.log_prefix, b.log_prefix, m2.log_prefix) == ("mhe", "mhe_2", "monitor_2")
    metrics = t.callback_metrics
    # a penalizes only the output layer, b only the hidden layers: each logs its own total
    assert metrics["mhe/penalty"].item() != pytest.approx(metrics["mhe_2/penalty"].item(), rel=1e-3)
    assert "mhe/energy/out" in metrics and "mhe_2/energy/fc1" in metrics and "mhe/energy/fc1" not in metrics
    assert {"monitor/energy/fc1", "monitor_2/energy/fc1"} <= set(metrics)


def _dcnet_run(tmp_path, steps, callbacks, ckpt_path=None):
    L.seed_everything(0, verbose=False)
    model = DCNet()
    t = trainer(tmp_path, max_steps=steps, callbacks=callbacks)
    t.fit(model, loader(), ckpt_path=ckpt_path)
    return t


def test_two_weight_projections_save_and_restore_their_own_state(tmp_path):
    first, second = WeightProjection(every_n_steps=1), WeightProjection(every_n_steps=2)
    t = _dcnet_run(tmp_path, 3, [first, second])
    assert (first.num_projections, second.num_projections) == (3, 1)
    path = tmp_path / "wp.ckpt"
    t.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["callbacks"]
    assert saved["WeightProjection"] == {"last_step": 3, "num_projections": 3}
    assert saved["WeightProjection#2"] == {"last_step": 2, "num_projections": 1}
    again = [WeightProjection(every_n_steps=1), WeightProjection(every_n_steps=2)]
    _dcnet_run(tmp_path, 4, again, ckpt_path=path)
    assert (again[0].num_projections, again[1].num_projections) == (4, 2)  # restored 3 and 1, then step 4


def test_stateful_callbacks_keep_their_state_under_a_state_key():
    class FakeTrainer:
        def __init__(self, callbacks):
            self.callbacks = callbacks

    for make in (lambda: WeightProjection(), lambda: PretrainedInit(PlainNet()), lambda: SOPTResampler(seed=1)):
        one, two = make(), make()
        assert one.state_key != two.state_key  # before setup: unique, so Trainer(...) accepts both
        trainer_ = FakeTrainer([one, two])
        for cb in (one, two):
            cb._assign_state_key(trainer_)
        name = type(one).__name__
        assert (one.state_key, two.state_key) == (name, f"{name}#2")


def test_a_checkpoint_without_the_callbacks_state_warns_on_load(tmp_path):
    L.seed_everything(0)
    t = _fit(tmp_path, PlainNet(), [], max_steps=2)
    path = tmp_path / "plain.ckpt"
    t.save_checkpoint(path)
    monitor = EnergyMonitor(every_n_steps=1, verbose=False)
    with pytest.warns(UserWarning, match=r"EnergyMonitor: the checkpoint holds no state for this callback \(state "
                                         r"key \"EnergyMonitor\{'prefix': 'monitor'\}\""):
        _fit(tmp_path, PlainNet(), [monitor, MHERegularizer(verbose=False)], max_steps=3, ckpt_path=path)
    assert monitor._batches == 1  # fresh state, one batch after the restored step 2
    # with the state present: no such warning
    t = _fit(tmp_path, PlainNet(), [EnergyMonitor(every_n_steps=1, verbose=False)], max_steps=2)
    t.save_checkpoint(path)
    import warnings

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        restored = EnergyMonitor(every_n_steps=1, verbose=False)
        _fit(tmp_path, PlainNet(), [restored], max_steps=3, ckpt_path=path)
    assert not [w for w in record if "holds no state" in str(w.message)]
    assert restored._batches == 3
