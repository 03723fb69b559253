"""lightning_hyper.viz: plots from real Trainer logs, checked for content and against NumPy references."""
from __future__ import annotations

import math
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from matplotlib.figure import Figure
from matplotlib.image import imread

from lightning_hyper import viz
from lightning_hyper.callbacks import EnergyMonitor, MHERegularizer
from tests.callbacks.helpers import PlainNet, make_loader, trainer

LAYERS = ("fc1", "fc2", "out")


def assert_image(path, min_colored: int = 200) -> np.ndarray:
    """A real picture: big enough, many distinct colors, and colored (non-gray) pixels from the data."""
    img = imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    rgb = img[..., :3]
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 50
    colored = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.2  # axes, ticks and text are gray
    assert colored.sum() > min_colored
    return img


def angles_np(weight: torch.Tensor) -> np.ndarray:
    """Pairwise angles in degrees, float64 NumPy, pairs i < j (independent of functional.pairwise_angles)."""
    w = weight.detach().double().reshape(weight.shape[0], -1).numpy()
    out = []
    for i in range(len(w)):
        for j in range(i + 1, len(w)):
            c = w[i] @ w[j] / (np.linalg.norm(w[i]) * np.linalg.norm(w[j]))
            out.append(math.degrees(math.acos(min(1.0, max(-1.0, c)))))
    return np.array(out)


def fit_logged(tmp_path, logger, monitor: EnergyMonitor, steps: int = 6) -> PlainNet:
    L.seed_everything(0, verbose=False)
    model = PlainNet()
    trainer(tmp_path, logger=logger, log_every_n_steps=1, max_steps=steps,
            callbacks=[MHERegularizer(), monitor]).fit(model, make_loader())
    return model


def monitor_values(monitor: EnergyMonitor, layer: str) -> np.ndarray:
    return np.array([r["energy"] for r in monitor.history if r["layer"] == layer])


# --------------------------------------------------------------------------------- energy curves
def test_energy_plot_from_csv_logs(tmp_path):
    mon = EnergyMonitor(every_n_steps=1)
    logger = CSVLogger(tmp_path / "logs", name="run")
    fit_logged(tmp_path, logger, mon)
    series = viz.load_energy_metrics(logger.log_dir)
    assert set(series) == {f"{p}/energy/{n}" for p in ("mhe", "monitor") for n in LAYERS}
    for name in LAYERS:
        steps, values = series[f"monitor/energy/{name}"]
        assert np.all(np.diff(steps) > 0) and len(steps) == 6
        np.testing.assert_allclose(values, monitor_values(mon, name), rtol=1e-6)
        # MHE logs the energy before each step, the monitor after it: shifted by one step
        np.testing.assert_allclose(series[f"mhe/energy/{name}"][1][1:], values[:-1], rtol=1e-5)
    # the same series from the metrics.csv file and from the folder above the single run
    for source in (f"{logger.log_dir}/metrics.csv", tmp_path / "logs"):
        again = viz.load_energy_metrics(source, prefix="monitor")
        assert set(again) == {f"monitor/energy/{n}" for n in LAYERS}
        np.testing.assert_array_equal(again["monitor/energy/fc1"][1], series["monitor/energy/fc1"][1])

    fig = viz.plot_energy(logger.log_dir, path=tmp_path / "energy.png")
    assert isinstance(fig, Figure)
    lines = fig.axes[0].get_lines()
    assert len(lines) == 6
    assert {ln.get_label() for ln in lines} == {f"{n} ({p})" for p in ("mhe", "monitor") for n in LAYERS}
    assert_image(tmp_path / "energy.png")

    fig = viz.plot_energy(logger.log_dir, prefix="monitor", layers=["fc1"], relative=True, logy=True)
    (line,) = fig.axes[0].get_lines()
    np.testing.assert_allclose(line.get_ydata(), monitor_values(mon, "fc1") / monitor_values(mon, "fc1")[0],
                               rtol=1e-6)
    assert fig.axes[0].get_yscale() == "log"


def test_logged_energies_are_those_of_the_logged_step(tmp_path):
    # the monitor measures at batches 1, 4, 7; Lightning writes the logs at batches 4 and 8: batch 8 must get
    # the energy after batch 8, not the one measured at batch 7
    mon, ref = EnergyMonitor(every_n_steps=3), EnergyMonitor(every_n_steps=1, prefix="ref")
    logger = CSVLogger(tmp_path / "logs", name="run")
    L.seed_everything(0, verbose=False)
    trainer(tmp_path, logger=logger, log_every_n_steps=4, max_steps=8,
            callbacks=[mon, ref]).fit(PlainNet(), make_loader(n=128))
    assert sorted({r["step"] for r in mon.history}) == [1, 4, 7]
    logged = viz.load_energy_metrics(logger.log_dir, prefix="monitor")
    for name in LAYERS:
        steps, values = logged[f"monitor/energy/{name}"]
        np.testing.assert_array_equal(steps, [3, 7])  # the logger's step = optimizer steps before the batch
        np.testing.assert_allclose(values, monitor_values(ref, name)[[3, 7]], rtol=1e-6)


