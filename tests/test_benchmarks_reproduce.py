"""benchmarks/reproduce.py: claims from the settings file, paired verdicts, a --quick smoke run writing the
table / JSON / plot, the README summary from claims.json, and the --full refusal without a GPU or data."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "reproduce.py"
SETTINGS = ROOT / "benchmarks" / "claims_settings.yaml"


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


def test_verdicts_come_from_the_paired_test():
    mod = load()
    # every seed better by 2 +- noise: paired t-test p < 0.05 in the claimed direction
    c = _claim(mod, [10.0, 11.0, 12.0, 13.0, 14.0], [12.1, 12.9, 14.2, 15.0, 15.8])
    assert c.diffs == pytest.approx([2.1, 1.9, 2.2, 2.0, 1.8]) and c.verdict == mod.REPRODUCED
    assert c.stats.ci_low > 0 and c.stats.p_t < 0.05
    # the same differences against the claimed direction (lower is better): contradicted
    c = _claim(mod, [10.0, 11.0, 12.0, 13.0, 14.0], [12.1, 12.9, 14.2, 15.0, 15.8], higher=False)
    assert c.verdict == mod.CONTRADICTED and c.stats.ci_high < 0
    # the case the unpaired rule got wrong: a large spread between seeds, a consistent paired gain
    ref = [78.0, 78.3, 73.2, 69.3, 70.7]
    var = [80.3, 82.5, 76.0, 74.8, 76.2]
    assert _claim(mod, ref, var).verdict == mod.REPRODUCED
    assert _claim(mod, [1.0, 2.0, 3.0, 4.0, 5.0], [1.5, 1.0, 3.5, 3.0, 6.0]).verdict == mod.INCONCLUSIVE
    assert _claim(mod, [1.0], [5.0]).verdict == mod.NO_VERDICT
    p = mod.PropertyClaim("g", "c", "s", "m", value=1e-7, tolerance=1e-5, paper="p")
    assert p.verdict == mod.REPRODUCED
    p.value = 1e-3
    assert p.verdict == mod.CONTRADICTED


def test_settings_file_declares_every_claim():
    mod = load()
    settings = mod.load_settings(SETTINGS)
    assert settings["protocol"]["seeds"] == 5 and settings["protocol"]["alpha"] == 0.05
    ids = set()
    for group in mod.GROUPS:
        gset = settings["groups"][group]
        assert gset["setting"] and gset["claims"] and "quick" in gset
        for spec in gset["claims"]:
            assert spec["id"] not in ids
            ids.add(spec["id"])
            assert spec["paper"] and spec["metric"]
            if spec.get("kind") != "property":
                assert isinstance(spec["higher_is_better"], bool) and spec["ref"] != spec["var"]
    for spec in settings["dropped"]:  # the old rows keep their results and say why they were dropped
        assert spec["reason"] and spec["group"] in mod.GROUPS
        assert len(spec["ref_values"]) == len(spec["var_values"]) >= 2
    dropped = mod.dropped_claims(settings)
    assert len(dropped) == len(settings["dropped"])


def test_quick_run_writes_table_json_and_plot(tmp_path, capsys):
    mod = load()
    claims = mod.main(["--quick", "--out", str(tmp_path)])
    settings = yaml.safe_load(SETTINGS.read_text())
    assert {c.group for c in claims} == set(mod.GROUPS)
    assert [c.id for c in claims] == [s["id"] for g in mod.GROUPS for s in settings["groups"][g]["claims"]]
    md = (tmp_path / "claims.md").read_text()
    assert "| Claim | Our setting | Ours (mean ± sd over seeds) | Δ [95 % CI] | p (t) | p (Wilcoxon) |" in md
    assert "**Rule.**" in md and "quick smoke run" in md and "--quick" in md
    assert "claims_settings.yaml" in md and "sha256" in md
    assert "## Settings tried and dropped" in md
    for c in claims:
        assert f"| {c.claim} | " in md, c.claim
        assert c.paper.replace("|", "\\|") in md
    for c in claims:  # one seed: no verdict; OPT's invariance is a property and holds
        if isinstance(c, mod.Claim):
            assert c.verdict == mod.NO_VERDICT and c.n == 1
            assert all(math.isfinite(v) for v in c.ref_values + c.var_values)
        else:
            assert c.verdict == mod.REPRODUCED
    data = json.loads((tmp_path / "claims.json").read_text())
    assert data["quick"] and data["seeds"] == [0] and set(data["timings_s"]) == set(mod.GROUPS)
    assert len(data["claims"]) == len(claims) and data["settings"]["sha256"]
    fields = {"group", "claim", "metric", "higher_is_better", "ref_values", "var_values", "verdict"}
    for row in data["claims"]:
        if row["kind"] == "Claim":
            assert fields <= set(row) and {"mean_diff", "ci_low", "ci_high", "p_t", "p_wilcoxon"} <= set(row["stats"])
    assert len(data["dropped"]) == len(settings["dropped"])
    from matplotlib.image import imread

    img = imread(tmp_path / "claims.png")
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 400 and img[..., :3].std() > 0.05
    assert "wrote" in capsys.readouterr().out


def test_only_selects_groups_and_parallel_units_merge_seeds(tmp_path):
    mod = load()
    claims = mod.main(["--quick", "--only", "dh2l", "--out", str(tmp_path / "a")])
    assert {c.group for c in claims} == {"dh2l"} and len(claims) == 2
    with pytest.raises(SystemExit):
        mod.main(["--only", "nope", "--out", str(tmp_path)])
    # two seeds cut into two single-seed units run by two worker processes, merged in seed order
    settings = yaml.safe_load(SETTINGS.read_text())
    settings["groups"]["dh2l"]["expected_seconds_per_seed"] = 1000
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(settings))
    claims2 = mod.main(["--quick", "--seeds", "2", "--jobs", "2", "--only", "dh2l", "--settings", str(path),
                        "--out", str(tmp_path / "b")])
    assert all(c.n == 2 and c.seeds == [0, 1] for c in claims2)
    assert [c.ref_values[0] for c in claims2] == pytest.approx([c.ref_values[0] for c in claims])  # seed 0 alike
    data = json.loads((tmp_path / "b" / "claims.json").read_text())
    assert data["jobs"] == 2 and data["seeds"] == [0, 1]



def test_update_replaces_only_the_groups_run(tmp_path):
    """--update keeps the other groups' rows of OUT/claims.json and refuses other seeds."""
    mod = load()
    kept = mod.Claim("comhe", "kept claim", "s", "m", True, "ref", "var", [1.0], [2.0], "paper", id="comhe.x",
                     seeds=[0])
    stale = mod.Claim("dh2l", "stale dh2l row", "s", "m", True, "ref", "var", [1.0], [2.0], "paper", seeds=[0])
    (tmp_path / "claims.json").write_text(json.dumps({"seeds": [0], "quick": True, "timings_s": {"comhe": 5.0},
                                                      "claims": [kept.as_dict(), stale.as_dict()]}))
    claims = mod.main(["--quick", "--only", "dh2l", "--update", "--out", str(tmp_path)])
    assert [c.group for c in claims] == ["comhe", "dh2l", "dh2l"] and claims[0].claim == "kept claim"
    data = json.loads((tmp_path / "claims.json").read_text())
    assert [c["group"] for c in data["claims"]] == ["comhe", "dh2l", "dh2l"]
    assert set(data["timings_s"]) == {"comhe", "dh2l"} and data["timings_s"]["comhe"] == 5.0
    md = (tmp_path / "claims.md").read_text()
    assert "| kept claim | " in md and "stale dh2l row" not in md
    with pytest.raises(SystemExit):  # seeds differ from the kept rows'
        mod.main(["--quick", "--seeds", "2", "--only", "dh2l", "--update", "--out", str(tmp_path)])

