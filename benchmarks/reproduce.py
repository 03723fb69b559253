"""The papers' claims at small scale, with paired statistics: ``benchmarks/results/claims.{md,json,png}``.

Every claim, its setting (data, sizes, model, epochs, learning rate, seeds, metric, direction) and the
paper's number live in one committed file, ``benchmarks/claims_settings.yaml``, fixed before the runs
that produced the results (settings tried and dropped stay listed there, with their results). This
script runs the claim benchmarks of this folder with those settings (it calls their functions; nothing
is re-implemented here), then per claim computes, from the per-seed paired differences
(``claim_stats.py``): the mean difference and its 95 % t-interval, the paired t-test and the exact
Wilcoxon signed-rank test, and a verdict:

* **reproduced**: paired t-test p < 0.05 and the mean difference in the claimed direction;
* **contradicted**: p < 0.05 against the claimed direction;
* **inconclusive**: otherwise; with one seed (``--quick``) no verdict.

Property rows (OPT's energy invariance) are reproduced when the measured value is below the stated
tolerance (contradicted otherwise). Groups (``--only``):

==========  ===============================================================================
comhe       MNIST-1D, 1-D CNN: baseline / MHE / HS-MHE / RP-CoMHE (``comhe_claims.py``)
imbalance   MHE under class imbalance: MNIST-1D single / multiple; the 2-D-feature toy
            (``imbalance_claims.py``)
sphereface  digits open-set verification, A-Softmax (m=4) vs softmax (``sphereface_openset.py``)
spherenet   SphereNet vs plain CNN, SGD momentum 0.9 lr 0.1, accuracy at 100 / 500 / 1000
            iterations (``spherenet_convergence.py``)
dcnet       digits, white-box FGSM accuracy of bounded DCNets vs a CNN (``dcnet_robustness.py``)
opt         GCN (KarateClub, SBM graph) and PointNet (synthetic shapes) with / without OPT
            (``opt_claims.py``)
dh2l        many fine classes with few samples in super-classes: baseline / E / E+H
            (``dh2l_claims.py``)
==========  ===============================================================================

    python benchmarks/reproduce.py                       # 5 seeds, all claims -> benchmarks/results/ + README
    python benchmarks/reproduce.py --only opt --seeds 5 --out /tmp/claims
    python benchmarks/reproduce.py --quick --out /tmp/claims   # 1 seed, tiny budgets: smoke test
    python benchmarks/reproduce.py --only opt --update   # re-run one group, keep the others' rows
    python benchmarks/reproduce.py --readme-only         # README summary from benchmarks/results/claims.json
    python benchmarks/reproduce.py --device cuda --full  # the papers' own settings (GPU + CIFAR under data/)

With ``--jobs N`` (default 2 on a machine with 2 or more CPUs) the work is cut into (group, seeds)
units, each run by its own ``python reproduce.py`` process with one torch thread, the longest first;
every run seeds everything itself, so the numbers do not depend on how the work was cut.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

import torch

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))  # the claim benchmarks are plain scripts of this folder
try:
    import lightning_hyper  # noqa: F401
except ImportError:  # run from a checkout without installing it
    sys.path.append(str(BENCH.parent))

from claim_stats import (
    CONTRADICTED,
    INCONCLUSIVE,
    NO_VERDICT,
    REPRODUCED,
    PairedResult,
    format_p,
    paired_test,
)

GROUPS = ("comhe", "imbalance", "sphereface", "spherenet", "dcnet", "opt", "dh2l")
DEFAULT_OUT = BENCH / "results"
DEFAULT_SETTINGS = BENCH / "claims_settings.yaml"
README = BENCH.parent / "README.md"
README_START, README_END = "<!-- claims:start -->", "<!-- claims:end -->"
COLORS = {REPRODUCED: "#2ca02c", CONTRADICTED: "#d62728", INCONCLUSIVE: "#ff7f0e", NO_VERDICT: "#7f7f7f"}

Results = dict[str, dict[str, list[float]]]  # arm -> metric key -> per-seed values (seed order)


# ------------------------------------------------------------------------------------ claims
@dataclass
class Claim:
    """One row: ``variant`` is claimed better than ``reference`` on ``metric`` (paired over seeds)."""

    group: str
    claim: str
    setting: str
    metric: str
    higher_is_better: bool
    reference: str
    variant: str
    ref_values: list[float]
    var_values: list[float]
    paper: str
    digits: int = 2
    id: str = ""
    seeds: list[int] = field(default_factory=list)

    @property
    def n(self) -> int:
        return min(len(self.ref_values), len(self.var_values))

    @property
    def diffs(self) -> list[float]:
        """Per-seed improvement in the claimed direction (paired)."""
        sign = 1.0 if self.higher_is_better else -1.0
        return [sign * (v - r) for r, v in zip(self.ref_values, self.var_values)]

    @property
    def stats(self) -> PairedResult:
        return paired_test(self.ref_values, self.var_values, self.higher_is_better)

    @property
    def verdict(self) -> str:
        return self.stats.verdict

    def as_dict(self) -> dict[str, Any]:
        return {"kind": "Claim", "id": self.id, "group": self.group, "claim": self.claim, "setting": self.setting,
                "metric": self.metric, "higher_is_better": self.higher_is_better, "reference": self.reference,
                "variant": self.variant, "ref_values": self.ref_values, "var_values": self.var_values,
                "paper": self.paper, "digits": self.digits, "seeds": self.seeds, "verdict": self.verdict,
                "stats": _finite(self.stats.as_dict())}


@dataclass
class PropertyClaim:
    """A row that holds when ``value <= tolerance`` (e.g. an invariance measured to rounding error)."""

    group: str
    claim: str
    setting: str
    metric: str
    value: float
    tolerance: float
    paper: str
    n: int = 1
    id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return REPRODUCED if self.value <= self.tolerance else CONTRADICTED

    def as_dict(self) -> dict[str, Any]:
        return {"kind": "PropertyClaim", "id": self.id, "group": self.group, "claim": self.claim,
                "setting": self.setting, "metric": self.metric, "value": self.value, "tolerance": self.tolerance,
                "paper": self.paper, "n": self.n, "extra": self.extra, "verdict": self.verdict}


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    """JSON has no inf/nan: write them as strings."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def claim_from_json(payload: dict[str, Any]) -> Claim | PropertyClaim:
    if payload["kind"] == "PropertyClaim":
        keys = ("group", "claim", "setting", "metric", "value", "tolerance", "paper", "n", "id", "extra")
        return PropertyClaim(**{k: payload[k] for k in keys if k in payload})
    keys = ("group", "claim", "setting", "metric", "higher_is_better", "reference", "variant", "ref_values",
            "var_values", "paper", "digits", "id", "seeds")
    return Claim(**{k: payload[k] for k in keys if k in payload})


