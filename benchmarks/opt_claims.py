"""Small-scale OPT claims (thesis Ch. 7, Tables 7.11-7.12 in spirit): GCN and PointNet with and without OPT.

Offline stand-ins for the thesis' datasets, 3 seeds each, test accuracy mean ± std:

* GCN (Kipf & Welling: hidden 16, dropout 0.5, Adam lr 0.01, wd 5e-4, 200 full-batch epochs) on
  torch-geometric's KarateClub (3 labelled nodes per class) and on the seeded SBM graph of
  ``SyntheticGraphDataModule``; OPT (Cayley, Gram-Schmidt, OGD) on ``W₀`` only, with the models'
  defaults: rotation initialized at ``R = I`` and a learned scalar on the OPT conv's output (trained at 10x
  the learning rate, ``--gcn-scale-lr``).
* Vanilla PointNet (no T-Nets; shared MLP 64-64-64-128-256, FC 128-64, Adam lr 1e-3, 60 epochs) on
  the synthetic primitive shapes (6 classes, 128 points, random rotations, noise 0.02); OPT on every
  1×1 conv and FC except the classifier, rotations initialized at ``R = I``.

Why those defaults (OPT lost 11-16 points without them): ``benchmarks/opt_ablation.py`` and docs/opt.md.

Also printed, per OPT run: the largest relative change of the OPT layers' hyperspherical energy as
logged by the ``EnergyMonitor`` every step (float32), the same in float64 between the final weights
``W = R V`` and ``V`` — the invariance OPT is built on — and ``max|RᵀR − I|`` at the end. (PointNet's
first layer has 64 neurons in 3-D, some 1° apart; its float32 energy is ill-conditioned, which is why
the monitor's number there is ~1e-4 while the float64 comparison is ~1e-6.) The thesis' claim is a small *gain* from
OPT on Cora/PubMed/ModelNet40;
``benchmarks/reproduce.py`` turns these runs into paired claims (``--runs`` picks the task:variant pairs).

    python benchmarks/opt_claims.py            # ~3 minutes on 2 CPU cores
    python benchmarks/opt_claims.py --smoke    # 1 seed, few epochs (seconds; used by the tests)
"""
from __future__ import annotations

import argparse
import logging
import warnings

import lightning as L
import torch

from lightning_hyper.callbacks import EnergyMonitor
from lightning_hyper.data.graphs import KarateClubDataModule, SyntheticGraphDataModule
from lightning_hyper.data.pointclouds import SyntheticShapesDataModule
from lightning_hyper.models.graph import GraphClassifier
from lightning_hyper.models.pointcloud import PointCloudClassifier
from lightning_hyper.functional import as_neurons, hyperspherical_energy
from lightning_hyper.nn.opt import get_opt, opt_layers, orthogonality_errors

POINTNET = dict(widths=[64, 64, 64, 128, 256], fc_widths=[128, 64], input_transform=False, feature_transform=False)
POINTNET_SMOKE = dict(widths=[8, 8, 8, 16, 32], fc_widths=[16, 8], input_transform=False, feature_transform=False)


def _fit(model, dm, epochs: int, monitor_layers: bool) -> tuple[float, float, float, float]:
    """Train; return (test accuracy, max relative change of the OPT layers' energy logged by the
    EnergyMonitor (float32), max |E(W) − E(V)|/E(V) in float64 at the end, orthogonality error)."""
    names = list(opt_layers(model))
    callbacks = [EnergyMonitor(every_n_steps=1, include=names, output_layer="none")] if names and monitor_layers else []
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks,
                        accelerator="cpu", devices=1)
    trainer.fit(model, dm)
    acc = float(trainer.test(model, dm, verbose=False)[0]["test/acc"])
    drift = 0.0
    if callbacks:
        first: dict[str, float] = {}
        for row in callbacks[0].history:
            e0 = first.setdefault(row["layer"], row["energy"])
            drift = max(drift, abs(row["energy"] - e0) / abs(e0))
    exact = 0.0
    for layer in opt_layers(model).values():
        e_v = hyperspherical_energy(get_opt(layer).V.T.double())
        e_w = hyperspherical_energy(as_neurons(layer).detach().double())
        exact = max(exact, abs(e_w.item() - e_v.item()) / e_v.item())
    err = max(orthogonality_errors(model).values()) if names else 0.0
    return acc, drift, exact, err


