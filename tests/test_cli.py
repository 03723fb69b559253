"""The ``lightning-hyper`` command line (LightningCLI) and the shipped configs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from glob import glob
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lightning_hyper.cli import catalog, format_metrics, main, run_cli

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(glob(str(REPO / "configs" / "*.yaml")))
MAIN_JOB = str(REPO / "configs" / "digits_mhe.yaml")
TINY_CNN = '{"in_channels": 1, "input_size": 8, "widths": [4, 8, 8], "fc_features": 16}'


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """LightningCLI warns when both ``args`` and pytest's own ``sys.argv`` are present."""
    monkeypatch.setattr(sys, "argv", ["lightning-hyper"])


def test_console_script_points_to_main():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("lightning-hyper") == "lightning_hyper.cli:main"


def test_main_job_fast_dev_run_in_process(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", MAIN_JOB, "--trainer.fast_dev_run=true"]) is None
    out = capsys.readouterr().out
    assert "fit: final metrics:" in out
    assert "val/acc" in out
    assert "mhe/penalty" in out and "mhe/energy/head" in out  # MHERegularizer ran and logged
    assert "monitor/energy/head" in out  # EnergyMonitor ran


def test_main_job_config_is_the_documented_experiment():
    cfg = yaml.safe_load(open(MAIN_JOB))
    assert cfg["data"]["class_path"].endswith("DigitsDataModule")
    assert cfg["model"]["class_path"].endswith("HypersphericalClassifier")
    callbacks = {c["class_path"].rsplit(".", 1)[-1]: c.get("init_args", {}) for c in cfg["trainer"]["callbacks"]}
    assert callbacks["MHERegularizer"] == {
        "s": 2.0, "metric": "euclidean", "half_space": False, "hidden_weight": None, "output_weight": 1.0
    }
    assert callbacks["EnergyMonitor"] == {"every_n_steps": 10}
    baseline = yaml.safe_load(open(REPO / "configs" / "digits_baseline.yaml"))
    assert all("MHERegularizer" not in c["class_path"] for c in baseline["trainer"]["callbacks"])
    assert baseline["model"] == cfg["model"] and baseline["data"] == cfg["data"]
    assert baseline["trainer"]["max_epochs"] == cfg["trainer"]["max_epochs"]


def test_python_dash_m_subprocess(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_hyper", "fit", "--config", MAIN_JOB, "--trainer.fast_dev_run=true"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val/acc" in proc.stdout and "mhe/energy/head" in proc.stdout


def test_short_class_names_resolve(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli = run_cli([
        "fit",
        "--model", "HypersphericalClassifier",
        "--model.backbone", "cnn6",
        "--model.backbone_kwargs", TINY_CNN,
        "--data", "DigitsDataModule",
        "--data.batch_size", "16",
        "--trainer.callbacks+=MHERegularizer",
        "--trainer.callbacks.hidden_weight=1.0",
        "--trainer.callbacks+=EnergyMonitor",
        "--trainer.fast_dev_run=true",
        "--trainer.enable_progress_bar=false",
    ])
    from lightning_hyper.callbacks import EnergyMonitor, MHERegularizer
    from lightning_hyper.data import DigitsDataModule
    from lightning_hyper.models import HypersphericalClassifier

    assert isinstance(cli.model, HypersphericalClassifier) and isinstance(cli.datamodule, DigitsDataModule)
    mhe = [c for c in cli.trainer.callbacks if isinstance(c, MHERegularizer)]
    assert len(mhe) == 1 and mhe[0].hidden_weight == 1.0
    assert any(isinstance(c, EnergyMonitor) for c in cli.trainer.callbacks)
    assert cli.model.backbone.out_features == 16
    assert "mhe/energy/head" in cli.trainer.callback_metrics
    assert "val/acc" in capsys.readouterr().out


@pytest.mark.parametrize("config", CONFIGS, ids=[Path(c).name for c in CONFIGS])
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", config, "--print_config"])
    assert exc.value.code in (None, 0)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "class_path" in printed["model"] and "class_path" in printed["data"]


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "fit" in out and "validate" in out and "test" in out
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--help"])
    assert exc.value.code == 0
    assert "--config" in capsys.readouterr().out


def test_unknown_option_fails(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", MAIN_JOB, "--model.init_args.no_such_option", "1", "--print_config"])
    assert exc.value.code != 0


def test_format_metrics_orders_headline_then_energies():
    text = format_metrics(
        {
            "train/loss_step": torch.tensor(1.0),
            "mhe/energy/b": torch.tensor(0.25),
            "val/acc": torch.tensor(0.975),
            "mhe/energy/a": 0.5,
            "mhe/penalty": torch.tensor(3.0, dtype=torch.float64),
        },
        title="T",
    )
    lines = text.splitlines()
    assert lines[0] == "T:"
    assert [line.split()[0] for line in lines[1:]] == ["val/acc", "mhe/energy/a", "mhe/energy/b", "mhe/penalty"]
    assert lines[1].split()[1] == "0.9750"
    assert format_metrics({}, title="T") == "T: (none logged)"


# ---------------------------------------------------------------- every config runs offline
def _fast_overrides(config: str) -> list[str]:
    """Keep each config fast: no worker processes, tiny batches and a tiny synthetic CIFAR stand-in."""
    init = yaml.safe_load(open(config))["data"].get("init_args", {}) or {}
    extra = []
    if "num_workers" in init:
        extra.append("--data.init_args.num_workers=0")
    if init.get("pin_memory"):
        extra.append("--data.init_args.pin_memory=false")
    if "if_missing" in init:
        extra += ["--data.init_args.synthetic_size=8", "--data.init_args.batch_size=4"]
    return extra


@pytest.mark.parametrize("config", CONFIGS, ids=[Path(c).name for c in CONFIGS])
def test_every_config_fast_dev_run(config, tmp_path, monkeypatch, capsys):
    """``lightning-hyper fit --config FILE`` trains one batch of every shipped config, offline."""
    monkeypatch.chdir(tmp_path)  # relative roots ("data", "lightning_logs") point into the temp dir
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cli = run_cli(["fit", "--config", config, "--trainer.fast_dev_run=1", "--trainer.enable_progress_bar=false",
                           "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path}",
                           *_fast_overrides(config)])
    finally:
        torch.set_num_threads(threads)
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert "fit: final metrics:" in capsys.readouterr().out
    init = yaml.safe_load(open(config))["data"].get("init_args", {}) or {}
    if "CIFAR" in cli.datamodule.__class__.__name__:
        # the CIFAR configs default to the synthetic stand-in when the data is absent, and say so loudly
        assert init.get("if_missing") == "synthetic" and cli.datamodule.using_synthetic
        assert any("NOT CIFAR RESULTS" in str(w.message) for w in caught)


# ---------------------------------------------------------------- --help lists the library
def test_catalog_lists_the_library_classes_only():
    from lightning.pytorch import Callback, LightningDataModule, LightningModule

    import lightning_hyper.callbacks as cbs
    import lightning_hyper.data as data
    import lightning_hyper.models as models

    cat = catalog()
    assert {"HypersphericalClassifier", "SphereFaceModule", "GraphClassifier", "PointCloudClassifier"} <= set(
        cat["Models"])
    assert {"MHERegularizer", "CoMHERegularizer", "EnergyMonitor", "HierarchicalRegularizer"} <= set(cat["Callbacks"])
    assert {"DigitsDataModule", "CIFAR10DataModule", "MNIST1DDataModule", "KarateClubDataModule"} <= set(cat["Data"])
    for title, package, base in (("Models", models, LightningModule), ("Callbacks", cbs, Callback),
                                 ("Data", data, LightningDataModule)):
        expected = {n for n in package.__all__ if isinstance(getattr(package, n), type)
                    and issubclass(getattr(package, n), base)}
        assert set(cat[title]) == expected, title
    assert not {"CNN1d", "BACKBONES", "build_backbone", "PlainCNN"} & set(cat["Models"])  # nn.Modules / helpers


@pytest.mark.parametrize("argv", [["--help"], ["fit", "--help"]])
def test_help_lists_models_callbacks_and_data_by_short_name(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for title, names in catalog().items():
        assert f"{title}: " in out
        for name in names:
            assert name in out, name
    assert "lightning-hyper energy CHECKPOINT" in out and "--rich" in out


# ---------------------------------------------------------------- progress bars
TINY_ARGS = ["--model", "HypersphericalClassifier", "--model.backbone", "cnn6", "--model.backbone_kwargs", TINY_CNN,
            "--data", "DigitsDataModule", "--data.batch_size", "16", "--trainer.enable_model_summary=false"]
TINY_RUN = ["fit", *TINY_ARGS]


def test_default_bar_is_tqdm_and_rich_options_switch_it(tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    monkeypatch.chdir(tmp_path)
    # run=False builds the trainer without a subcommand
    cli = run_cli([*TINY_ARGS, "--trainer.fast_dev_run=true"], run=False)
    assert type(cli.trainer.progress_bar_callback) is TQDMProgressBar  # Lightning's bar stays on by default
    cli = run_cli([*TINY_ARGS, "--trainer.fast_dev_run=true", "--trainer.callbacks+=RichProgressBar"], run=False)
    assert isinstance(cli.trainer.progress_bar_callback, RichProgressBar)
    cli = run_cli([*TINY_ARGS, "--trainer.fast_dev_run=true", "--no_rich"], run=False)
    assert type(cli.trainer.progress_bar_callback) is TQDMProgressBar
    # --rich also turns the bar back on when a config switched it off, and keeps the config's callbacks
    cli = run_cli(["fit", "--config", MAIN_JOB, "--trainer.fast_dev_run=true", "--rich"])
    assert isinstance(cli.trainer.progress_bar_callback, RichProgressBar)
    bars = [c for c in cli.trainer.callbacks if isinstance(c, (RichProgressBar, TQDMProgressBar))]
    assert len(bars) == 1
    assert {"MHERegularizer", "EnergyMonitor"} <= {type(c).__name__ for c in cli.trainer.callbacks}
    assert cli.trainer.state.finished


# ---------------------------------------------------------------- lightning-hyper energy
def _np_energy(w: np.ndarray, s: float, half_space: bool = False, angular: bool = False, eps: float = 1e-6) -> float:
    """Float64 loop reference: mean over ordered pairs i != j of dist^-s (s = 0: log 1/dist)."""
    w = w.reshape(w.shape[0], -1).astype(np.float64)
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    n = len(w)
    if half_space:
        w = np.concatenate([w, -w])
    total, count = 0.0, 0
    for i in range(len(w)):
        for j in range(len(w)):
            if i == j:
                continue
            if abs(i - j) == n:  # half-space: a neuron and its own negation are a pair too, exactly pi apart
                d = np.pi if angular else np.sqrt(4 + eps)
            elif angular:
                d = np.arccos(np.clip(w[i] @ w[j], -1 + eps, 1 - eps))
            else:
                d = np.sqrt(((w[i] - w[j]) ** 2).sum() + eps)
            total += np.log(1 / d) if s == 0 else d ** (-s)
            count += 1
    return total / count


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A checkpoint written by a plain Trainer run (2 steps) of a tiny HypersphericalClassifier."""
    import lightning as L

    from lightning_hyper.data import DigitsDataModule
    from lightning_hyper.models import HypersphericalClassifier

    torch.manual_seed(0)
    model = HypersphericalClassifier(backbone="cnn6", num_classes=10, backbone_kwargs=json.loads(TINY_CNN))
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        accelerator="cpu")
    trainer.fit(model, DigitsDataModule(batch_size=16))
    path = tmp_path / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path, model


def test_energy_of_a_lightning_checkpoint(tiny_checkpoint, capsys):
    from lightning_hyper.callbacks.base import LayerSelection
    from lightning_hyper.functional import as_neurons, hyperspherical_energy

    path, model = tiny_checkpoint
    layers = LayerSelection().resolve(model)
    assert main(["energy", str(path), "--format", "json"]) is None
    result = json.loads(capsys.readouterr().out)
    assert result["source"].endswith("HypersphericalClassifier")  # rebuilt from hyper_parameters (no _class_path)
    assert [r["layer"] for r in result["layers"]] == [ref.name for ref in layers]
    assert [r["role"] for r in result["layers"]][-1] == "output" and result["layers"][-1]["layer"] == "head"
    for row, ref in zip(result["layers"], layers):
        w = as_neurons(ref.module).detach().double()
        assert (row["neurons"], row["dim"]) == tuple(w.shape)
        assert row["energy"] == pytest.approx(float(hyperspherical_energy(w)), rel=1e-12)
        assert row["energy"] == pytest.approx(_np_energy(ref.module.weight.detach().numpy(), 2.0), rel=1e-6)

    # the options reach the energy: s = 0 (log), angular distance, half-space
    assert main(["energy", str(path), "--s", "0", "--metric", "angular", "--half-space", "--format", "csv"]) is None
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "layer,role,neurons,dim,energy" and len(lines) == len(layers) + 1
    for line, ref in zip(lines[1:], layers):
        name, role, _, _, value = line.split(",")
        assert (name, role) == (ref.name, ref.role)
        w = ref.module.weight.detach()
        expected = float(hyperspherical_energy(as_neurons(w).double(), s=0, metric="angular", half_space=True))
        assert float(value) == pytest.approx(expected, rel=1e-12)
        assert float(value) == pytest.approx(_np_energy(w.numpy(), 0.0, half_space=True, angular=True), rel=1e-6)

    # the default table: one row per layer, numbers to 8 significant digits
    assert main(["energy", str(path)]) is None
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("hyperspherical energy of") and out[1].split() == ["layer", "role", "neurons", "dim",
                                                                                "energy"]
    for line, row in zip(out[2:], result["layers"]):
        cells = line.split()
        assert cells[0] == row["layer"] and float(cells[-1]) == pytest.approx(row["energy"], rel=1e-7)


def test_energy_of_a_plain_state_dict(tiny_checkpoint, tmp_path, capsys):
    path, model = tiny_checkpoint
    sd_path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), sd_path)
    main(["energy", str(sd_path), "--format", "json"])
    result = json.loads(capsys.readouterr().out)
    assert result["source"] == "state_dict"
    expected = {k[: -len(".weight")]: v for k, v in model.state_dict().items()
                if k.endswith("weight") and v.dim() >= 2}  # BN weights (1-D) are not neurons
    assert [r["layer"] for r in result["layers"]] == list(expected)
    for row in result["layers"]:
        w = expected[row["layer"]].numpy()
        assert (row["neurons"], row["dim"]) == (w.shape[0], int(np.prod(w.shape[1:])))  # conv: (out, in * k * k)
        assert row["energy"] == pytest.approx(_np_energy(w, 2.0), rel=1e-6)


def test_energy_reads_effective_weights_of_opt_layers(tmp_path, capsys):
    """An OPT model is rebuilt, so its layers' energy is that of W = R V (and equals V's: OPT's invariance)."""
    from lightning_hyper.functional import as_neurons, hyperspherical_energy
    from lightning_hyper.models import GraphClassifier
    from lightning_hyper.nn.opt import get_opt, opt_layers

    torch.manual_seed(0)
    model = GraphClassifier(num_features=12, num_classes=3, hidden_channels=8, opt_method="cayley",
                            opt_kwargs={"seed": 0})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # move R away from the identity
    path = tmp_path / "opt.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    main(["energy", str(path), "--format", "json"])
    result = json.loads(capsys.readouterr().out)
    assert result["source"].endswith("GraphClassifier")
    rows = {r["layer"]: r["energy"] for r in result["layers"]}
    for name, layer in opt_layers(model).items():
        assert rows[name] == pytest.approx(float(hyperspherical_energy(as_neurons(layer).detach().double())), rel=1e-12)
        assert rows[name] == pytest.approx(float(hyperspherical_energy(get_opt(layer).V.T.double())), rel=1e-6)


def test_energy_of_a_cli_checkpoint_uses_its_class_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_cli([*TINY_RUN, "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.logger=false",
             "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"])
    (ckpt,) = list(tmp_path.glob("checkpoints/*.ckpt"))
    assert "_class_path" in torch.load(ckpt, weights_only=False)["hyper_parameters"]
    capsys.readouterr()
    main(["energy", str(ckpt), "--format", "json"])
    result = json.loads(capsys.readouterr().out)
    assert result["source"] == "module:lightning_hyper.models.classifier.HypersphericalClassifier"
    assert result["layers"][-1]["layer"] == "head"


def test_energy_bad_input_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["energy", str(tmp_path / "missing.ckpt")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "missing.ckpt" in err and "does not exist" in err
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    with pytest.raises(SystemExit) as exc:
        main(["energy", str(junk)])
    assert exc.value.code == 2 and "cannot compute energies of" in capsys.readouterr().err
    weights = tmp_path / "w.pt"
    torch.save({"a.weight": torch.randn(4, 3)}, weights)
    for bad, message in ((["--format", "xml"], "--format"), (["--metric", "cosine"], "--metric"),
                         (["--s", "-1"], "s=-1.0 is not supported")):
        with pytest.raises(SystemExit) as exc:
            main(["energy", str(weights), *bad])
        assert exc.value.code == 2, bad
        assert message in capsys.readouterr().err, bad


def test_energy_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["energy", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--s", "--metric", "--half-space", "--format", "checkpoint"):
        assert option in out