# ------------------------------------------------------------------------------------ settings
def load_settings(path: Path = DEFAULT_SETTINGS) -> dict[str, Any]:
    import yaml

    with open(path) as fh:
        settings = yaml.safe_load(fh)
    missing = [g for g in GROUPS if g not in settings.get("groups", {})]
    if missing:
        raise ValueError(f"{path}: no settings for the claim group(s) {missing}")
    return settings


def settings_provenance(path: Path) -> dict[str, str]:
    """sha256 of the settings file and the last commit that changed it (if git knows it)."""
    info = {"path": os.path.relpath(path, BENCH.parent) if path.is_relative_to(BENCH.parent) else str(path),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16]}
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%h %cs %s", "--", str(path)], cwd=path.parent,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            info["commit"] = out.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", str(path)], cwd=path.parent,
                               capture_output=True, text=True, timeout=10)
        if dirty.returncode == 0 and dirty.stdout.strip():
            info["uncommitted"] = "yes: the file differs from its last commit"
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def group_args(group: dict[str, Any], quick: bool) -> dict[str, Any]:
    args = dict(group.get("args", {}))
    if quick:
        args.update(group.get("quick", {}))
    return args


def _argv(args: dict[str, Any]) -> list[str]:
    """``{"train_split": 0.16, "widths": [64, 128]}`` -> ``["--train-split", "0.16", "--widths", "64", "128"]``."""
    out: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out += [flag] if value else []
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def _load(name: str):
    return importlib.import_module(name)


# ------------------------------------------------------------------------------------ runners
# Each runner trains what its group's claims need for the given seeds and returns
# {arm: {metric key: [one value per seed, in seed order]}}; the claims are then read from the settings.
def run_comhe(args: dict[str, Any], seeds: list[int], workdir: str) -> Results:
    cc = _load("comhe_claims")
    ns = cc.parse_args(_argv(args))
    ns.seeds = seeds
    torch.set_num_threads(1)
    res = cc.claim(ns)  # {variant: (test errors %, hidden-layer HS energies)}
    return {v: {"error": res[v][0], "energy": res[v][1]} for v in res}


