"""MHERegularizer on real Trainers with plain LightningModules written here."""
from __future__ import annotations

import types

import lightning as L
import pytest
import torch

from lightning_hyper.callbacks import EnergyMonitor, MHERegularizer, TrainingDivergedError
from lightning_hyper.callbacks.base import LayerSelection, check_strategy
from lightning_hyper.functional import hyperspherical_energy, output_energy_from_labels
from tests.callbacks.helpers import WeightsAtBatchStart, ManualNet, PlainNet, make_loader, trainer


def hand_penalty(model: PlainNet, hidden_weight: float, output_weight: float, s: float = 2.0,
                 half_space: bool = False, labels=None) -> torch.Tensor:
    """Eq. 5.4 written by hand: λ_h Σ_hidden Ē + λ_o Ē_out."""
    hidden = sum(hyperspherical_energy(m.weight, s=s, half_space=half_space) for m in (model.fc1, model.fc2))
    out = (hyperspherical_energy(model.out.weight, s=s) if labels is None
           else output_energy_from_labels(model.out.weight, labels, s=s))
    return hidden_weight * hidden + output_weight * out


class HandNet(PlainNet):
    def __init__(self, hw, ow, half_space=False, labels_mode=False, **kw):
        super().__init__(**kw)
        self.hw, self.ow, self.half_space, self.labels_mode = hw, ow, half_space, labels_mode

    def extra_loss(self, batch):
        return hand_penalty(self, self.hw, self.ow, half_space=self.half_space,
                            labels=batch[1] if self.labels_mode else None)


class HandManualNet(ManualNet):
    def extra_loss(self, batch):
        return hand_penalty(self, 3.0, 0.5)


def fit(model, tmp_path, callbacks=(), **kw):
    t = trainer(tmp_path, callbacks=list(callbacks), **kw)
    t.fit(model, make_loader())
    return t


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_user_example_logs_penalty_and_energies(tmp_path):
    L.seed_everything(0)
    model = PlainNet()
    seen = WeightsAtBatchStart()
    t = fit(model, tmp_path, [MHERegularizer(s=2, half_space=True), EnergyMonitor(every_n_steps=1), seen])
    keys = set(t.callback_metrics)
    assert {"mhe/penalty", "mhe/energy/fc1", "mhe/energy/fc2", "mhe/energy/out"} <= keys
    assert {"monitor/energy/fc1", "monitor/energy/fc2", "monitor/energy/out"} <= keys
    # the logged hidden energy is the half-space one, the output energy is full-space, both of the
    # weights the last step started from (the nearest wrong answers differ by > 1 %)
    for name, half in (("fc1", True), ("fc2", True), ("out", False)):
        w = seen.params[f"{name}.weight"].double()
        logged = t.callback_metrics[f"mhe/energy/{name}"].item()
        assert logged == pytest.approx(hyperspherical_energy(w, half_space=half).item(), rel=1e-5)
        assert logged != pytest.approx(hyperspherical_energy(w, half_space=not half).item(), rel=5e-3)
    assert "training_step" not in model.__dict__  # unwrapped after fit


@pytest.mark.parametrize("half_space", [False, True])
def test_regularized_energy_is_lower(tmp_path, half_space):
    def run(callbacks):
        L.seed_everything(1)
        model = PlainNet(lr=0.05)
        fit(model, tmp_path, callbacks, max_steps=30)
        return [hyperspherical_energy(m.weight.detach(), half_space=half_space and m is not model.out).item()
                for m in (model.fc1, model.fc2, model.out)]

    base = run([])
    reg = run([MHERegularizer(s=2, half_space=half_space)])
    assert all(r < b for r, b in zip(reg, base)), (reg, base)


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("mode", ["loss", "gradient"])
def test_same_weights_as_hand_written_penalty(tmp_path, accumulate, clip, mode):
    kw = dict(accumulate_grad_batches=accumulate, gradient_clip_val=clip, max_steps=4)
    L.seed_everything(0)
    ref = HandNet(3.0, 0.5)
    fit(ref, tmp_path, **kw)
    L.seed_everything(0)
    model = PlainNet()
    fit(model, tmp_path, [MHERegularizer(hidden_weight=3.0, output_weight=0.5, mode=mode)], **kw)
    torch.testing.assert_close(params(model), params(ref), rtol=1e-5, atol=1e-6)
    L.seed_everything(0)
    plain = PlainNet()
    fit(plain, tmp_path, **kw)
    assert not torch.allclose(params(plain), params(ref), atol=1e-4)  # the penalty did change training


