"""Smoke run of benchmarks/dh2l_claims.py (the full run is reported, not tested)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "dh2l_claims.py"


def load():
    spec = importlib.util.spec_from_file_location("dh2l_claims", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_prints_table_and_timing(tmp_path, capsys):
    bench = load()
    bench.main(["--smoke", "--root", str(tmp_path)])
    out = capsys.readouterr().out
    for variant in bench.VARIANTS:
        assert any(line.startswith(variant + " ") for line in out.splitlines()), variant
    assert "diff to baseline" in out
    assert "x head fwd+bwd" in out and "H(AMcos" in out and "pairs=batch" in out


def test_variants_share_data_and_init(tmp_path):
    """Paired comparison: with lambda_e = 0, 'E' is exactly the baseline run (same data, same init)."""
    bench = load()
    import argparse

    args = argparse.Namespace(num_super=2, classes_per_super=2, dim=6, train_per_class=4, val_per_class=5,
                              batch_size=8, hidden=8, embedding=6, lr=0.05, weight_decay=5e-4, epochs=1,
                              metric="AMcos", lambda_e=0.0, lambda_h=0.0, root=str(tmp_path))
    assert bench.run_one("E", 0, args) == bench.run_one("baseline", 0, args)