def run_imbalance(args: dict[str, Any], seeds: list[int], workdir: str) -> Results:
    ic = _load("imbalance_claims")
    ns = ic.parse_args(_argv(args))
    ns.seeds = seeds
    res = ic.claim(ns)  # {setting: {variant: {metric: values}}}
    return {f"{s}:{v}": metrics for s, variants in res.items() for v, metrics in variants.items()}


def run_sphereface(args: dict[str, Any], seeds: list[int], workdir: str) -> Results:
    """Per seed: a random permutation of the 10 digits (``split_seed + seed``) gives three disjoint
    held-out triples; the seed's value is the mean over its three held-out triples."""
    import numpy as np

    so = _load("sphereface_openset")
    args = dict(args)
    split_seed = int(args.pop("split_seed"))
    splits_per_seed = int(args.pop("splits_per_seed", 3))
    out: Results = {"softmax": {"ver": [], "afs": []}, "asoftmax": {"ver": [], "afs": []}}
    for seed in seeds:
        perm = np.random.default_rng(split_seed + seed).permutation(10)
        triples = [",".join(map(str, sorted(perm[3 * i:3 * i + 3].tolist()))) for i in range(splits_per_seed)]
        res = so.main(_argv(args) + ["--seeds", str(seed), "--heldout", *triples])["results"]
        for head, arm in (("linear", "softmax"), ("asoftmax", "asoftmax")):
            runs = [res[head][split][seed] for split in res[head]]
            out[arm]["ver"].append(100.0 * statistics.mean(r["ver"] for r in runs))
            out[arm]["afs"].append(statistics.mean(r["afs"] for r in runs))
    return out


def run_spherenet(args: dict[str, Any], seeds: list[int], workdir: str) -> Results:
    sc = _load("spherenet_convergence")
    args = dict(args)
    arms = args.pop("arms")  # {arm: variant name of spherenet_convergence.VARIANTS}
    keys = args.pop("keys")  # one metric key per checkpoint (the same with --quick's shorter checkpoints)
    if len(keys) != len(args["checkpoints"]):
        raise ValueError(f"spherenet settings: {len(keys)} keys for {len(args['checkpoints'])} checkpoints")
    out: Results = {}
    for arm, variant in arms.items():
        res = sc.main(_argv(args) + ["--seed-list", *map(str, seeds), "--variants", variant])[variant]
        out[arm] = {key: [100.0 * a for a in res[i]] for i, key in enumerate(keys)}
    return out


def run_dcnet(args: dict[str, Any], seeds: list[int], workdir: str) -> Results:
    dr = _load("dcnet_robustness")
    res = dr.main(_argv(args) + ["--seed-list", *map(str, seeds)])
    return {name: {k.lower(): [100.0 * a for a in vals] for k, vals in r.items()} for name, r in res.items()}


def run_opt(args: dict[str, Any], seeds: list[int], workdir: str) -> Results:
    oc = _load("opt_claims")
    res = oc.main(_argv(args) + ["--seed-list", *map(str, seeds)])
    out: Results = {}
    drift, orth = [], []
    for task, variants in res.items():
        for variant, row in variants.items():
            out[f"{task}:{variant}"] = {"acc": [100.0 * a for a in row["values"]]}
            if variant != "baseline":
                drift.append(row["drift_float64"])
                orth.append(row["orth_error"])
    out["all"] = {"drift_float64": drift, "orth_error": orth}
    return out


def run_dh2l(args: dict[str, Any], seeds: list[int], workdir: str) -> Results:
    dh = _load("dh2l_claims")
    ns = dh.parse_args(_argv(args) + ["--root", workdir])
    ns.seeds = seeds
    acc = dh.claim(ns)  # {variant: [val acc %]}
    return {v: {"acc": vals} for v, vals in acc.items()}


RUNNERS: dict[str, Callable[[dict[str, Any], list[int], str], Results]] = {
    "comhe": run_comhe, "imbalance": run_imbalance, "sphereface": run_sphereface, "spherenet": run_spherenet,
    "dcnet": run_dcnet, "opt": run_opt, "dh2l": run_dh2l,
}


