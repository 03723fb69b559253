"""The ``lightning-hyper`` command line (LightningCLI) and the shipped configs."""
from __future__ import annotations

import os
import subprocess
import sys
from glob import glob
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import yaml

from lightning_hyper.cli import format_metrics, main, run_cli

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
