"""DH2L small-scale claim: baseline vs E vs E+H on an offline two-level hierarchy (3 seeds, mean ± std).

The paper (DH2L, Tables 2-5) reports that the pairwise energy 'E' with its discrete+continuous
metrics improves over weight decay alone, and that adding the hierarchical regularization 'H' on the
classifier improves further, most when there are many super-classes. This script checks the
direction of that claim at CPU scale on :class:`~lightning_hyper.data.HierarchicalGaussianDataModule`
(Gaussian-mixture classes nested in Gaussian super-classes) with a small MLP:

* ``baseline``   plain bias-free linear head, weight decay only (the paper's baseline+l2);
* ``E``          + ``MHERegularizer(metric=M)`` on every layer (DH2L's energy with metric M);
* ``hier-param`` the hierarchical head (w = s - c) with weight decay only (separates the effect of
                 the parameterization from that of the regularizer; not in the paper);
* ``E+H``        hierarchical head + E + ``HierarchicalRegularizer(metric=M)``.

Every run of one seed uses the same data and the same backbone initialization. Printed: validation
accuracy (%) per seed, mean ± std (sample std over seeds), and the paired difference to baseline.

Second part: cost of the regularizer per step on a 100-class / 20-super-class head with 512-d
features (batch 256), as a ratio to the head's forward+backward (median of interleaved repetitions).

    python benchmarks/dh2l_claims.py                 # 3 seeds, metric AMcos
    python benchmarks/dh2l_claims.py --metric bin --num-super 10
    python benchmarks/dh2l_claims.py --smoke         # tiny, used by the tests
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import lightning as L
import torch

from lightning_hyper.callbacks import HierarchicalRegularizer, MHERegularizer
from lightning_hyper.callbacks.hierarchical import hierarchical_penalty
from lightning_hyper.data import HierarchicalGaussianDataModule
from lightning_hyper.functional.discrete import metric_energy
from lightning_hyper.models import HypersphericalClassifier
from lightning_hyper.nn import HierarchicalLinear

VARIANTS = ("baseline", "E", "hier-param", "E+H")


def run_one(variant: str, seed: int, args: argparse.Namespace) -> float:
    """Validation accuracy (%) of one variant trained with one seed."""
    data = HierarchicalGaussianDataModule(num_super=args.num_super, classes_per_super=args.classes_per_super,
                                          dim=args.dim, train_per_class=args.train_per_class,
                                          val_per_class=args.val_per_class, batch_size=args.batch_size, seed=seed)
    hierarchical = variant in ("hier-param", "E+H")
    L.seed_everything(seed, verbose=False)
    model = HypersphericalClassifier(
        backbone="embedding_mlp", num_classes=data.num_classes,
        backbone_kwargs={"in_features": args.dim, "hidden": [args.hidden], "embedding_dim": args.embedding},
        head="hierarchical" if hierarchical else "linear",
        head_kwargs={"hierarchy": data.hierarchy} if hierarchical else {"bias": False},
        optimizer="sgd", lr=args.lr, momentum=0.9, weight_decay=args.weight_decay, scheduler="cosine",
    )
    callbacks: list = []
    if variant in ("E", "E+H"):
        callbacks.append(MHERegularizer(metric=args.metric, hidden_weight=args.lambda_e, output_weight=args.lambda_e))
    if variant == "E+H":
        callbacks.append(HierarchicalRegularizer(metric=args.metric, weight=args.lambda_h))
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks, default_root_dir=args.root, num_sanity_val_steps=0,
                        limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=data)
        data.setup("validate")
        x, y = data.val_set.tensors[:2]
        model.eval()
        with torch.no_grad():
            pred = model(x).argmax(dim=1)
    return 100.0 * (pred == y).float().mean().item()


def fmt(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:6.2f}"
    return f"{statistics.mean(values):6.2f} ± {statistics.stdev(values):4.2f}"


def claim(args: argparse.Namespace) -> dict[str, list[float]]:
    variants = [v for v in VARIANTS if v in args.variants]
    acc: dict[str, list[float]] = {v: [] for v in variants}
    for seed in args.seeds:
        for v in variants:
            acc[v].append(run_one(v, seed, args))
    n_classes = args.num_super * args.classes_per_super
    print(f"DH2L claim: {args.num_super} super-classes x {args.classes_per_super} classes ({n_classes}), "
          f"dim {args.dim}, {args.train_per_class} train / {args.val_per_class} val per class, metric {args.metric}, "
          f"lambda_e={args.lambda_e}, lambda_h={args.lambda_h}, {args.epochs} epochs, seeds {list(args.seeds)}")
    print(f"{'variant':<11} {'val acc % (mean ± std)':<24} {'per seed':<28} diff to baseline (paired)")
    for v in variants:
        per_seed = " ".join(f"{a:6.2f}" for a in acc[v])
        diff = [a - b for a, b in zip(acc[v], acc["baseline"])] if "baseline" in acc else []
        print(f"{v:<11} {fmt(acc[v]):<24} {per_seed:<28} {fmt(diff) if v != 'baseline' and diff else ''}")
    return acc


def _interleaved(fn, base, reps: int, warmup: int = 3) -> tuple[float, float]:
    """Median seconds of ``fn`` and ``base``, timed alternately (fair on a shared machine)."""
    for _ in range(warmup):
        fn()
        base()
    t_fn, t_base = [], []
    for _ in range(reps):
        for f, acc in ((base, t_base), (fn, t_fn)):
            t0 = time.perf_counter()
            f()
            acc.append(time.perf_counter() - t0)
    return statistics.median(t_fn), statistics.median(t_base)


def timing(args: argparse.Namespace) -> dict[str, float]:
    """Regularizer step cost / head forward+backward on a 100-class, 20-super-class, 512-d head."""
    torch.manual_seed(0)
    classes, groups, d, batch = (20, 4, 64, 64) if args.smoke else (100, 20, 512, 256)
    head = HierarchicalLinear(d, hierarchy=[i * groups // classes for i in range(classes)])
    x = torch.randn(batch, d)
    y = torch.randint(0, classes, (batch,))

    def head_step() -> None:
        head.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(head(x), y).backward()

    def reg_step(metric: str, pairs: str) -> None:
        head.zero_grad(set_to_none=True)
        hierarchical_penalty(head.geometry(), y if pairs == "batch" else None, metric)["penalty"].backward()

    reps, warmup = (2, 1) if args.smoke else (100, 5)
    ratios = {}
    print(f"\nregularizer cost per step, {classes} classes / {groups} super-classes / {d}-d features, batch {batch} "
          f"({torch.get_num_threads()} CPU threads; each ratio timed interleaved with the head's forward+backward)")
    for metric in ("AMcos", "bin", "N-euclidean2"):
        for pairs in ("batch", "full"):
            t, t_head = _interleaved(lambda: reg_step(metric, pairs), head_step, reps, warmup)
            ratios[f"{metric}/{pairs}"] = t / t_head
            print(f"  H({metric:<12}, pairs={pairs:<5}): {1e3 * t:7.3f} ms  = {t / t_head:5.2f} x head fwd+bwd "
                  f"({1e3 * t_head:.3f} ms)")
    for metric in ("AMcos", "bin"):
        def e_step(metric: str = metric) -> None:
            head.zero_grad(set_to_none=True)
            metric_energy(head.weight, metric).backward()

        t, t_head = _interleaved(e_step, head_step, reps, warmup)
        ratios[f"E:{metric}"] = t / t_head
        print(f"  E({metric:<12}) on the head : {1e3 * t:7.3f} ms  = {t / t_head:5.2f} x head fwd+bwd "
              f"({1e3 * t_head:.3f} ms)")
    return ratios


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line options (``--smoke`` applied), also used by ``benchmarks/reproduce.py``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--metric", default="AMcos")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--num-super", type=int, default=5)
    p.add_argument("--classes-per-super", type=int, default=4)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--train-per-class", type=int, default=20)
    p.add_argument("--val-per-class", type=int, default=100)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--embedding", type=int, default=32)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--lambda-e", type=float, default=1.0)
    p.add_argument("--lambda-h", type=float, default=0.5)
    p.add_argument("--root", default="lightning_logs/dh2l_claims")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--smoke", action="store_true", help="one seed, one epoch, tiny data and timing")
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.epochs, args.num_super, args.classes_per_super = [0], 1, 2, 2
        args.train_per_class, args.val_per_class, args.dim, args.hidden, args.embedding = 4, 4, 8, 8, 8
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    claim(args)
    if not args.no_timing:
        timing(args)


if __name__ == "__main__":
    main()