def build_claims(group: str, gset: dict[str, Any], results: Results, seeds: list[int],
                 quick: bool) -> list[Claim | PropertyClaim]:
    """The group's claim rows of the settings file, filled with the runner's per-seed values."""
    rows: list[Claim | PropertyClaim] = []
    for spec in gset["claims"]:
        setting = spec.get("setting", gset["setting"])
        if quick:
            setting = f"{setting} [--quick: {gset.get('quick_note', 'tiny budget')}]"
        if spec.get("kind") == "property":
            values = results[spec["arm"]][spec["key"]]
            extra = {k: max(results[spec["arm"]][k]) for k in spec.get("extra_keys", [])
                     if results[spec["arm"]].get(k)}
            rows.append(PropertyClaim(group, spec["claim"], setting, spec["metric"], max(values),
                                      float(spec["tolerance"]), spec["paper"], n=len(seeds), id=spec["id"],
                                      extra=extra))
            continue
        ref, var = results[spec["ref"]][spec["key"]], results[spec["var"]][spec["key"]]
        rows.append(Claim(group, spec["claim"], setting, spec["metric"], bool(spec["higher_is_better"]),
                          spec.get("reference", spec["ref"]), spec.get("variant", spec["var"]), list(ref), list(var),
                          spec["paper"], digits=int(spec.get("digits", 2)), id=spec["id"], seeds=list(seeds)))
    return rows


def dropped_claims(settings: dict[str, Any]) -> list[Claim | PropertyClaim]:
    """The settings tried and dropped, with the results they had (not re-run, not counted)."""
    rows: list[Claim | PropertyClaim] = []
    for spec in settings.get("dropped", []):
        if spec.get("kind") == "property":
            rows.append(PropertyClaim(spec["group"], spec["claim"], spec["setting"], spec["metric"], spec["value"],
                                      float(spec["tolerance"]), spec["paper"], id=spec["id"]))
            continue
        rows.append(Claim(spec["group"], spec["claim"], spec["setting"], spec["metric"], bool(spec["higher_is_better"]),
                          spec["reference"], spec["variant"], list(spec["ref_values"]), list(spec["var_values"]),
                          spec.get("paper", ""), digits=int(spec.get("digits", 2)), id=spec["id"],
                          seeds=list(spec.get("seeds", []))))
    return rows


# ------------------------------------------------------------------------------------ execution
def _chunks(seeds: list[int], parts: int) -> list[list[int]]:
    parts = max(1, min(parts, len(seeds)))
    size = math.ceil(len(seeds) / parts)
    return [seeds[i:i + size] for i in range(0, len(seeds), size)]


def _merge(parts: list[Results]) -> Results:
    merged: Results = {}
    for part in parts:
        for arm, metrics in part.items():
            for key, values in metrics.items():
                merged.setdefault(arm, {}).setdefault(key, []).extend(values)
    return merged


def run_group_here(group: str, gset: dict[str, Any], seeds: list[int], quick: bool, workdir: str) -> Results:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and fair when units run in parallel
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return RUNNERS[group](group_args(gset, quick), seeds, workdir)
    finally:
        torch.set_num_threads(threads)


def run_units(groups: list[str], settings: dict[str, Any], settings_path: Path, seeds: list[int], quick: bool,
              jobs: int, workdir: str) -> tuple[dict[str, Results], dict[str, float]]:
    """Run every group; with ``jobs > 1`` as (group, seed chunk) units in ``jobs`` parallel processes."""
    results: dict[str, Results] = {}
    timings: dict[str, float] = {}
    if jobs <= 1:
        for group in groups:
            print(f"\n=== {group} (seeds {seeds}{', quick' if quick else ''}) ===", flush=True)
            t0 = time.perf_counter()
            results[group] = run_group_here(group, settings["groups"][group], seeds, quick, workdir)
            timings[group] = time.perf_counter() - t0
            print(f"=== {group}: {timings[group]:.0f} s", flush=True)
        return results, timings
    cost = {g: float(settings["groups"][g].get("expected_seconds_per_seed", 60)) for g in groups}
    units = [(g, chunk) for g in groups for chunk in _chunks(seeds, jobs if cost[g] * len(seeds) > 120 else 1)]
    units.sort(key=lambda u: -cost[u[0]] * len(u[1]))  # longest first
    running: list[tuple[str, list[int], subprocess.Popen, Path, Path, float]] = []
    parts: dict[str, list[tuple[list[int], Results, float]]] = {g: [] for g in groups}
    while units or running:
        while units and len(running) < jobs:
            g, chunk = units.pop(0)
            tag = f"{g}_{'_'.join(map(str, chunk))}"
            raw, log = Path(workdir) / f"{tag}.json", Path(workdir) / f"{tag}.log"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--only", g, "--seed-list", *map(str, chunk),
                   "--raw-out", str(raw), "--settings", str(settings_path), "--jobs", "1",
                   *(["--quick"] if quick else [])]
            print(f"=== {g} seeds {chunk}: started", flush=True)
            with open(log, "w") as fh:
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
            running.append((g, chunk, proc, raw, log, time.perf_counter()))
        time.sleep(0.5)
        for item in list(running):
            g, chunk, proc, raw, log, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            text = log.read_text()
            print(f"\n=== {g} seeds {chunk} (exit {proc.returncode}, {time.perf_counter() - t0:.0f} s) ===\n{text}",
                  flush=True)
            if proc.returncode != 0:
                for other in running:
                    other[2].kill()
                raise RuntimeError(f"claim group {g!r} (seeds {chunk}) failed (exit {proc.returncode}); "
                                   "its output is above")
            data = json.loads(raw.read_text())
            parts[g].append((chunk, data["results"][g], data["timings_s"][g]))
    for g in groups:
        ordered = sorted(parts[g], key=lambda p: seeds.index(p[0][0]))
        results[g] = _merge([p[1] for p in ordered])
        timings[g] = sum(p[2] for p in ordered)
    return results, timings


