"""Smoke runs of the OPT benchmarks (the full runs print the numbers quoted in the issue's closing note)."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import opt_claims
import opt_speed


def test_opt_speed_smoke(capsys):
    results = opt_speed.main(["--smoke"])
    assert set(results) == {"linear", "conv", "linear_construction", "conv_construction"}
    assert set(results["conv_construction"]) == {f"{m}:{o}" for m in ("cayley", "gram_schmidt")
                                                 for o in ("full", "sopt", "pe4")}
    for kind in ("linear", "conv"):
        res = results[kind]
        assert {"plain", *opt_speed.METHODS, "cayley:sopt", "gram_schmidt:pe4"} <= set(res)
        assert all(math.isfinite(t) and t > 0 for t in res.values())
    assert "torch_cayley" in results["linear"]
    out = capsys.readouterr().out
    assert "x plain" in out and "OPT part alone" in out


@pytest.mark.slow
def test_opt_claims_smoke(capsys):
    results = opt_claims.main(["--smoke"])
    assert set(results) == {"karate", "sbm_graph", "shapes"}
    for _task, rows in results.items():
        assert "baseline" in rows and "cayley" in rows
        for variant, row in rows.items():
            assert 0.0 <= row["mean"] <= 1.0
            if variant != "baseline":
                assert row["drift_float64"] < 1e-5 and row["orth_error"] < 1e-5  # energy invariance, orthogonality
    assert "mean ± std" in capsys.readouterr().out
