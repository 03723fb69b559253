"""The callbacks' side of the selection core: groups resolved on the first training batch (forward order,
lazy layers, custom inputs), the table printed once on rank zero, a failed forward falling back with one
warning, grouped convolutions as the mean over groups, and the deprecated names."""
from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_hyper.callbacks import CoMHERegularizer, EnergyMonitor, MHERegularizer
from lightning_hyper.functional import hyperspherical_energy
from tests.callbacks.helpers import PlainNet, make_loader, trainer

TABLE_LOGGER = "lightning.pytorch.utilities.rank_zero"


class Reversed(PlainNet):
    """Modules defined in reverse execution order: the last-defined Linear (``fc1``) runs first."""

    def __init__(self):
        super().__init__()
        out, fc2, fc1 = self.out, self.fc2, self.fc1
        del self.fc1, self.fc2, self.out
        self.out, self.fc2, self.fc1 = out, fc2, fc1


def _fit(tmp_path, model, callbacks, data=None, **kw):
    kw.setdefault("max_steps", 2)
    t = trainer(tmp_path, callbacks=list(callbacks), **kw)
    t.fit(model, data if data is not None else make_loader())
    return t


def test_output_layer_by_forward_order_and_one_table(tmp_path, caplog):
    model = Reversed()
    assert [n for n, _ in model.named_modules()][1:] == ["out", "fc2", "fc1"]
    mhe, mon = MHERegularizer(), EnergyMonitor(every_n_steps=1)
    with caplog.at_level(logging.INFO, logger=TABLE_LOGGER):
        _fit(tmp_path, model, [mhe, mon], max_steps=3)
    assert [(g.name, g.role) for g in mhe.layers] == [("out", "output"), ("fc2", "hidden"), ("fc1", "hidden")]
    assert [(g.name, g.role) for g in mon.layers] == [(g.name, g.role) for g in mhe.layers]
    tables = [r.getMessage() for r in caplog.records if "neuron group(s)" in r.getMessage()]
    assert len(tables) == 2  # one per callback for the whole fit, not one per step
    assert tables[0].startswith("MHERegularizer: 3 neuron group(s), output layer 'out' (from the last neuron layer "
                                "of the forward pass on the first training batch)")
    rows = [line.split() for line in tables[0].splitlines()[1:]]
    assert rows == [["name", "role", "N", "d", "groups"], ["out", "output", "5", "16", "1"],
                    ["fc2", "hidden", "16", "16", "1"], ["fc1", "hidden", "16", "12", "1"]]


def test_verbose_false_prints_nothing(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger=TABLE_LOGGER):
        _fit(tmp_path, PlainNet(), [MHERegularizer(verbose=False), EnergyMonitor(verbose=False)])
    assert not [r for r in caplog.records if "neuron group(s)" in r.getMessage()]