# ------------------------------------------------------------------------------------ outputs
def _num(x: float, digits: int) -> str:
    return f"{0.0 if abs(x) < 0.5 * 10 ** -digits else x:.{digits}f}"  # no "-0.00"


def _fmt(values: list[float], digits: int) -> str:
    if len(values) < 2:
        return _num(values[0], digits)
    return f"{_num(statistics.mean(values), digits)} ± {statistics.stdev(values):.{digits}f}"


def _ci(c: Claim) -> str:
    s = c.stats
    if c.n < 2:
        return _num(s.mean_diff, c.digits)
    return f"{_num(s.mean_diff, c.digits)} [{_num(s.ci_low, c.digits)}, {_num(s.ci_high, c.digits)}]"


def _cells(c: Claim | PropertyClaim) -> list[str]:
    if isinstance(c, PropertyClaim):
        return [c.claim, c.setting, f"{c.metric}: {c.value:.1e} (tolerance {c.tolerance:.0e})", "—", "—", "—",
                c.paper, f"**{c.verdict}**"]
    ours = f"{c.metric}: {c.reference} {_fmt(c.ref_values, c.digits)} → {c.variant} {_fmt(c.var_values, c.digits)}"
    s = c.stats
    wins = sum(d > 0 for d in c.diffs)
    return [c.claim, c.setting, f"{ours} (n = {c.n}; better in {wins}/{c.n})", _ci(c), format_p(s.p_t),
            format_p(s.p_wilcoxon), c.paper, f"**{c.verdict}**"]


def _table(claims: list) -> list[str]:
    lines = ["| Claim | Our setting | Ours (mean ± sd over seeds) | Δ [95 % CI] | p (t) | p (Wilcoxon) "
             "| Paper (its setting) | Verdict |", "|---|---|---|---|---|---|---|---|"]
    for c in claims:
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in _cells(c)) + " |")
    return lines


RULE = ("**Rule.** Per claim the runs are paired: within one seed the reference and the variant see the same "
        "data and batch order and, where the architectures match, the same initialization. Δ is the per-seed "
        "difference signed so that **Δ > 0 is the paper's direction** (variant − reference when higher is better, "
        "reference − variant when lower is better); shown: its mean and 95 % Student-t confidence interval. "
        "*Reproduced*: two-sided paired t-test p < 0.05 with Δ > 0 (the whole CI above 0); *contradicted*: "
        "p < 0.05 with Δ < 0; *inconclusive*: otherwise. The exact Wilcoxon signed-rank p (two-sided, zero "
        "differences dropped) is shown beside it as a check that does not assume normal differences; with 5 "
        "seeds its smallest possible value is 0.0625, so it cannot decide alone. Property rows hold when the "
        "measured value is below the stated tolerance. The paper's numbers come from the papers' own (much "
        "larger) settings and are shown for direction and size, not for equality.")


