"""Why does OPT lose to plain training on the small tasks? An ablation over OPT's training setting.

Tasks (those of ``opt_claims.py``): the two-layer GCN (hidden 16, Adam lr 0.01, wd 5e-4, 200 full-batch
epochs) on KarateClub (3 labels per class) and on the SBM graph, and the vanilla PointNet on the
synthetic shapes (Adam 1e-3, 60 epochs). Every variant of one seed starts from the same backbone
initialization (``V`` = the plain model's initial weights) and sees the same data and batch order, so
the differences to the plain model are paired.

Factors (``--variants``; a variant is a ``key=value,...`` list, see ``VARIANTS``):

* ``method``: OPT method (``none`` = plain training);
* ``r_init``: initialization of ``P`` (``normal`` = N(0, 1) as in the thesis, ``identity``: R = I);
* ``rot_lr``: learning-rate multiplier for the rotation parameters ``P`` (the models' ``opt_lr_scale``);
* ``rot_wd``: weight decay of ``P`` (default: the model's);
* ``skip``: module-name globs left without OPT (e.g. ``mlp1.0`` = PointNet's d = 3 layer);
* ``refine``: ``hs_mhe`` / ``mhe``: lower the energy of ``V`` before training (thesis §7.3.7);
* ``kval``: KarateClub's validation share of the unlabelled nodes (0.5: 11 test nodes; 0: 22);
* ``scale``: ``0`` / ``1`` / ``c``: none, the GCN's learned scalar on the OPT conv, or one learned scale per
  output channel (``GraphClassifier(opt_scale=False / True / "channel")``);
* ``vinit``: ``init`` / ``orthogonal``: the GCN's fixed neurons ``V`` (``GraphClassifier(opt_v_init=...)``:
  the Glorot init, or the same with its singular values equalized);
* ``normv``: ``1``: unit-norm neurons in ``V`` (``apply_opt(normalize_v=True)``, thesis §7.4.2);
* ``drop``: the GCN's dropout (both arms);
* ``scale_lr``: learning-rate multiplier of the GCN's learned output scale(s) (``opt_scale_lr``; unset: 1,
  the setting before it became 10, so that the older rows keep their meaning);
* ``ogd_lr``: OGD's rotation learning rate; ``epochs``; ``optimizer`` (``adam`` / ``sgd``).

Unset factors take the models' defaults (``r_init="identity"``, ``opt_scale=True``, ``opt_lr_scale=0.3``
since the fix; ``r_init=normal,scale=0,rot_lr=1`` is the setting before it), except ``scale_lr`` (unset: 1;
``GraphClassifier``'s default is 10 since the second pass, ``scale_lr=10``).

    python benchmarks/opt_ablation.py --task karate --seeds 5 --variants "method=none" "method=cayley"
    python benchmarks/opt_ablation.py --task shapes --seeds 3 --variants "method=cayley,r_init=identity"
    python benchmarks/opt_ablation.py --markdown results.jsonl      # the table of docs/opt.md
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from typing import Any

import lightning as L
import torch

from claim_stats import format_p, paired_test
from lightning_hyper.data.graphs import KarateClubDataModule, SyntheticGraphDataModule
from lightning_hyper.data.pointclouds import SyntheticShapesDataModule
from lightning_hyper.models.graph import GraphClassifier
from lightning_hyper.models.pointcloud import PointCloudClassifier
from lightning_hyper.nn.opt import rotation_parameters

POINTNET = dict(widths=[64, 64, 64, 128, 256], fc_widths=[128, 64], input_transform=False, feature_transform=False)
TASKS = ("karate", "sbm_graph", "shapes")


def parse_variant(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=", 1)
        if key == "skip":
            out[key] = value.split("+")
        elif key in ("rot_lr", "rot_wd", "ogd_lr", "lr", "wd", "kval", "scale_lr"):
            out[key] = float(value)
        elif key == "scale":
            out[key] = "channel" if value == "c" else bool(int(value))
        elif key in ("epochs", "normv"):
            out[key] = int(value)
        elif key == "drop":
            out[key] = float(value)
        else:
            out[key] = value
    return out


def _with_rotation_wd(model: L.LightningModule, rot_wd: float | None) -> None:
    """Patch ``configure_optimizers`` so that the rotations get their own weight decay."""
    if rot_wd is None:
        return
    original = model.configure_optimizers

    def configure_optimizers():
        result = original()
        opt = result if isinstance(result, torch.optim.Optimizer) else result["optimizer"]
        rot = {id(p) for p in rotation_parameters(model)}
        for group in opt.param_groups:
            if any(id(p) in rot for p in group["params"]):
                group["weight_decay"] = rot_wd
        return result

    model.configure_optimizers = configure_optimizers


def run(task: str, seed: int, v: dict[str, Any]) -> float:
    L.seed_everything(seed, verbose=False)
    method = v.get("method", "none")
    method = None if method == "none" else method
    kwargs: dict[str, Any] = {"seed": seed} if method else {}
    if method and "r_init" in v:
        kwargs["r_init"] = v["r_init"]
    if method and "skip" in v:
        kwargs["exclude"] = v["skip"]
    if method and "refine" in v:
        kwargs["refine"] = v["refine"]
    if method and v.get("normv"):
        kwargs["normalize_v"] = True
    lr_scale = {"opt_lr_scale": v["rot_lr"]} if "rot_lr" in v else {}
    if task in ("karate", "sbm_graph"):
        dm = (KarateClubDataModule(train_per_class=3, val_fraction=v.get("kval", 0.5), seed=seed) if task == "karate"
              else SyntheticGraphDataModule(seed=seed))
        dm.setup()
        model = GraphClassifier(dm.num_features, dm.num_classes, opt_method=method, opt_kwargs=kwargs or None,
                                ogd_lr=v.get("ogd_lr", 0.05), optimizer=v.get("optimizer", "adam"),
                                lr=v.get("lr", 0.01), weight_decay=v.get("wd", 5e-4),
                                opt_scale=v.get("scale", True), dropout=v.get("drop", 0.5),
                                opt_scale_lr=v.get("scale_lr", 1.0),
                                **({"opt_v_init": v["vinit"]} if method and "vinit" in v else {}), **lr_scale)
        epochs = v.get("epochs", 200)
    else:
        dm = SyntheticShapesDataModule(num_points=128, train_per_class=32, val_per_class=2, test_per_class=16,
                                       seed=seed)
        model = PointCloudClassifier("pointnet", dm.num_classes, backbone_kwargs=POINTNET, opt_method=method,
                                     opt_kwargs=kwargs or None, ogd_lr=v.get("ogd_lr", 0.02),
                                     optimizer=v.get("optimizer", "adam"), lr=v.get("lr", 1e-3),
                                     weight_decay=v.get("wd", 0.0), **lr_scale)
        epochs = v.get("epochs", 60)
    _with_rotation_wd(model, v.get("rot_wd"))
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
                        accelerator="cpu", devices=1)
    trainer.fit(model, dm)
    return 100.0 * float(trainer.test(model, dm, verbose=False)[0]["test/acc"])


#: options that only concern OPT: a plain run with the other options is the paired reference
OPT_ONLY = ("method", "r_init", "rot_lr", "rot_wd", "skip", "scale", "ogd_lr", "refine", "vinit", "normv", "scale_lr")


def reference_of(variant: str) -> str:
    """The plain run a variant is compared with: same task, seeds and training options, no OPT."""
    rest = [item for item in variant.split(",") if item and item.split("=", 1)[0] not in OPT_ONLY]
    return ",".join(["method=none", *rest])


def markdown(paths: list[str]) -> str:
    """A table (task, variant, n, mean ± sd, paired difference to the plain run [95 % CI], p) from JSON lines."""
    rows = [json.loads(line) for path in paths for line in open(path) if line.strip()]
    index = {(r["task"], r["variant"], tuple(r["seeds"])): r["values"] for r in rows}
    out = ["| task | variant | seeds | accuracy % (mean ± sd) | Δ vs plain [95 % CI] | p (t) |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        vals, seeds = r["values"], tuple(r["seeds"])
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        ref = index.get((r["task"], reference_of(r["variant"]), seeds))
        if ref is None or r["variant"] == reference_of(r["variant"]):
            diff, p = "—", "—"
        else:
            t = paired_test(ref, vals)
            diff, p = f"{t.mean_diff:+.2f} [{t.ci_low:+.2f}, {t.ci_high:+.2f}]", format_p(t.p_t)
        span = f"{seeds[0]}-{seeds[-1]}" if len(seeds) > 1 else str(seeds[0])
        mean = statistics.mean(vals)
        out.append(f"| {r['task']} | `{r['variant']}` | {span} | {mean:.1f} ± {sd:.1f} | {diff} | {p} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--markdown", nargs="+", default=None, help="print the table of these JSON-lines files and stop")
    p.add_argument("--task", choices=TASKS)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed-offset", type=int, default=0, help="seeds seed_offset .. seed_offset + seeds - 1")
    p.add_argument("--variants", nargs="+", default=["method=none", "method=cayley"])
    p.add_argument("--json", default=None, help="append the results to this JSON-lines file")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(args.markdown))
        return {}
    if args.task is None:
        p.error("--task is required")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    base_name = "method=none"
    results: dict[str, list[float]] = {}
    for text in args.variants:
        t0 = time.perf_counter()
        seeds = range(args.seed_offset, args.seed_offset + args.seeds)
        results[text] = [run(args.task, s, parse_variant(text)) for s in seeds]
        vals = results[text]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0
        line = f"{args.task:<10} {text:<60} {statistics.mean(vals):6.2f} ± {sd:5.2f}"
        if base_name in results and text != base_name:
            r = paired_test(results[base_name], vals)
            line += (f"   diff {r.mean_diff:+6.2f} ± {r.sd_diff:5.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}] "
                     f"p {format_p(r.p_t)}")
        print(line + f"   [{', '.join(f'{x:.1f}' for x in vals)}] ({time.perf_counter() - t0:.0f} s)", flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps({"task": args.task, "variant": text, "seeds": list(seeds), "values": vals}) + "\n")
    return results


if __name__ == "__main__":
    main()