def test_half_space_and_labels_mode_match_hand_written(tmp_path):
    L.seed_everything(0)
    ref = HandNet(1.0, 2.0, half_space=True, labels_mode=True)
    fit(ref, tmp_path)
    L.seed_everything(0)
    model = PlainNet()
    fit(model, tmp_path, [MHERegularizer(half_space=True, output_weight=2.0, output_mode="labels")])
    torch.testing.assert_close(params(model), params(ref), rtol=1e-5, atol=1e-6)


def test_bf16_mixed_matches_hand_written(tmp_path):
    kw = dict(precision="bf16-mixed", max_steps=3)
    L.seed_everything(0)
    ref = HandNet(3.0, 0.5)
    fit(ref, tmp_path, **kw)
    L.seed_everything(0)
    model = PlainNet()
    t = fit(model, tmp_path, [MHERegularizer(hidden_weight=3.0, output_weight=0.5)], **kw)
    assert torch.isfinite(params(model)).all()
    torch.testing.assert_close(params(model), params(ref), rtol=1e-6, atol=1e-7)  # observed: identical
    assert t.callback_metrics["mhe/penalty"].dtype == torch.float32


def test_manual_optimization_uses_gradient_mode(tmp_path):
    L.seed_everything(0)
    ref = HandManualNet()
    fit(ref, tmp_path)
    L.seed_everything(0)
    model = ManualNet()
    cb = MHERegularizer(hidden_weight=3.0, output_weight=0.5)
    t = fit(model, tmp_path, [cb])
    assert cb._active_mode == "gradient"
    assert "mhe/penalty" in t.callback_metrics
    torch.testing.assert_close(params(model), params(ref), rtol=1e-5, atol=1e-6)


def test_loss_mode_with_manual_optimization_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="mode='gradient'"):
        fit(ManualNet(), tmp_path, [MHERegularizer(mode="loss")])


def test_only_output_layer_when_hidden_weight_zero(tmp_path):
    model = PlainNet()
    cb = MHERegularizer(hidden_weight=0.0, output_weight=1.0)
    cb.layers = cb.selection.resolve(model)
    total = cb.penalty(model, log=False)
    total.backward()
    assert model.fc1.weight.grad is None and model.fc2.weight.grad is None
    assert model.out.weight.grad.abs().sum() > 0


def test_two_callbacks_stack_and_unwrap(tmp_path):
    model = PlainNet()
    a = MHERegularizer(output_weight=0.0, prefix="a")
    b = MHERegularizer(hidden_weight=0.0, prefix="b")
    t = fit(model, tmp_path, [a, b], max_steps=2)
    assert {"a/penalty", "b/penalty"} <= set(t.callback_metrics)
    assert "training_step" not in model.__dict__


def test_neuron_subsets_are_seeded_and_unbiased():
    w = torch.randn(64, 10, dtype=torch.float64)
    cb = MHERegularizer(neuron_batch_size=8, seed=3)
    subs = [cb.energy(cb._subset(w, 0, step), "hidden").item() for step in range(3000)]
    full = cb.energy(w, "hidden").item()
    mean = sum(subs) / len(subs)
    sem = (sum((x - mean) ** 2 for x in subs) / (len(subs) - 1)) ** 0.5 / len(subs) ** 0.5
    assert abs(mean - full) < 4 * sem
    assert torch.equal(cb._subset(w, 0, 5), MHERegularizer(neuron_batch_size=8, seed=3)._subset(w, 0, 5))