def write_markdown(claims: list, dropped: list, path: Path, command: str, seeds: list[int], quick: bool,
                   timings: dict[str, float], wall: float, jobs: int, provenance: dict[str, str],
                   settings: dict[str, Any]) -> None:
    counts = {v: sum(c.verdict == v for c in claims) for v in (REPRODUCED, CONTRADICTED, INCONCLUSIVE, NO_VERDICT)}
    prov = f"`{provenance['path']}` (sha256 {provenance['sha256']}"
    prov += f", last changed in commit {provenance['commit']}" if "commit" in provenance else ""
    prov += f"; {provenance['uncommitted']}" if "uncommitted" in provenance else ""
    prov += ")"
    lines = [
        "# Papers' claims at small scale",
        "",
        f"Generated by `{command}` ({time.strftime('%Y-%m-%d %H:%M')}, {platform.platform()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}); seeds {seeds}"
        + (" — **quick smoke run: tiny budgets, numbers meaningless**" if quick else "") + ".",
        f"Settings: {prov}, fixed before these runs; {settings.get('protocol', {}).get('chosen_by', '')}".rstrip(),
        "",
        RULE,
        "",
        *_table(claims),
        "",
        f"**{counts[REPRODUCED]} of {len(claims)} claims reproduced, {counts[CONTRADICTED]} contradicted, "
        f"{counts[INCONCLUSIVE]} inconclusive"
        + (f", {counts[NO_VERDICT]} without a verdict" if counts[NO_VERDICT] else "") + " at this scale.**",
        "",
        "![paired differences with 95 % confidence intervals](claims.png)",
        "",
        "## Settings tried and dropped",
        "",
        "Earlier settings of these claims, with the results they had when they were dropped (from the committed "
        "table they were in; not re-run, not counted above), under the same paired statistics. Why each was "
        "dropped is in the settings file.",
        "",
        *_table(dropped),
        "",
        "## Per-seed values",
        "",
    ]
    for c in claims:
        if isinstance(c, PropertyClaim):
            lines.append(f"- {c.claim}: {c.value!r} ({c.extra})")
        else:
            ref = ", ".join(f"{v:.{c.digits + 2}f}" for v in c.ref_values)
            var = ", ".join(f"{v:.{c.digits + 2}f}" for v in c.var_values)
            s = c.stats
            lines.append(f"- {c.claim} [{c.metric}], seeds {c.seeds}: {c.reference} [{ref}]; {c.variant} [{var}]; "
                         f"Δ mean {s.mean_diff:.4g}, sd {s.sd_diff:.4g}, t {s.t:.3g}")
    lines += ["", "## Runtime per group", ""]
    lines += [f"- {g}: {t:.0f} s" for g, t in timings.items()]
    lines += [f"- sum: {sum(timings.values()):.0f} s; wall clock {wall:.0f} s with {jobs} parallel job(s)", ""]
    path.write_text("\n".join(lines))


def write_plot(claims: list, path: Path) -> None:
    """Small multiples: per claim, Δ (claimed direction → right) with its 95 % CI, coloured by verdict."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = [c for c in claims if isinstance(c, Claim)]
    cols = 3
    nrows = max(1, math.ceil(len(rows) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 1.55 * nrows + 0.9), squeeze=False)
    for ax, c in zip(axes.flat, rows):
        s = c.stats
        color = COLORS[s.verdict]
        lo, hi = (s.ci_low, s.ci_high) if c.n >= 2 else (s.mean_diff, s.mean_diff)
        ax.errorbar([s.mean_diff], [0], xerr=[[s.mean_diff - lo], [hi - s.mean_diff]], fmt="o", color=color,
                    ecolor=color, elinewidth=2.5, capsize=5, markersize=7)
        ax.plot(c.diffs, [0.25] * c.n, "|", color="0.35", markersize=8)  # the per-seed differences
        ax.axvline(0.0, color="k", lw=0.8)
        span = max([abs(lo), abs(hi), *map(abs, c.diffs)])
        span = span if span > 1e-9 else 1.0  # all differences zero
        ax.set_xlim(-1.15 * span, 1.15 * span)
        ax.set_ylim(-0.5, 0.6)
        ax.set_yticks([])
        ax.set_title(f"{c.claim}\n{c.variant} vs {c.reference}; p = {format_p(s.p_t)}", fontsize=7.5)
        ax.set_xlabel(f"Δ {c.metric} (→ as claimed)", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    height = 1.55 * nrows + 0.9
    handles = [Patch(color=COLORS[v], label=v) for v in (REPRODUCED, CONTRADICTED, INCONCLUSIVE, NO_VERDICT)]
    fig.suptitle("Paired difference in the claimed direction: mean and 95 % CI (ticks: seeds)", fontsize=10,
                 y=1 - 0.12 / height)
    fig.legend(handles=handles, loc="upper center", ncol=4, fontsize=9, frameon=False,
               bbox_to_anchor=(0.5, 1 - 0.38 / height))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.8 / height))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def readme_table(payload: dict[str, Any]) -> str:
    """The README's summary: one line per claim from ``claims.json`` (no hand-typed numbers)."""
    claims = [claim_from_json(c) for c in payload["claims"]]
    lines = [f"Seeds {payload['seeds']}; Δ = mean paired difference in the paper's direction (> 0: as claimed) "
             f"[95 % CI], p = paired t-test; the settings are in claims.md. Regenerated by "
             f"`python benchmarks/reproduce.py` from `claims.json`.", "",
             "| Group | Claim | Reference → variant (mean over seeds) | Δ [95 % CI] | p | Verdict |",
             "|---|---|---|---|---|---|"]
    for c in claims:
        if isinstance(c, PropertyClaim):
            cells = [c.group, c.claim, f"{c.metric}: {c.value:.1e} (tolerance {c.tolerance:.0e})", "—", "—",
                     c.verdict]
        else:
            ours = (f"{c.metric}: {_num(statistics.mean(c.ref_values), c.digits)} → "
                    f"{_num(statistics.mean(c.var_values), c.digits)}")
            cells = [c.group, c.claim, ours, _ci(c), format_p(c.stats.p_t), c.verdict]
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    counts = {v: sum(c.verdict == v for c in claims) for v in (REPRODUCED, CONTRADICTED, INCONCLUSIVE)}
    lines += ["", f"{counts[REPRODUCED]} of {len(claims)} reproduced, {counts[CONTRADICTED]} contradicted, "
                  f"{counts[INCONCLUSIVE]} inconclusive."]
    return "\n".join(lines)