def _report(task: str, variant: str, rows: list[tuple[float, float, float, float]]) -> dict[str, float]:
    acc = torch.tensor([r[0] for r in rows])
    std = acc.std().item() if len(rows) > 1 else 0.0
    drift, exact, err = (max(r[i] for r in rows) for i in (1, 2, 3))
    extra = (f"   energy drift: monitor {drift:.1e}, float64 {exact:.1e}   max|RᵀR−I| {err:.1e}"
             if variant != "baseline" else "")
    print(f"  {task:<16} {variant:<14} acc {acc.mean():.3f} ± {std:.3f}  (n={len(rows)}){extra}", flush=True)
    return {"mean": acc.mean().item(), "std": std, "drift": drift, "drift_float64": exact, "orth_error": err,
            "values": acc.tolist()}


RUNS = ("karate:baseline", "karate:cayley", "karate:gram_schmidt", "karate:ogd", "sbm_graph:baseline",
        "sbm_graph:cayley", "sbm_graph:gram_schmidt", "sbm_graph:ogd", "shapes:baseline", "shapes:cayley",
        "shapes:gram_schmidt")


def main(argv: list[str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="1 seed, few epochs, tiny networks")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed-list", type=int, nargs="+", default=None, help="explicit seeds (overrides --seeds)")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS, help="task:variant pairs to train")
    parser.add_argument("--gcn-epochs", type=int, default=200)
    parser.add_argument("--pn-epochs", type=int, default=60)
    parser.add_argument("--ogd-lr", type=float, default=0.02, help="GCN OGD rotation learning rate (the thesis: 0.02)")
    parser.add_argument("--gcn-scale-lr", type=float, default=None,
                        help="learning-rate multiplier of the GCN's learned output scale on the OPT conv "
                             "(GraphClassifier(opt_scale_lr=...); default: the model's)")
    parser.add_argument("--karate-val-fraction", type=float, default=0.5,
                        help="share of KarateClub's unlabelled nodes held out for validation (unused here); the "
                             "rest is the test set (0: all 22 unlabelled nodes are test nodes)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    seeds = args.seed_list or ([0] if args.smoke else list(range(args.seeds)))
    gcn_epochs, pn_epochs = (5, 2) if args.smoke else (args.gcn_epochs, args.pn_epochs)
    runs = [r.split(":") for r in args.runs]
    results: dict[str, dict[str, dict[str, float]]] = {}

    graph_tasks = {
        "karate": lambda s: KarateClubDataModule(train_per_class=3, val_fraction=args.karate_val_fraction, seed=s),
        "sbm_graph": lambda s: SyntheticGraphDataModule(seed=s),
    }
    if any(t in graph_tasks for t, _ in runs):
        print("GCN (test accuracy, mean ± std over seeds)")
    for task, make_dm in graph_tasks.items():
        for variant in [v for t, v in runs if t == task]:
            rows = []
            for seed in seeds:
                L.seed_everything(seed, verbose=False)
                dm = make_dm(seed)
                dm.setup()
                model = GraphClassifier(dm.num_features, dm.num_classes,
                                        opt_method=None if variant == "baseline" else variant,
                                        opt_kwargs=None if variant == "baseline" else {"seed": seed},
                                        ogd_lr=args.ogd_lr,
                                        **({} if args.gcn_scale_lr is None else {"opt_scale_lr": args.gcn_scale_lr}))
                rows.append(_fit(model, dm, gcn_epochs, monitor_layers=True))
            results.setdefault(task, {})[variant] = _report(task, variant, rows)

    shape_variants = [v for t, v in runs if t == "shapes"]
    if shape_variants:
        print("PointNet on synthetic shapes (6 classes)")
    for variant in shape_variants:
        rows = []
        for seed in seeds:
            L.seed_everything(seed, verbose=False)
            dm = SyntheticShapesDataModule(num_points=32 if args.smoke else 128,
                                           train_per_class=4 if args.smoke else 32, val_per_class=2,
                                           test_per_class=4 if args.smoke else 16, seed=seed)
            model = PointCloudClassifier("pointnet", dm.num_classes,
                                         backbone_kwargs=POINTNET_SMOKE if args.smoke else POINTNET,
                                         opt_method=None if variant == "baseline" else variant,
                                         opt_kwargs=None if variant == "baseline" else {"seed": seed})
            rows.append(_fit(model, dm, pn_epochs, monitor_layers=not args.smoke))
        results.setdefault("shapes", {})[variant] = _report("pointnet_shapes", variant, rows)
    return results


if __name__ == "__main__":
    main()
