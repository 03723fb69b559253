"""Smoke runs of benchmarks/margin_speed.py and benchmarks/sphereface_openset.py (full runs are reported)."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_margin_speed_quick(capsys):
    threads = torch.get_num_threads()
    res = load("margin_speed").main(["--quick"])
    out = capsys.readouterr().out
    assert "ratio ours / pml" in out and res["ours_s"] > 0 and res["pml_s"] > 0
    assert math.isfinite(res["ratio"]) and math.isfinite(res["loss"])
    torch.set_num_threads(threads)


def test_sphereface_openset_smoke(capsys):
    threads = torch.get_num_threads()
    res = load("sphereface_openset").main(["--smoke"])
    torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "mean ± std over seeds" in out and "A-Softmax better than softmax" in out
    for head in ("asoftmax", "linear"):
        row = res["summary"][("all", head)]
        assert 0.0 <= row["ver"][0] <= 1.0 and row["afs"][0] > 0 and row["div"] == [0.0]
    assert res["runs"] == 1