def update_readme(claims_json: Path, readme: Path = README) -> bool:
    """Replace the text between the README's claims markers by :func:`readme_table`; False if no markers."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    table = readme_table(json.loads(claims_json.read_text()))
    pattern = re.compile(re.escape(README_START) + r".*?" + re.escape(README_END), re.S)
    readme.write_text(pattern.sub(lambda _: f"{README_START}\n{table}\n{README_END}", text, count=1))
    return True


def run_full(settings: dict[str, Any], args: argparse.Namespace, out: Path) -> list:
    """The papers' own settings (``paper_settings.py``) -> ``OUT/paper_claims.{md,json,png}``."""
    import paper_settings

    full = settings["full"]
    seeds = args.seed_list or list(range(args.seeds if args.seeds is not None else int(full.get("seeds", 3))))
    t0 = time.perf_counter()
    results = paper_settings.run(full, seeds, args.device, Path(args.data_root))
    wall = time.perf_counter() - t0
    claims = [c for name, group in full["groups"].items() for c in build_claims(name, group, results[name], seeds,
                                                                                   False)]
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python benchmarks/reproduce.py", *(sys.argv[1:])])
    write_markdown(claims, [], out / "paper_claims.md", command, seeds, False, {"full": wall}, wall, 1,
                   settings_provenance(Path(args.settings)), settings)
    write_plot(claims, out / "paper_claims.png")
    (out / "paper_claims.json").write_text(json.dumps(
        {"seeds": seeds, "device": torch.cuda.get_device_name(0), "wall_s": wall,
         "claims": [c.as_dict() for c in claims]}, indent=2))
    print(f"wrote {out / 'paper_claims.md'}, {out / 'paper_claims.json'}, {out / 'paper_claims.png'}")
    return claims


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="each group's tiny budget, 1 seed unless --seeds is given (smoke test)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds 0..N-1 (default: the settings', 5)")
    parser.add_argument("--seed-list", type=int, nargs="+", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="+", choices=GROUPS, default=list(GROUPS), help="claim groups to run")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (claims.md, claims.png, claims.json)")
    parser.add_argument("--settings", default=str(DEFAULT_SETTINGS), help="the claims' settings file")
    parser.add_argument("--jobs", type=int, default=None,
                        help="parallel processes (default: 1 with --quick, else min(2, CPUs))")
    parser.add_argument("--raw-out", default=None, help=argparse.SUPPRESS)  # a worker's per-seed results
    parser.add_argument("--readme", default=None,
                        help="README to update between its claims markers (default: the repository's README "
                             "when --out is the default folder and all groups ran)")
    parser.add_argument("--update", action="store_true",
                        help="keep the other groups' rows of OUT/claims.json (same seeds) and replace only the "
                             "--only groups' rows in claims.md/json/png")
    parser.add_argument("--readme-only", action="store_true",
                        help="only regenerate the README summary from OUT/claims.json")
    parser.add_argument("--full", action="store_true", help="the papers' own settings (needs --device cuda and "
                                                             "CIFAR under data/); see paper_settings.py")
    parser.add_argument("--device", default="cpu", help="device of --full (cuda)")
    parser.add_argument("--data-root", default=str(BENCH.parent / "data"), help="CIFAR root of --full")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.readme_only:
        readme = Path(args.readme) if args.readme else README
        if not update_readme(out / "claims.json", readme):
            parser.exit(2, f"reproduce.py: {readme} has no {README_START} ... {README_END} markers\n")
        print(f"updated {readme} from {out / 'claims.json'}")
        return []
    settings_path = Path(args.settings)
    settings = load_settings(settings_path)
    if args.full:
        import paper_settings

        problem = paper_settings.missing(args.device, Path(args.data_root), settings["full"])
        if problem:
            parser.exit(2, f"reproduce.py --full: cannot run the papers' settings: {problem}\n")
        return run_full(settings, args, out)
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    jobs = args.jobs if args.jobs is not None else (1 if args.quick else min(2, os.cpu_count() or 1))
    if jobs < 1:
        parser.error(f"--jobs must be >= 1, got {jobs}")
    n_seeds = args.seeds if args.seeds is not None else int(settings["protocol"]["seeds"])
    seeds = args.seed_list or ([0] if args.quick and args.seeds is None else list(range(n_seeds)))
    if args.update and not args.raw_out and (out / "claims.json").exists():  # check before the runs
        old = json.loads((out / "claims.json").read_text())
        if old["seeds"] != seeds or old.get("quick") != args.quick:
            parser.exit(2, f"reproduce.py --update: {out / 'claims.json'} has seeds {old['seeds']} "
                           f"(quick={old.get('quick')}), this run {seeds} (quick={args.quick})\n")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        results, timings = run_units(list(args.only), settings, settings_path, seeds, args.quick, jobs, workdir)
    wall = time.perf_counter() - t_start
    if args.raw_out:  # a worker of run_units: hand the per-seed results back, no table
        Path(args.raw_out).write_text(json.dumps({"results": results, "timings_s": timings}))
        return []
    claims: list = []
    for group in args.only:
        claims += build_claims(group, settings["groups"][group], results[group], seeds, args.quick)
    dropped = [c for c in dropped_claims(settings) if c.group in args.only]
    updated = False
    if args.update and (out / "claims.json").exists():
        old = json.loads((out / "claims.json").read_text())
        order = {g: i for i, g in enumerate(GROUPS)}
        kept = [claim_from_json(c) for c in old["claims"] if c["group"] not in args.only]
        claims = sorted(kept + claims, key=lambda c: order.get(c.group, len(order)))
        dropped = sorted(dropped_claims(settings), key=lambda c: order.get(c.group, len(order)))
        timings = {g: (timings[g] if g in timings else old.get("timings_s", {}).get(g, 0.0)) for g in GROUPS
                   if g in timings or g in old.get("timings_s", {})}
        updated = {c.group for c in claims} >= set(GROUPS)
    out.mkdir(parents=True, exist_ok=True)
    provenance = settings_provenance(settings_path)
    command = " ".join(["python benchmarks/reproduce.py", *(sys.argv[1:] if argv is None else argv)])
    write_markdown(claims, dropped, out / "claims.md", command, seeds, args.quick, timings, wall, jobs, provenance,
                   settings)
    write_plot(claims, out / "claims.png")
    payload = {"seeds": seeds, "quick": args.quick, "settings": provenance, "timings_s": timings, "wall_s": wall,
               "jobs": jobs, "claims": [c.as_dict() for c in claims], "dropped": [c.as_dict() for c in dropped]}
    (out / "claims.json").write_text(json.dumps(payload, indent=2))
    readme = Path(args.readme) if args.readme else (
        README if out.resolve() == DEFAULT_OUT.resolve() and (set(args.only) == set(GROUPS) or updated)
        and not args.quick else None)
    if readme is not None and update_readme(out / "claims.json", readme):
        print(f"updated the claims summary of {readme}")
    print(f"\n{'claim':<62} {'Δ [95 % CI]':<28} {'p (t)':<9} verdict")
    for c in claims:
        ci = _ci(c) if isinstance(c, Claim) else "—"
        p = format_p(c.stats.p_t) if isinstance(c, Claim) else "—"
        print(f"{c.claim[:61]:<62} {ci:<28} {p:<9} {c.verdict}")
    print(f"wrote {out / 'claims.md'}, {out / 'claims.png'}, {out / 'claims.json'} "
          f"({wall:.0f} s wall, {jobs} job(s))")
    return claims


if __name__ == "__main__":
    main()