def test_energy_plot_from_tensorboard_and_angle_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, EventAccumulator

    mon = EnergyMonitor(every_n_steps=1, log_histograms=True, histogram_every_n_steps=5)
    logger = TensorBoardLogger(tmp_path / "tb", name="run")
    model = fit_logged(tmp_path, logger, mon)
    logger.experiment.flush()
    series = viz.load_energy_metrics(logger.log_dir, prefix="monitor")
    for name in LAYERS:
        np.testing.assert_allclose(series[f"monitor/energy/{name}"][1], monitor_values(mon, name), rtol=1e-6)
    fig = viz.plot_energy(logger.log_dir, prefix="monitor", path=tmp_path / "tb_energy.png")
    assert len(fig.axes[0].get_lines()) == 3
    assert_image(tmp_path / "tb_energy.png")

    acc = EventAccumulator(logger.log_dir, size_guidance={HISTOGRAMS: 0})
    acc.Reload()
    assert set(acc.Tags()["histograms"]) == {f"monitor/angles/{n}" for n in LAYERS}
    for name in LAYERS:
        events = acc.Histograms(f"monitor/angles/{name}")
        assert [e.step for e in events] == [1, 6]  # batches 1 and 6 (every 5), after their optimizer step
        last = events[-1].histogram_value  # batch 6 is the last: the model's final weights
        ref = angles_np(getattr(model, name).weight)
        n = getattr(model, name).weight.shape[0]
        assert last.num == len(ref) == n * (n - 1) // 2
        assert last.min == pytest.approx(ref.min(), abs=1e-3) and last.max == pytest.approx(ref.max(), abs=1e-3)
        assert last.sum == pytest.approx(ref.sum(), rel=1e-5)


def test_log_histograms_without_tensorboard_warns_and_trains(tmp_path):
    mon = EnergyMonitor(every_n_steps=2, log_histograms=True)
    with pytest.warns(UserWarning, match="TensorBoardLogger"):
        trainer(tmp_path, max_steps=3, callbacks=[mon]).fit(PlainNet(), make_loader())
    assert mon.history  # energies still logged
    with warnings.catch_warnings():  # no TensorBoard logger needed without log_histograms
        warnings.filterwarnings("error", message=".*TensorBoardLogger.*")
        trainer(tmp_path, max_steps=2, callbacks=[EnergyMonitor(every_n_steps=1)]).fit(PlainNet(), make_loader())
    for bad in (0, -3, 1.5):
        with pytest.raises(ValueError, match="histogram_every_n_steps"):
            EnergyMonitor(log_histograms=True, histogram_every_n_steps=bad)


def test_energy_sources_rows_columns_and_monitor():
    rows = [{"step": 0, "monitor/energy/a": 1.0, "train/loss": 2.0},
            {"step": 2, "monitor/energy/a": 0.5, "mhe/energy/b": 3.0},
            {"step": 1, "monitor/energy/a": "", "mhe/energy/b": 4.0}]
    series = viz.load_energy_metrics(rows)
    assert list(series) == ["mhe/energy/b", "monitor/energy/a"]
    np.testing.assert_array_equal(series["monitor/energy/a"][0], [0, 2])
    np.testing.assert_array_equal(series["mhe/energy/b"][0], [1, 2])  # sorted by step
    np.testing.assert_array_equal(series["mhe/energy/b"][1], [4.0, 3.0])
    columns = {"step": [0, 1, 2], "monitor/energy/a": [1.0, None, 0.5], "loss": [1, 2, 3]}
    cols = viz.load_energy_metrics(columns)
    np.testing.assert_array_equal(cols["monitor/energy/a"][1], [1.0, 0.5])
    pairs = viz.load_energy_metrics({"comhe/energy/conv": [(0, 2.0), (5, 1.0)], "x": [(0, 1.0)]})
    assert list(pairs) == ["comhe/energy/conv"]
    mon = EnergyMonitor(prefix="watch")
    mon.history = [{"step": 3, "layer": "fc", "energy": 0.7}, {"step": 1, "layer": "fc", "energy": 0.9}]
    hist = viz.load_energy_metrics(mon)
    np.testing.assert_array_equal(hist["watch/energy/fc"][1], [0.9, 0.7])
    fig = Figure()
    ax = fig.add_subplot()
    assert viz.plot_energy(mon, ax=ax) is fig and len(ax.get_lines()) == 1
    natural = viz.load_energy_metrics([{"step": 0, "m/energy/features.10": 1, "m/energy/features.3": 1}])
    assert list(natural) == ["m/energy/features.3", "m/energy/features.10"]