def test_warmup_ramps_weight():
    model = PlainNet()
    cb = MHERegularizer(warmup_steps=4)
    cb.layers = cb.selection.resolve(model)
    full = MHERegularizer()
    full.layers = full.selection.resolve(model)
    t0 = cb.layer_terms(cb.layers[0], None, 0)["penalty"]
    t_full = full.layer_terms(full.layers[0], None, 0)["penalty"]
    assert t0.item() == pytest.approx(t_full.item() / 4)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs,word", [
    ({"metric": "manhattan"}, "metric"), ({"s": -1}, "s="), ({"output_mode": "batch"}, "output_mode"),
    ({"hidden_reduction": "max"}, "hidden_reduction"), ({"mode": "hook"}, "mode"),
    ({"hidden_weight": -1.0}, "hidden_weight"), ({"output_weight": float("nan")}, "output_weight"),
    ({"neuron_batch_size": 1}, "neuron_batch_size"), ({"on_nonfinite": "ignore"}, "on_nonfinite"),
])
def test_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word) as err:
        MHERegularizer(**kwargs)
    assert "accepted" in str(err.value)


def test_pattern_that_matches_nothing(tmp_path):
    with pytest.raises(ValueError, match="include.*'conv\\*'"):
        fit(PlainNet(), tmp_path, [MHERegularizer(include="conv*")])
    with pytest.raises(ValueError, match="output_layer"):
        fit(PlainNet(), tmp_path, [MHERegularizer(output_layer="classifier")])
    with pytest.raises(ValueError, match="layer_types"):
        LayerSelection(layer_types="Conv2d").resolve(PlainNet())


def test_nan_weights_raise_naming_layer(tmp_path):
    model = PlainNet()
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDivergedError, match=r"(?s)Training diverged at global step 0.*'fc2'.*lr"):
        fit(model, tmp_path, [MHERegularizer()])


def test_zero_norm_neurons(tmp_path):
    model = PlainNet()
    with torch.no_grad():
        model.fc1.weight[3] = 0
    with pytest.raises(ValueError, match="fc1.*zero_norm"):
        fit(model, tmp_path, [MHERegularizer(zero_norm="error")], max_steps=1)
    fit(model, tmp_path, [MHERegularizer(zero_norm="exclude")], max_steps=2)
    assert torch.isfinite(params(model)).all()
    # the default ("warn"): left out, with one warning for the whole fit
    with torch.no_grad():
        model.fc1.weight[3] = 0
    with pytest.warns(UserWarning, match=r"zero norm.*'fc1' \(1 of 16\)") as record:
        fit(model, tmp_path, [MHERegularizer()], max_steps=3)
    assert sum("zero norm" in str(w.message) for w in record) == 1
    assert torch.isfinite(params(model)).all()


def test_sharded_strategies_are_refused():
    from lightning.pytorch import strategies

    for name in ("FSDPStrategy", "DeepSpeedStrategy"):
        cls = getattr(strategies, name)
        fake = types.SimpleNamespace(strategy=cls.__new__(cls))  # (DeepSpeedStrategy() needs deepspeed)
        with pytest.raises(RuntimeError, match="ddp"):
            check_strategy(fake, "MHERegularizer")


def test_fsdp_strategy_refused_in_setup(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    t = types.SimpleNamespace(strategy=FSDPStrategy(), world_size=1)
    with pytest.raises(RuntimeError, match="FSDP"):
        MHERegularizer().setup(t, PlainNet(), "fit")


def test_nonfinite_penalty_policy():
    model = PlainNet()
    cb = MHERegularizer(s=60.0, eps=1e-12, on_nonfinite="error")  # overflowing kernel on duplicate neurons
    with torch.no_grad():
        model.fc1.weight[1] = model.fc1.weight[0]
    cb.layers = cb.selection.resolve(model)
    cb.s = 60.0
    with pytest.raises(FloatingPointError, match="fc1"):
        cb.penalty(model, log=False)
    skip = MHERegularizer(s=60.0, eps=1e-12, on_nonfinite="skip")
    skip.layers = skip.selection.resolve(model)
    with pytest.warns(RuntimeWarning, match="fc1"):
        assert skip.penalty(model, log=False).item() == 0.0
