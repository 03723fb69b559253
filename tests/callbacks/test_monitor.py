import lightning as L
import numpy as np
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
    for name, _module in (("fc1", model.fc1), ("out", model.out)):
        assert f"monitor/energy/{name}" in t.callback_metrics
        assert f"monitor/min_angle/{name}" in t.callback_metrics
    assert mon.compute()["fc2"] == pytest.approx(hyperspherical_energy(model.fc2.weight.detach()).item())


def _min_angle_degrees(w: torch.Tensor) -> float:
    """Smallest angle between two rows, float64 NumPy."""
    x = w.detach().double().numpy()
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = np.clip(u @ u.T, -1.0, 1.0)
    n = len(u)
    return float(min(np.degrees(np.arccos(c[i, j])) for i in range(n) for j in range(n) if i != j))


def test_monitor_logs_min_angle_and_energy_of_final_weights(tmp_path):
    L.seed_everything(0)
    model = PlainNet()
    t = trainer(tmp_path, callbacks=[EnergyMonitor(every_n_steps=1, log_min_angle=True)])
    t.fit(model, make_loader())
    for name in ("fc1", "fc2", "out"):
        w = getattr(model, name).weight
        angle = t.callback_metrics[f"monitor/min_angle/{name}"].item()
        assert angle == pytest.approx(_min_angle_degrees(w), abs=2e-3)  # degrees; float32 arccos near 1
        assert 0 < angle < 90
        assert t.callback_metrics[f"monitor/energy/{name}"].item() == pytest.approx(
            hyperspherical_energy(w.detach().double()).item(), rel=1e-5)


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