def test_energy_bad_sources(tmp_path):
    no_energy = tmp_path / "plain" / "metrics.csv"
    no_energy.parent.mkdir()
    no_energy.write_text("step,epoch,train/loss\n0,0,1.5\n1,0,1.2\n")
    with pytest.raises(ValueError, match=r"no '<prefix>/energy/<layer>' metric.*train/loss.*EnergyMonitor"):
        viz.plot_energy(no_energy.parent)
    with pytest.raises(ValueError, match="no 'mhe/energy/<layer>' metric"):
        viz.load_energy_metrics([{"step": 0, "monitor/energy/a": 1.0}], prefix="mhe")
    with pytest.raises(ValueError, match="does not exist"):
        viz.load_energy_metrics(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no metrics.csv or TensorBoard"):
        viz.load_energy_metrics(tmp_path / "empty")
    for run in ("a", "b"):
        (tmp_path / "two" / run).mkdir(parents=True)
        (tmp_path / "two" / run / "metrics.csv").write_text("step,x/energy/l\n0,1\n")
    with pytest.raises(ValueError, match="holds 2 runs"):
        viz.load_energy_metrics(tmp_path / "two")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither a CSV file"):
        viz.load_energy_metrics(tmp_path / "notes.txt")
    with pytest.raises(TypeError, match="source: expected"):
        viz.load_energy_metrics(42)
    with pytest.raises(ValueError, match="columns"):
        viz.load_energy_metrics({"step": [0, 1], "m/energy/a": [1.0]})
    with pytest.raises(ValueError, match="layers: none of"):
        viz.plot_energy([{"step": 0, "m/energy/a": 1.0}], layers=["b"])


# ------------------------------------------------------------------------------ angle histograms
def test_uniform_angle_density():
    t = np.linspace(0, math.pi, 2001)
    np.testing.assert_allclose(viz.uniform_angle_density(t, 2), np.full_like(t, 1 / math.pi))
    np.testing.assert_allclose(viz.uniform_angle_density(t, 3), np.sin(t) / 2, atol=1e-12)
    for d in (2, 3, 5, 20, 200):
        assert np.trapezoid(viz.uniform_angle_density(t, d), t) == pytest.approx(1.0, abs=1e-6)
    deg = np.linspace(0, 180, 2001)
    assert np.trapezoid(viz.uniform_angle_density(deg, 7, degrees=True), deg) == pytest.approx(1.0, abs=1e-6)
    assert viz.uniform_angle_density(np.array([-0.1, 4.0]), 4).tolist() == [0.0, 0.0]
    # Monte Carlo: angles between independent Gaussian directions in R^5
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 200_000, 5))
    theta = np.arccos(np.clip((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1), -1, 1))
    hist, edges = np.histogram(theta, bins=20, range=(0, math.pi), density=True)
    centers = (edges[1:] + edges[:-1]) / 2
    np.testing.assert_allclose(hist, viz.uniform_angle_density(centers, 5), atol=0.02)
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="dim="):
            viz.uniform_angle_density(t, bad)


def test_angle_histograms_of_a_model(tmp_path):
    model = PlainNet()
    fig = viz.plot_angle_histograms(model, bins=18, path=tmp_path / "angles.png")
    axes = [a for a in fig.axes if a.get_visible()]
    assert len(axes) == 3
    for a, name in zip(axes, LAYERS):
        weight = getattr(model, name).weight
        assert a.get_title().startswith(name)
        heights = np.array([p.get_height() for p in a.patches])
        ref, _ = np.histogram(angles_np(weight), bins=18, range=(0, 180), density=True)
        np.testing.assert_allclose(heights, ref, rtol=1e-9, atol=1e-12)
        (line,) = a.get_lines()
        x, y = line.get_xdata(), line.get_ydata()
        d = weight.shape[1]
        dens = np.sin(np.deg2rad(x)) ** (d - 2)
        dens /= np.trapezoid(dens, x)  # independent normalization, per degree
        np.testing.assert_allclose(y, dens, atol=1e-6)
    assert_image(tmp_path / "angles.png")

    fig = viz.plot_angle_histograms(model, exclude="out", degrees=False, reference=False)
    shown = [a for a in fig.axes if a.get_visible()]
    assert [a.get_title().split()[0] for a in shown] == ["fc1", "fc2"]
    assert not shown[0].get_lines() and shown[0].get_xlim() == (0.0, math.pi)
    fig = Figure()
    ax = fig.add_subplot()
    assert viz.plot_angle_histograms({"w": model.fc1.weight}, ax=ax) is fig
    assert viz.plot_angle_histograms(torch.randn(6, 4)).axes[0].get_title().startswith("neurons")


