"""benchmarks/reproduce.py: the verdict rule, and a --quick smoke run writing the table and the plot."""
from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce.py"


def load():
    spec = importlib.util.spec_from_file_location("bench_reproduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _claim(mod, ref, var, higher=True):
    return mod.Claim("g", "c", "s", "m", higher, "ref", "var", ref, var, "paper")


def test_verdict_rule():
    mod = load()
    # higher is better: mean difference 2.0 against a pooled sd of sqrt((1 + 1) / 2) = 1 -> reproduced
    c = _claim(mod, [10.0, 11.0, 12.0], [12.0, 13.0, 14.0])
    assert c.improvement == pytest.approx(2.0) and c.pooled_std == pytest.approx(1.0)
    assert c.diffs == [2.0, 2.0, 2.0] and c.verdict == mod.REPRODUCED
    # right direction but within the noise (0.5 < pooled sd 1) -> not reproduced
    assert _claim(mod, [10.0, 11.0, 12.0], [10.5, 11.5, 12.5]).verdict == mod.NOT_REPRODUCED
    # lower is better (errors): a decrease is the claimed direction, an increase is not
    assert _claim(mod, [30.0, 30.5, 29.5], [25.0, 25.5, 24.5], higher=False).verdict == mod.REPRODUCED
    assert _claim(mod, [25.0, 25.5, 24.5], [30.0, 30.5, 29.5], higher=False).verdict == mod.NOT_REPRODUCED
    # pooled sd from the two arms' sample variances
    c = _claim(mod, [1.0, 2.0, 6.0], [4.0, 9.0, 5.0])
    expected = math.sqrt((statistics.variance([1, 2, 6]) + statistics.variance([4, 9, 5])) / 2)
    assert c.pooled_std == pytest.approx(expected)
    assert c.verdict == (mod.REPRODUCED if 3.0 > expected else mod.NOT_REPRODUCED)
    # one seed: no verdict
    assert _claim(mod, [1.0], [5.0]).verdict == mod.NO_VERDICT
    p = mod.PropertyClaim("g", "c", "s", "m", value=1e-7, tolerance=1e-5, paper="p")
    assert p.verdict == mod.REPRODUCED
    p.value = 1e-3
    assert p.verdict == mod.NOT_REPRODUCED


def test_quick_run_writes_table_json_and_plot(tmp_path, capsys):
    mod = load()
    claims = mod.main(["--quick", "--out", str(tmp_path)])
    groups = {c.group for c in claims}
    assert groups == set(mod.GROUPS)
    md = (tmp_path / "claims.md").read_text()
    assert "| Claim | Our setting | Ours (mean ± std over seeds) |" in md and "**Rule.**" in md
    assert "quick smoke run" in md and "--quick" in md  # the regenerating command is recorded
    for c in claims:
        assert f"| {c.claim} | " in md, c.claim
        assert c.paper.replace("|", "\\|") in md
    table_rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| Claim")]
    assert len(table_rows) == len(claims)
    # one seed: comparisons give no verdict; OPT's invariance is a property and holds
    for c in claims:
        if isinstance(c, mod.Claim):
            assert c.verdict == mod.NO_VERDICT and c.n == 1
            assert all(math.isfinite(v) for v in c.ref_values + c.var_values)
        else:
            assert c.verdict == mod.REPRODUCED
    data = json.loads((tmp_path / "claims.json").read_text())
    assert data["quick"] and data["seeds"] == [0] and set(data["timings_s"]) == set(mod.GROUPS)
    assert len(data["claims"]) == len(claims)
    # the plot: a real PNG with varied pixels
    from matplotlib.image import imread

    img = imread(tmp_path / "claims.png")
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400 and img[..., :3].std() > 0.05
    assert "wrote" in capsys.readouterr().out


def test_only_selects_groups(tmp_path):
    mod = load()
    claims = mod.main(["--quick", "--only", "dh2l", "--out", str(tmp_path)])
    assert {c.group for c in claims} == {"dh2l"} and len(claims) == 2
    with pytest.raises(SystemExit):
        mod.main(["--only", "nope", "--out", str(tmp_path)])


def test_parallel_jobs_merge_the_groups(tmp_path):
    """--jobs 2 runs each group as its own process; the merged table equals the groups' claims."""
    mod = load()
    claims = mod.main(["--quick", "--jobs", "2", "--only", "dh2l", "spherenet", "--out", str(tmp_path)])
    assert [c.group for c in claims] == ["dh2l", "dh2l", "spherenet"]  # the order asked for
    assert all(isinstance(c, mod.Claim) and c.n == 1 for c in claims)
    data = json.loads((tmp_path / "claims.json").read_text())
    assert data["jobs"] == 2 and set(data["timings_s"]) == {"dh2l", "spherenet"}
    md = (tmp_path / "claims.md").read_text()
    assert all(f"| {c.claim} | " in md for c in claims)
