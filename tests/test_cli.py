"""The ``lightning-hyper`` command line (LightningCLI) and the shipped configs."""
from __future__ import annotations

import json
import os
import shutil
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

from lightning_hyper.cli import VERBOSE_ENV, catalog, format_metrics, main, run_cli

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
    assert "mhe/penalty" in out  # MHERegularizer ran and logged
    assert "/energy/" not in out  # per-layer energies are in the energy table, once
    assert out.count("head (output)") == 1 and "fit: energy per layer (MHERegularizer: s=2" in out


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
    assert "val/acc" in proc.stdout and "head (output)" in proc.stdout


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


# ---------------------------------------------------------------- short configuration errors
def _cli_command() -> list[str]:
    """The real console script when it is installed (as the acceptance runs use), else ``python -m``."""
    script = shutil.which("lightning-hyper")
    return [script] if script else [sys.executable, "-m", "lightning_hyper"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != VERBOSE_ENV}
    return dict(env, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)


def _edited_config(tmp_path: Path, old: str, new: str, name: str = "bad.yaml") -> str:
    """A copy of the main job's config with one line edited."""
    text = Path(MAIN_JOB).read_text()
    assert text.count(old) == 1, old
    path = tmp_path / name
    path.write_text(text.replace(old, new))
    return str(path)