def test_angle_histograms_bad_input():
    model = PlainNet()
    with pytest.raises(ValueError, match="ax: got 1 axes for 3 layers"):
        viz.plot_angle_histograms(model, ax=Figure().add_subplot())
    with pytest.raises(ValueError, match="include: pattern 'nope'"):
        viz.plot_angle_histograms(model, include="nope")
    with pytest.raises(ValueError, match="select layers of an nn.Module"):
        viz.plot_angle_histograms(torch.randn(5, 3), include="fc1")
    with pytest.raises(TypeError, match="model: expected"):
        viz.plot_angle_histograms("fc1")
    with pytest.raises(ValueError, match="bins="):
        viz.plot_angle_histograms(model, bins=0)
    with pytest.raises(ValueError, match=">= 2 neurons"):
        viz.plot_angle_histograms({"one": torch.randn(1, 3)})


# ------------------------------------------------------------------------------- points on S^1/S^2
def test_points_on_circle(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 2, generator=g) * 3
    y = torch.arange(120) % 4
    fig = viz.plot_on_sphere(x, y, weights=torch.randn(4, 2, generator=g), path=tmp_path / "s1.png")
    ax = fig.axes[0]
    unit = x.double().numpy() / np.linalg.norm(x.double().numpy(), axis=1, keepdims=True)
    scatters = ax.collections
    assert len(scatters) == 4
    for c, coll in enumerate(scatters):
        np.testing.assert_allclose(coll.get_offsets(), unit[y.numpy() == c], atol=1e-12)
    colors = {tuple(coll.get_facecolor()[0]) for coll in scatters}
    assert len(colors) == 4
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["0", "1", "2", "3"]
    assert len(ax.get_lines()) == 1 + 4  # the unit circle + one line per class weight
    assert_image(tmp_path / "s1.png")
    raw = viz.plot_on_sphere(x.numpy(), normalize=False)
    np.testing.assert_allclose(raw.axes[0].collections[0].get_offsets(), x.numpy(), rtol=1e-6)


def test_points_on_sphere(tmp_path):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(90, 3, generator=g)
    y = torch.arange(90) % 3
    fig = viz.plot_on_sphere(x, y, path=tmp_path / "s2.png")
    ax = fig.axes[0]
    assert ax.name == "3d"
    unit = x.double().numpy() / np.linalg.norm(x.double().numpy(), axis=1, keepdims=True)
    scatters = [c for c in ax.collections if hasattr(c, "_offsets3d")]
    assert len(scatters) == 3
    for c, coll in enumerate(scatters):
        np.testing.assert_allclose(np.stack(coll._offsets3d, axis=1), unit[y.numpy() == c], atol=1e-12)
    assert_image(tmp_path / "s2.png")
    layer = torch.nn.Linear(3, 7)  # a layer's neurons (rows of the weight) on S^2
    pts = viz.plot_on_sphere(layer).axes[0].collections[-1]._offsets3d
    w = layer.weight.detach().double().numpy()
    np.testing.assert_allclose(np.stack(pts, axis=1), w / np.linalg.norm(w, axis=1, keepdims=True), atol=1e-7)


def test_points_bad_input():
    with pytest.raises(ValueError, match=r"points: expected shape \(N, 2\)"):
        viz.plot_on_sphere(torch.randn(5, 4))
    with pytest.raises(ValueError, match="labels: expected 5 labels"):
        viz.plot_on_sphere(torch.randn(5, 2), labels=[0, 1])
    with pytest.raises(ValueError, match="zero norm"):
        viz.plot_on_sphere(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"weights: expected shape \(K, 3\)"):
        viz.plot_on_sphere(torch.randn(5, 3), weights=torch.randn(2, 2))
    with pytest.raises(TypeError, match="3-D axes"):
        viz.plot_on_sphere(torch.randn(5, 3), ax=Figure().add_subplot())
    with pytest.raises(TypeError, match="points"):
        viz.plot_on_sphere(object())
