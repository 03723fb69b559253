import lightning as L
import pytest
import torch

from lightning_hyper.callbacks import EnergyMonitor
from lightning_hyper.functional import hyperspherical_energy
from tests.callbacks.helpers import PlainNet, make_loader, trainer


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_monitor_changes_nothing_and_logs(tmp_path):
    L.seed_everything(0)
    plain = PlainNet()
    trainer(tmp_path).fit(plain, make_loader())
    L.seed_everything(0)
    model = PlainNet()
    mon = EnergyMonitor(every_n_steps=2, log_min_angle=True)
    t = trainer(tmp_path, callbacks=[mon])
    t.fit(model, make_loader())
    assert torch.equal(params(plain), params(model))
    steps = sorted({row["step"] for row in mon.history})
    assert steps == [1, 3, 5]  # batches 1, 3, 5: logged after that many optimizer steps
    for name, module in (("fc1", model.fc1), ("out", model.out)):
        assert f"monitor/energy/{name}" in t.callback_metrics
        assert f"monitor/min_angle/{name}" in t.callback_metrics
    assert mon.compute()["fc2"] == pytest.approx(hyperspherical_energy(model.fc2.weight.detach()).item())


def test_monitor_variant_and_selection(tmp_path):
    mon = EnergyMonitor(s=1, metric="angular", half_space=True, exclude="out")
    model = PlainNet()
    values = mon.compute(model)
    assert set(values) == {"fc1", "fc2"}
    assert values["fc1"] == pytest.approx(hyperspherical_energy(model.fc1.weight.detach(), s=1, metric="angular",
                                                                half_space=True).item())


@pytest.mark.parametrize("kwargs,word", [({"every_n_steps": 0}, "every_n_steps"), ({"metric": "l1"}, "metric"),
                                         ({"s": -2}, "s=")])
def test_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        EnergyMonitor(**kwargs)


def test_state_round_trip():
    mon = EnergyMonitor()
    mon._batches = 7
    other = EnergyMonitor()
    other.load_state_dict(mon.state_dict())
    assert other._batches == 7