def test_chunks_and_merge():
    mod = load()
    assert mod._chunks([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]
    assert mod._chunks([0], 2) == [[0]]
    merged = mod._merge([{"a": {"x": [1.0, 2.0]}}, {"a": {"x": [3.0]}, "b": {"y": [4.0]}}])
    assert merged == {"a": {"x": [1.0, 2.0, 3.0]}, "b": {"y": [4.0]}}


def test_readme_summary_is_generated_from_claims_json(tmp_path):
    mod = load()
    assert mod.README_START in (ROOT / "README.md").read_text()  # the repository's README has the markers
    payload = {"seeds": [0, 1, 2], "claims": [
        _claim(mod, [10.0, 11.0, 12.0], [12.1, 12.9, 14.2]).as_dict(),
        mod.PropertyClaim("opt", "invariance", "s", "drift", 1e-7, 1e-5, "p").as_dict()]}
    (tmp_path / "claims.json").write_text(json.dumps(payload))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nintro\n{mod.README_START}\nold table\n{mod.README_END}\n\nrest\n")
    mod.main(["--readme-only", "--out", str(tmp_path), "--readme", str(readme)])
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# x\n\nintro\n") and text.endswith("\nrest\n")
    assert "| g | c | m: 11.00 → 13.07 |" in text and "reproduced" in text and "invariance" in text
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit):
        mod.main(["--readme-only", "--out", str(tmp_path), "--readme", str(readme)])


def test_full_refuses_without_gpu_or_data(tmp_path, capsys):
    mod = load()
    with pytest.raises(SystemExit) as err:
        mod.main(["--device", "cuda", "--full", "--data-root", str(tmp_path / "nodata"), "--out", str(tmp_path)])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert len(msg.strip().splitlines()) == 1 and msg.startswith("reproduce.py --full: cannot run")
    assert "cifar-100-python" in msg and "cifar-10-batches-py" in msg
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in msg
    assert not (tmp_path / "paper_claims.json").exists()


def test_full_requirements_and_arms(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import paper_settings

    full = yaml.safe_load(SETTINGS.read_text())["full"]
    assert "--device cpu" in paper_settings.missing("cpu", tmp_path, full)
    for folder in paper_settings.DATA_FOLDERS.values():
        (tmp_path / folder).mkdir()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert paper_settings.missing("cuda", tmp_path, full) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert paper_settings.missing("cuda", tmp_path, full) == "no CUDA GPU (torch.cuda.is_available() is False)"
    # every arm of every paper setting builds (model and callbacks), and every claim names existing arms
    for group in full["groups"].values():
        for arm, callbacks in group["arms"].items():
            model = paper_settings.build_model(group.get("models", {}).get(arm, group.get("model")))
            assert sum(p.numel() for p in model.parameters()) > 0
            paper_settings.build_callbacks(callbacks)
        for claim in group["claims"]:
            assert claim["ref"] in group["arms"] and claim["var"] in group["arms"]