class NoForward(L.LightningModule):
    """The network lives in ``self.net`` and ``training_step`` calls it; the module has no ``forward``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_failed_forward_falls_back_with_one_warning(tmp_path):
    cb = MHERegularizer()
    with pytest.warns(UserWarning, match=r"running NoForward on the first training batch to find its output layer "
                                         r"failed.*Fix: pass output_layer=") as record:
        _fit(tmp_path, NoForward(), [cb], max_steps=3)
    assert sum("first training batch" in str(w.message) for w in record) == 1
    assert [(g.name, g.role) for g in cb.layers] == [("net.0", "hidden"), ("net.2", "output")]
    # a getter that calls what training_step calls: no warning, same groups
    import warnings

    class Inputs(NoForward):
        def forward(self, x):
            return self.net(x)

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec).*")
        other = MHERegularizer()
        _fit(tmp_path, Inputs(), [other])
    assert [(g.name, g.role) for g in other.layers] == [("net.0", "hidden"), ("net.2", "output")]


def test_custom_inputs_getter_for_dict_batches(tmp_path):
    class DictNet(PlainNet):
        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch["features"]), batch["target"])

    base = make_loader()
    data = DataLoader([{"features": x, "target": y} for x, y in base.dataset], batch_size=16)
    seen = []

    def inputs(batch):
        seen.append(batch["features"].shape)
        return batch["features"]

    cb = MHERegularizer(inputs=inputs, labels=lambda b: b["target"], output_mode="labels")
    _fit(tmp_path, DictNet(), [cb], data=data, max_steps=3)
    assert seen == [torch.Size([16, 12])]  # once, on the first batch
    assert [g.role for g in cb.layers] == ["hidden", "hidden", "output"]
    with pytest.raises(TypeError, match="inputs="):
        MHERegularizer(inputs="x")


def test_the_selection_forward_changes_no_random_draw(tmp_path):
    """The forward pass that resolves the groups runs in eval mode with the RNG state restored: a model that
    draws random numbers in every forward (noise, dropout) trains exactly as when the penalty is added by hand."""

    class Drop(PlainNet):
        def __init__(self, hand=False):
            super().__init__()
            self.drop, self.hand = nn.Dropout(0.5), hand

        def forward(self, x):
            x = x + 0.1 * torch.randn_like(x)  # drawn in eval mode too
            return self.out(torch.relu(self.fc2(self.drop(torch.relu(self.fc1(x))))))

        def extra_loss(self, batch):
            if not self.hand:
                return torch.zeros(())
            hidden = sum(hyperspherical_energy(m.weight) for m in (self.fc1, self.fc2))
            return 10.0 * hidden + hyperspherical_energy(self.out.weight)

    def params(m):
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    L.seed_everything(0)
    ref = Drop(hand=True)
    _fit(tmp_path, ref, [], max_steps=4)
    L.seed_everything(0)
    model = Drop()
    cb = MHERegularizer(max_grad_norm=None)
    _fit(tmp_path, model, [cb], max_steps=4)
    assert cb._output_how.startswith("the last neuron layer of the forward pass")  # the forward did run
    torch.testing.assert_close(params(model), params(ref), rtol=1e-5, atol=1e-6)


def test_lazy_layers_are_selected_after_the_first_batch(tmp_path):
    class Lazy(PlainNet):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.LazyLinear(16)

    model = Lazy()
    cb, mon = MHERegularizer(), EnergyMonitor(every_n_steps=1)
    t = _fit(tmp_path, model, [cb, mon], max_steps=3)
    assert [(g.name, g.role, g.shape) for g in cb.layers][0] == ("fc1", "hidden", (16, 12))
    assert "mhe/energy/fc1" in t.callback_metrics and "monitor/energy/fc1" in t.callback_metrics
    assert model.fc1.weight.grad is not None and torch.isfinite(model.fc1.weight).all()


def test_grouped_convolution_penalty_is_the_mean_over_groups():
    conv = nn.Conv2d(4, 6, 3, groups=2, bias=False)  # 2 groups of 3 filters of dimension 2*3*3 = 18
    model = nn.Sequential(conv, nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(1, 4, 5, 5))
    for cls, kw in ((MHERegularizer, {"hidden_weight": 1.0, "output_weight": 0.0}),
                    (CoMHERegularizer, {"output_weight": 0.0})):
        cb = cls(**kw)
        cb.layers = cb.selection.resolve(model)
        terms = cb.layer_terms(cb.layers[0], None, 0)
        w = conv.weight.detach().double().reshape(2, 3, 18)
        half = cls is CoMHERegularizer  # CoMHE: half-space on hidden layers (D = 18 <= 30: no projection)
        per_group = [hyperspherical_energy(w[g], half_space=half).item() for g in range(2)]
        assert terms["penalty"].item() == pytest.approx(sum(per_group) / 2, rel=1e-5)
        whole = hyperspherical_energy(w.reshape(6, 18), half_space=half).item()  # one sphere: the wrong answer
        assert terms["penalty"].item() != pytest.approx(whole, rel=1e-2)


def test_argument_errors_come_before_the_first_step(tmp_path):
    class Count(PlainNet):
        steps = 0

        def training_step(self, batch, batch_idx):
            Count.steps += 1
            return super().training_step(batch, batch_idx)

    with pytest.raises(ValueError, match=r"include: pattern 'conv\*' matches no layer"):
        _fit(tmp_path, Count(), [MHERegularizer(include="conv*")])
    with pytest.raises(ValueError, match="output_layer='classifier' is not a layer with neurons"):
        _fit(tmp_path, Count(), [EnergyMonitor(output_layer="classifier")])
    assert Count.steps == 0
    with pytest.raises(TypeError, match=r"include=3 is not supported"):
        MHERegularizer(include=3)


def test_include_filters_every_group_and_layer_types_match_bases(tmp_path):
    cb = MHERegularizer(include="fc*")
    _fit(tmp_path, PlainNet(), [cb])
    assert [g.name for g in cb.layers] == ["fc1", "fc2"]  # the output layer is filtered too
    assert [s for s in cb.skipped if s.name == "out"] == [("out", "excluded")]
    frozen = PlainNet()
    frozen.fc2.requires_grad_(False)
    cb = MHERegularizer(layer_types=[nn.Linear])
    _fit(tmp_path, frozen, [cb])
    assert [g.name for g in cb.layers] == ["fc1", "out"] and ("fc2", "frozen") in cb.skipped


def test_deprecated_names_still_work():
    from lightning_hyper.callbacks import base

    with pytest.warns(DeprecationWarning, match="LayerSelection is deprecated"):
        groups = base.LayerSelection(exclude="out").resolve(PlainNet())
    assert [g.name for g in groups] == ["fc1", "fc2"]
    from lightning_hyper.nn import NeuronGroup

    with pytest.warns(DeprecationWarning, match="LayerRef is deprecated"):
        assert base.LayerRef is NeuronGroup


def test_an_unreadable_layer_is_reported_once_per_fit(tmp_path):
    """A weight-holding module of an unknown type: one warning for the whole fit (two callbacks, four steps)
    and a skipped row in each callback's table."""

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(16, 16) * 0.1)

        def forward(self, x):
            return x @ self.weight

    class WithGate(PlainNet):
        def __init__(self):
            super().__init__()
            self.gate = Gate()

        def forward(self, x):
            return self.out(torch.relu(self.fc2(self.gate(torch.relu(self.fc1(x))))))

    mhe, mon = MHERegularizer(), EnergyMonitor(every_n_steps=1)
    with pytest.warns(UserWarning, match=r"cannot read the neurons of 'gate' \(Gate\)") as record:
        _fit(tmp_path, WithGate(), [mhe, mon], max_steps=4)
    assert sum("cannot read the neurons" in str(w.message) for w in record) == 1
    assert ("gate", "unreadable weight type Gate") in mhe.skipped
    assert ("gate", "unreadable weight type Gate") in mon.skipped
    assert "unreadable weight type Gate" in mhe.selection_report()
