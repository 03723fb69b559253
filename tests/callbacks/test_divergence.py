"""Divergence is named as divergence: when the model's own loss, gradients or weights turn NaN/Inf the
callbacks say that training diverged, at which step, where, and what to change; only a penalty that is
itself the cause is blamed (with the option that fixes it)."""
from __future__ import annotations

import lightning as L
import pytest
import torch


from lightning_hyper.callbacks import CoMHERegularizer, EnergyMonitor, MHERegularizer, TrainingDivergedError
from tests.callbacks.helpers import PlainNet, make_loader, trainer

FIXES = ("lr", "gradient_clip_val", "warmup_steps", "on_nonfinite='skip'")


class NaNLossAt(PlainNet):
    """The loss of batch ``bad`` is NaN (e.g. a log of 0 in the user's loss)."""

    def __init__(self, bad: int = 2, **kw):
        super().__init__(**kw)
        self.bad = bad

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if batch_idx == self.bad else loss


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def fit(model, tmp_path, callbacks, **kw):
    kw.setdefault("max_steps", 6)
    t = trainer(tmp_path, callbacks=list(callbacks), **kw)
    t.fit(model, make_loader(n=96, batch_size=16))
    return t


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mode", ["loss", "gradient"])
def test_a_too_large_learning_rate_is_reported_as_divergence(tmp_path, mode, seed):
    """lr=1e6 blows the model up by itself: the error says so and suggests what to change, and does
    not blame the energy ("the energy of such neurons is undefined")."""
    L.seed_everything(seed)
    with pytest.raises(TrainingDivergedError) as err:
        fit(PlainNet(lr=1e6), tmp_path, [MHERegularizer(mode=mode), EnergyMonitor(every_n_steps=1)], max_steps=50)
    msg = str(err.value)
    assert msg.startswith("Training diverged") and "global step" in msg
    assert all(fix in msg for fix in FIXES), msg
    assert "undefined" not in msg and len(msg.splitlines()) == 1


@pytest.mark.parametrize("mode", ["loss", "gradient"])
def test_nan_loss_names_the_loss_and_the_step(tmp_path, mode):
    with pytest.raises(TrainingDivergedError, match=r"global step 2: the loss returned by training_step is nan "
                                                    r"while every weight is finite"):
        fit(NaNLossAt(bad=2), tmp_path, [MHERegularizer(mode=mode)])


def test_nan_loss_is_skipped_with_on_nonfinite_skip(tmp_path):
    seen = []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(params(pl_module))

    model = NaNLossAt(bad=2)
    with pytest.warns(RuntimeWarning,
                      match="the training loss is nan at global step 2; this optimizer step is skipped"):
        fit(model, tmp_path, [MHERegularizer(on_nonfinite="skip"), Watch()])
    assert torch.equal(seen[1], seen[2])  # batch 2 changed nothing
    assert not torch.equal(seen[2], seen[3])  # training went on
    assert torch.isfinite(params(model)).all()


class NaNWeightAt(L.Callback):
    def __init__(self, step: int, layer: str) -> None:
        self.step, self.layer = step, layer

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.get_submodule(self.layer).weight[0, 0] = float("nan")


@pytest.mark.parametrize("callback", [MHERegularizer, CoMHERegularizer])
def test_nan_weights_name_the_layer(tmp_path, callback):
    with pytest.raises(TrainingDivergedError, match=r"global step 3: .*the weights of layer 'fc2' are already NaN/Inf"):
        fit(PlainNet(), tmp_path, [callback(), NaNWeightAt(3, "fc2")])


def test_monitor_alone_names_divergence(tmp_path):
    with pytest.raises(TrainingDivergedError, match="weights of layer 'fc1' contain NaN or Inf, so EnergyMonitor"):
        fit(PlainNet(), tmp_path, [NaNWeightAt(2, "fc1"), EnergyMonitor(every_n_steps=1)])


def once(param: torch.Tensor, fn) -> None:
    """Apply ``fn`` to the next gradient computed for ``param`` only."""
    handle = None

    def hook(g):
        handle.remove()
        return fn(g)

    handle = param.register_hook(hook)


class NaNGradient(PlainNet):
    """A finite loss whose gradient is NaN in ``fc1`` at batch 1 (a broken custom backward)."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if batch_idx == 1:
            once(self.fc1.weight, lambda g: g * float("nan"))
        return loss


@pytest.mark.parametrize("mode", ["loss", "gradient"])
def test_nan_gradient_names_the_parameter_and_blames_the_loss(tmp_path, mode):
    with pytest.raises(TrainingDivergedError, match=r"global step 1: the gradient of parameter 'fc1.weight' contains "
                                                    r"NaN or Inf; the model's own loss gradient is the cause"):
        fit(NaNGradient(), tmp_path, [MHERegularizer(mode=mode)])


def test_penalty_gradient_that_overflows_blames_the_penalty(tmp_path):
    """Two exactly identical neurons with a tiny eps: the penalty is finite (1/eps) but its gradient is not
    computable in float32; the error blames the penalty and names the option that fixes it."""

    class Twins(PlainNet):
        def __init__(self):
            super().__init__()
            with torch.no_grad():
                self.fc1.weight[1] = self.fc1.weight[0]

    with pytest.raises(FloatingPointError) as err:
        fit(Twins(), tmp_path, [MHERegularizer(mode="gradient", eps=1e-30, s=4)], max_steps=1)
    msg = str(err.value)
    assert "penalty" in msg and ("eps" in msg or "warmup_steps" in msg)
    assert not isinstance(err.value, TrainingDivergedError) or "penalty gradient is the cause" in msg


def test_weights_made_infinite_by_the_step_are_named(tmp_path):
    """A finite but huge gradient: the optimizer step itself makes a weight Inf."""

    class Huge(PlainNet):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            if batch_idx == 1:
                once(self.out.weight, lambda g: g / g.abs().max() * 1e38)  # finite, but lr * g is not
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=10.0)

    with pytest.raises(TrainingDivergedError, match=r"global step 2: the optimizer step made parameter 'out.weight' "
                                                    r"NaN or Inf"):
        fit(Huge(), tmp_path, [MHERegularizer()])


def test_finite_training_is_untouched(tmp_path):
    """The checks change nothing when training is finite (same weights as without them is covered by
    the hand-written-penalty tests); here: a normal run ends with finite weights and no warning."""
    import warnings

    model = PlainNet(lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fit(model, tmp_path, [MHERegularizer()])
    assert torch.isfinite(params(model)).all()


def test_error_class_is_a_floating_point_and_value_error():
    assert issubclass(TrainingDivergedError, FloatingPointError) and issubclass(TrainingDivergedError, ValueError)