BAD_CONFIGS = {  # id: (edit of digits_mhe.yaml or None for a missing file, texts the message must hold)
    "missing_file": (None, ["config file", "nope.yaml", "not found", "--config"]),
    "callback_key_typo": (("hidden_weight: null", "hiden_weight: null"),
                          ["unknown key 'hiden_weight'", "trainer.callbacks[0].init_args.hiden_weight",
                           "did you mean 'hidden_weight'?", "MHERegularizer"]),
    "model_key_typo": (("    backbone: cnn9", "    backbon: cnn9"),
                       ["unknown key 'backbon'", "model.init_args.backbon", "did you mean 'backbone'?"]),
    "top_level_typo": (("\nmodel:", "\nmodle:"), ["unknown key 'modle'", "key:      modle", "did you mean 'model'?"]),
    "trainer_key_typo": (("  max_epochs: 15", "  max_epoch: 15"),
                         ["unknown key 'max_epoch'", "trainer.max_epoch", "did you mean 'max_epochs'?"]),
    "wrong_type": (("        s: 2.0", "        s: abc"),
                   ["trainer.callbacks[0].init_args.s", "abc", "expected float"]),
    "invalid_value": (("        s: 2.0", "        s: -1"),
                      ["trainer.callbacks[0].init_args.s", "s=-1.0 is not supported; accepted values: a finite number "
                                                           "s >= 0"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_config_errors_are_short(case, tmp_path, monkeypatch, capsys):
    """At most 15 lines (everything printed, Lightning's own log lines included): the file, the key path,
    the problem, a suggestion for a typo, exit status 2; no traceback, no namespace dump, no usage text."""
    monkeypatch.chdir(tmp_path)
    edit, expected = BAD_CONFIGS[case]
    config = str(tmp_path / "nope.yaml") if edit is None else _edited_config(tmp_path, *edit)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", config, "--trainer.max_steps=1"])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert len(text.splitlines()) <= 15, text
    assert "lightning-hyper fit: error:" in captured.err
    assert Path(config).name in captured.err  # the file
    for piece in expected:
        assert piece in captured.err, (piece, captured.err)
    for noise in ("Traceback", "Namespace(", "usage:", "Does not validate against any of the Union"):
        assert noise not in text, (noise, text)
    assert "--verbose" in captured.err and VERBOSE_ENV in captured.err  # how to get the details


def test_invalid_value_message_printed_once(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = _edited_config(tmp_path, "        s: 2.0", "        s: -1")
    with pytest.raises(SystemExit):
        main(["fit", "--config", config])
    assert capsys.readouterr().err.count("s=-1.0 is not supported") == 1


def test_command_line_overrides_are_named_as_such(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", MAIN_JOB, "--model.init_args.lr=abc"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "(command line)" in err and "model.init_args.lr" in err and "abc" in err
    with pytest.raises(SystemExit):
        main(["fit", "--config", MAIN_JOB, "--trainer.callbacks.s=-1"])  # jsonargparse: the last callback
    err = capsys.readouterr().err
    assert "trainer.callbacks[1].init_args.s" in err and "EnergyMonitor" in err and "(command line)" in err


@pytest.mark.parametrize("case", ["callback_key_typo", "invalid_value"])
def test_config_errors_of_the_real_command(case, tmp_path):
    """The installed ``lightning-hyper fit --config X`` (subprocess): the same short message."""
    config = _edited_config(tmp_path, *BAD_CONFIGS[case][0])
    proc = subprocess.run([*_cli_command(), "fit", "--config", config], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert len(text.splitlines()) <= 15, text
    assert config in proc.stderr or Path(config).name in proc.stderr
    for piece in BAD_CONFIGS[case][1]:
        assert piece in proc.stderr, (piece, proc.stderr)
    assert "Traceback" not in text and "Namespace(" not in text and "usage:" not in text


def test_verbose_flag_and_env_show_everything(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    typo = _edited_config(tmp_path, "hidden_weight: null", "hiden_weight: null", "typo.yaml")
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", typo, "--verbose"])  # jsonargparse's own output: usage and the full error
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "usage: lightning-hyper" in err and "Given value:" in err
    assert len(err.splitlines()) > 15
    invalid = _edited_config(tmp_path, "        s: 2.0", "        s: -1", "invalid.yaml")
    monkeypatch.setenv(VERBOSE_ENV, "1")
    with pytest.raises(ValueError, match="Does not validate") as err_info:  # the full exception chain
        main(["fit", "--config", invalid])
    assert "s=-1.0 is not supported" in str(err_info.value.__cause__)


def test_verbose_option_of_validate_and_test_passes_through():
    from lightning_hyper.cli import _take_verbose

    assert _take_verbose(["test", "--config", "x.yaml", "--verbose", "false"]) == (
        ["test", "--config", "x.yaml", "--verbose", "false"], False)
    assert _take_verbose(["fit", "--verbose", "--config", "x.yaml"]) == (["fit", "--config", "x.yaml"], True)
    assert _take_verbose(["--verbose"]) == ([], True)


def test_help_documents_verbose(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert "--verbose" in out and VERBOSE_ENV in out


# ---------------------------------------------------------------- quiet runs, end-of-fit summary
def test_quiet_third_party_filters_only_inside_the_block(caplog):
    import logging
    import warnings

    from lightning.pytorch.utilities import rank_zero_info

    from lightning_hyper.cli import quiet_third_party

    # another test may have raised Lightning's logger level or stopped its propagation: record at the source
    source = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = source.level
    source.setLevel(logging.INFO)
    source.addHandler(caplog.handler)  # "lightning.pytorch" may not propagate to the root logger

    def our_filters():
        return [f for f in warnings.filters if "lightning_hyper" in str(getattr(f[3], "pattern", f[3]))]

    assert not our_filters()  # importing the library changed no warning filter
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_third_party():
            with caplog.at_level("INFO", logger="lightning.pytorch.utilities.rank_zero"):
                rank_zero_info("💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels]")
                rank_zero_info("an ordinary Lightning message")
            # the module a warning is attributed to decides: torch's deprecations go, ours stay
            warnings.warn_explicit("old torch api", FutureWarning, "torch/jit/_script.py", 1, module="torch.jit")
            warnings.warn_explicit("our deprecation", FutureWarning, "x.py", 1, module="lightning_hyper.x")
            warnings.warn_explicit("a user warning", UserWarning, "y.py", 1, module="torch.y")
        warnings.warn_explicit("old torch api again", FutureWarning, "torch/jit/_script.py", 1, module="torch.jit")
    messages = [str(w.message) for w in caught]
    assert messages == ["our deprecation", "a user warning", "old torch api again"]
    source.setLevel(level)
    source.removeHandler(caplog.handler)
    assert "an ordinary Lightning message" in caplog.text and "litmodels" not in caplog.text
    assert not our_filters()


def _table(out: str) -> list[list[str]]:
    """Rows (cells) of the end-of-fit energy table."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("fit: energy per layer"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("  ") or line.startswith("  minimum:"):
            break
        rows.append(line.split())
    assert lines[start + 1].split() == ["layer", "N", "d", "init", "final", "minimum"]
    return rows


TINY_CNN9 = ["--model.init_args.backbone_kwargs", TINY_CNN]  # the main job's CNN-9 with tiny widths


def test_fit_of_the_real_command_is_quiet_and_ends_with_a_summary(tmp_path):
    """``lightning-hyper fit`` (subprocess, a few steps of the main job with tiny widths): no Lightning
    tips, no deprecation warnings; at the end the log folder, the checkpoint and each layer's energy once,
    in the model's layer order, with its value at initialization and the closed-form minimum."""
    from lightning_hyper.callbacks.base import LayerSelection
    from lightning_hyper.functional import minimum_energy
    from lightning_hyper.models import HypersphericalClassifier

    proc = subprocess.run(
        [*_cli_command(), "fit", "--config", MAIN_JOB, *TINY_CNN9, "--trainer.max_epochs=1",
         "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    for noise in ("💡", "litlogger", "litmodels", "DeprecationWarning", "FutureWarning", "deprecated"):
        assert noise not in text, (noise, text)
    out = proc.stdout
    model = HypersphericalClassifier(backbone="cnn9", num_classes=10, backbone_kwargs=json.loads(TINY_CNN))
    layers = LayerSelection().resolve(model)
    names = [ref.name for ref in layers]
    assert names.index("backbone.features.3") < names.index("backbone.features.10")
    rows = _table(out)
    assert [r[0] for r in rows] == names  # once each, in named_modules order (features.3 before features.10)
    assert rows[-1][1] == "(output)"
    for ref, row in zip(layers, rows):
        cells = row[2:] if ref.role == "output" else row[1:]
        n, d, init, final, minimum = int(cells[0]), int(cells[1]), float(cells[2]), float(cells[3]), cells[4]
        assert (n, d) == tuple(ref.neurons().shape)
        expected_min = minimum_energy(n, d)  # the run's MHERegularizer: s=2, euclidean, full space
        if expected_min is None:
            assert minimum == "-"
        else:
            assert float(minimum) == pytest.approx(expected_min, rel=1e-5)
            assert init >= expected_min - 1e-6 and final >= expected_min - 1e-6
    assert any(float(r[-3]) != float(r[-2]) for r in rows)  # training moved the weights
    assert "/energy/" not in out  # no duplicate per-layer metric lines
    assert out.count("fit: logs: ") == 1 and out.count("fit: checkpoint: ") == 1
    log_dir = out.split("fit: logs: ")[1].splitlines()[0].strip()
    ckpt = out.split("fit: checkpoint: ")[1].splitlines()[0].split(" (")[0]
    assert (tmp_path / log_dir / "metrics.csv").is_file() and (tmp_path / ckpt).is_file()
    assert Path(ckpt).parent.parent == Path(log_dir)
    # `energy` reads that checkpoint safely (no flag), quietly, and agrees with the summary's final column
    proc = subprocess.run([*_cli_command(), "energy", ckpt, "--format", "json"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    energies = [row["energy"] for row in json.loads(proc.stdout)["layers"]]
    assert energies == pytest.approx([float(r[-2]) for r in rows], rel=1e-5)


def test_init_energy_is_the_energy_before_training(tmp_path, monkeypatch, capsys):
    """With no step taken, init = final = the energy of the model's weights (same settings)."""
    from lightning_hyper.callbacks.base import LayerSelection
    from lightning_hyper.functional import hyperspherical_energy

    monkeypatch.chdir(tmp_path)
    half = _edited_config(tmp_path, "        half_space: false", "        half_space: true")  # HS on hidden layers
    cli = run_cli(["fit", "--config", half, *TINY_CNN9, "--trainer.max_steps=0", "--trainer.logger=false",
                   "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])
    rows = _table(capsys.readouterr().out)
    layers = LayerSelection().resolve(cli.model)
    assert len(rows) == len(layers)
    for ref, row in zip(layers, rows):
        init, final = float(row[-3]), float(row[-2])
        w = ref.neurons().detach().double()
        expected = float(hyperspherical_energy(w, s=2.0, half_space=ref.role == "hidden"))
        assert init == final == pytest.approx(expected, rel=1e-5)
    assert cli.energy_summary.source == "MHERegularizer" and cli.energy_summary.settings["half_space"] is True


def test_format_energy_summary_marks_unknown_minima():
    from lightning_hyper.cli import format_energy_summary

    rows = [{"layer": "a", "role": "hidden", "neurons": 4, "dim": 3, "initial": 1.0, "energy": 0.5, "minimum": 0.4},
            {"layer": "b", "role": "output", "neurons": 9, "dim": 3, "initial": 2.0, "energy": 1.5, "minimum": None}]
    text = format_energy_summary(rows, "EnergyMonitor", {"s": 1.0, "metric": "angular", "half_space": False},
                                 resumed=True)
    lines = text.splitlines()
    assert "EnergyMonitor: s=1, metric=angular" in lines[0] and "resumed checkpoint" in lines[0]
    assert lines[2].split() == ["a", "4", "3", "1", "0.5", "0.4"]
    assert lines[3].split() == ["b", "(output)", "9", "3", "2", "1.5", "-"]


# ---------------------------------------------------------------- drift: names, ignored folders
def test_usage_says_lightning_hyper_under_python_dash_m(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lightning_hyper", "fit", "--help"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: lightning-hyper" in proc.stdout and "__main__" not in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "lightning_hyper", "fitt"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "lightning-hyper: error:" in proc.stderr and "__main__" not in proc.stderr
    assert "did you mean 'fit'?" in proc.stderr


def test_gitignore_covers_what_configs_and_notebooks_write():
    import fnmatch

    patterns = [p.strip() for p in (REPO / ".gitignore").read_text().splitlines() if p.strip()
                and not p.startswith("#")]
    assert "logs/" in patterns and "lightning_logs/" in patterns
    written = {"logs", "lightning_logs", "checkpoints"}  # notebooks' CSVLogger("logs"); Trainer(logger=False)
    for config in CONFIGS:
        cfg = yaml.safe_load(open(config))
        trainer = cfg.get("trainer", {})
        logger = trainer.get("logger")
        for lg in logger if isinstance(logger, list) else [logger]:
            if isinstance(lg, dict):
                written.add(str((lg.get("init_args") or {}).get("save_dir", "lightning_logs")))
        if trainer.get("default_root_dir"):
            written.add(str(trainer["default_root_dir"]))
        root = ((cfg.get("data") or {}).get("init_args") or {}).get("root")
        if root:
            written.add(str(root))
    for folder in written:
        top = Path(folder).parts[0]
        assert any(fnmatch.fnmatch(top + "/", p.lstrip("/")) for p in patterns), folder


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
    cli.trainer.save_checkpoint(tmp_path / "run.ckpt")
    torch.load(tmp_path / "run.ckpt", map_location="cpu", weights_only=True)  # `energy` reads it without a flag
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
    assert "_class_path" in torch.load(ckpt, weights_only=True)["hyper_parameters"]  # safe to load
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
    assert len(err.strip().splitlines()) == 1
    weights = tmp_path / "w.pt"
    torch.save({"a.weight": torch.randn(4, 3)}, weights)
    for bad, message in ((["--format", "xml"], "--format"), (["--metric", "cosine"], "--metric"),
                         (["--s", "-1"], "s=-1.0 is not supported")):
        with pytest.raises(SystemExit) as exc:
            main(["energy", str(weights), *bad])
        assert exc.value.code == 2, bad
        assert message in capsys.readouterr().err, bad


def test_energy_of_a_text_file_is_one_line(tmp_path, capsys):
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    with pytest.raises(SystemExit) as exc:
        main(["energy", str(junk)])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.strip().splitlines() == [f"lightning-hyper energy: error: {junk} is not a PyTorch checkpoint "
                                        "(neither a torch.save archive nor a pickle)"]


class _Payload:
    """Unpickling this object creates a file: the code a malicious checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


_RECORDED: list[str] = []


class _Recorder(torch.nn.Module):
    """A class outside lightning_hyper that a checkpoint names; records being constructed."""

    def __init__(self, **kwargs) -> None:
        super().__init__()
        _RECORDED.append("constructed")
        self.fc = torch.nn.Linear(3, 4)


def _record_call(**kwargs) -> None:
    _RECORDED.append("called")


def test_energy_loads_with_weights_only_and_needs_a_flag_for_pickles(tmp_path, capsys):
    """No code from the file runs without --unsafe-load: not a pickled object's, not a class it names."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"fc.weight": torch.randn(4, 3)}, "hyper_parameters": {"x": _Payload(marker)}}, evil)
    with pytest.raises(SystemExit) as exc:
        main(["energy", str(evil)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and not marker.exists()
    assert "refused" in err[0] and "--unsafe-load" in err[0] and str(evil) in err[0]
    assert main(["energy", str(evil), "--unsafe-load", "--format", "json"]) is None  # the user trusts it
    assert marker.exists() and json.loads(capsys.readouterr().out)["layers"][0]["layer"] == "fc"

    module = tmp_path / "module.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(3, 5)), module)  # a pickled nn.Module: objects, not tensors
    with pytest.raises(SystemExit):
        main(["energy", str(module)])
    assert "--unsafe-load" in capsys.readouterr().err
    main(["energy", str(module), "--unsafe-load", "--format", "json"])
    assert json.loads(capsys.readouterr().out)["source"] == "module:torch.nn.modules.container.Sequential"

    _RECORDED.clear()
    named = tmp_path / "named.ckpt"
    torch.save({"state_dict": _Recorder().state_dict(),
                "hyper_parameters": {"_class_path": f"{__name__}._Recorder"}}, named)
    _RECORDED.clear()
    main(["energy", str(named), "--format", "json"])  # loads safely; the named class is not imported
    captured = capsys.readouterr()
    assert _RECORDED == [] and json.loads(captured.out)["source"] == "state_dict"
    assert f"--model {__name__}._Recorder" in captured.err
    main(["energy", str(named), "--model", f"{__name__}._Recorder", "--format", "json"])  # the user names it
    assert _RECORDED == ["constructed"] and json.loads(capsys.readouterr().out)["source"].endswith("_Recorder")

    _RECORDED.clear()
    call = tmp_path / "call.ckpt"
    torch.save({"state_dict": {"fc.weight": torch.randn(4, 3)},
                "hyper_parameters": {"_class_path": f"{__name__}._record_call"}}, call)
    with pytest.raises(SystemExit):  # even with --unsafe-load a named function is never called
        main(["energy", str(call), "--unsafe-load"])
    assert _RECORDED == [] and "is not an nn.Module class" in capsys.readouterr().err


def test_lightning_checkpoints_of_the_library_load_safely(tiny_checkpoint):
    path, _ = tiny_checkpoint
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert {"state_dict", "hyper_parameters", "optimizer_states", "loops"} <= set(ckpt)


def test_energy_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["energy", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--s", "--metric", "--half-space", "--format", "--unsafe-load", "checkpoint"):
        assert option in out
    assert "weights_only=True" in out


FAST = ["--trainer.max_steps=3", "--trainer.limit_val_batches=1", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false"]


@pytest.mark.parametrize("edit,expected", [
    (("        output_weight: 1.0", "        output_weight: 1.0\n        include: nothing.*"),
     ["ValueError during fit", "include: pattern 'nothing.*' matches no"]),
    (("    lr: 0.05", "    lr: 1.0e+12"), ["training diverged", "lower the learning rate"]),
])
def test_errors_raised_while_training_are_short(edit, expected, tmp_path, monkeypatch, capsys):
    """An error the library raises once training runs (a selection that matches nothing, divergence) gets a
    few lines and exit status 1, not a traceback; --verbose restores the traceback."""
    monkeypatch.chdir(tmp_path)
    config = _edited_config(tmp_path, *edit)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", config, *FAST])
    err = capsys.readouterr().err
    assert exc.value.code == 1
    assert len(err.strip().splitlines()) <= 15 and "Traceback" not in err, err
    for piece in expected:
        assert piece in err, (piece, err)
    with pytest.raises((ValueError, FloatingPointError)):
        main(["fit", "--config", config, *FAST, "--verbose"])


def test_layers_command_prints_each_callbacks_selection_without_training(tmp_path, monkeypatch, capsys):
    """``lightning-hyper layers --config FILE``: the table the callbacks print at the start of fit (name, role,
    N, d, groups), for every selecting callback of the config, and nothing is trained or written."""
    from lightning_hyper.models.backbones import build_backbone
    from lightning_hyper.nn import select_neurons

    monkeypatch.chdir(tmp_path)
    main(["layers", "--config", MAIN_JOB])
    out = capsys.readouterr().out
    assert out.count("MHERegularizer: 11 neuron group(s), output layer 'head'") == 1
    assert "EnergyMonitor: 11 neuron group(s)" in out and "EnergySummary" not in out
    backbone = build_backbone("cnn9", in_channels=1, input_size=8, widths=[64, 128, 256])
    for group in select_neurons(backbone):
        n, d = group.neurons().shape[-2:]
        row = [line.split() for line in out.splitlines() if line.startswith(f"backbone.{group.name} ")][0]
        assert row == [f"backbone.{group.name}", "hidden", str(n), str(d), "1"]
    assert [line.split()[:3] for line in out.splitlines() if line.startswith("head ")][0] == ["head", "output", "10"]
    assert list(tmp_path.iterdir()) == []  # no logs, no checkpoints


# ---------------------------------------------------------------- CoMHE's projection options in YAML
COMHE_NEW = """
trainer:
  callbacks:
    - class_path: lightning_hyper.callbacks.CoMHERegularizer
      init_args:
        projection:
          kind: angle_preserving
          projection_dim: 4
          mode: alternating
          steps: 3
          lr: 0.5
          shared: true
        hidden_weight: 2.0
        every_n_steps: 2
"""
COMHE_OLD = """
trainer:
  callbacks:
    - class_path: lightning_hyper.callbacks.CoMHERegularizer
      init_args:
        projection: ap
        projection_dim: 4
        projection_mode: alternating
        projection_steps: 3
        projection_lr: 0.5
        share_projection: true
        hidden_weight: 2.0
        every_n_steps: 2
"""


def test_comhe_projection_options_from_yaml_new_and_deprecated_flat_form(tmp_path, monkeypatch):
    from lightning_hyper.callbacks import CoMHEProjection, CoMHERegularizer

    monkeypatch.chdir(tmp_path)
    built = {}
    for name, text in (("new", COMHE_NEW), ("old", COMHE_OLD)):
        (tmp_path / f"{name}.yaml").write_text(text)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cli = run_cli(["fit", "--config", str(tmp_path / f"{name}.yaml"), *TINY_ARGS, "--trainer.fast_dev_run=2",
                           "--trainer.logger=false", "--trainer.enable_progress_bar=false"])
        assert cli.trainer.state.finished and cli.trainer.global_step == 2
        (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, CoMHERegularizer)]
        deprecated = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)
                      and "CoMHERegularizer(" in str(w.message)]
        assert bool(deprecated) == (name == "old"), deprecated
        built[name] = cb
    new, old = built["new"], built["old"]
    assert new.projection_options == old.projection_options == CoMHEProjection(
        kind="angle_preserving", projection_dim=4, mode="alternating", steps=3, lr=0.5, shared=True)
    assert (new.projection, new.projection_steps, new.projection_update_every, new.every_n_steps) == (
        "angle_preserving", 3, 10, 2)
    assert "comhe/penalty" in new._trainer.callback_metrics
