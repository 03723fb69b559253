"""CoMHE small-scale claim: baseline vs MHE vs HS-MHE vs CoMHE on MNIST-1D (3 seeds, mean ± std).

The thesis (Ch. 6, Tables 6.1 and 6.5; CNN-9 on CIFAR-100) reports test error baseline > MHE >
HS-MHE > CoMHE (random and angle-preserving projections), and (Fig. 6.2 / E.6) that CoMHE reaches
the lowest hyperspherical energy. This script checks the direction of both at CPU scale on MNIST-1D
(generated offline) with a 1-D analogue of the ablation CNN (``cnn1d``: 3 stages of
``--blocks-per-stage`` convs, widths ``--widths`` (default 32/64/128), kernel 5, BN + ReLU, FC-128, bias-free
linear head; ``--num-samples`` / ``--train-split`` size the generated data):

* ``baseline``   weight decay only;
* ``mhe``        ``MHERegularizer()`` (full-space MHE, λ_h = 10 as in the thesis D.1);
* ``hs_mhe``     ``MHERegularizer(half_space=True)`` (λ_h = 1), the base of every CoMHE variant;
* ``comhe_rp``   ``CoMHERegularizer(projection="random")`` (projection_dim 30, C = 5, redrawn every step);
* ``comhe_ap``   ``CoMHERegularizer(projection="angle_preserving")`` (C = 1, unrolled, lr tied);
* optional ``comhe_adv``, ``comhe_group`` (``--variants``).

All regularized variants use the same output-layer weight (``--output-weight``, full-space MHE on the
classifier). Every variant of one seed starts from the same initialization and sees the same batches.
Printed per variant: test error (%) per seed and mean ± std (sample std over seeds), and the final
energy of the original neurons summed over hidden layers (half-space, s = 2; the same metric for all).

Second part (``--speed``): forward+backward time of the RP-CoMHE penalty (spec defaults: projection_dim
30, C = 5, half-space) divided by full-space MHE and by HS-MHE on one layer of shape (N, D) = (512, 4608)
and (4096, 512), median of interleaved repetitions. Third part (``--overhead``): training-step time of
ResNet-18 (32x32 inputs, batch 64) with RP-CoMHE (defaults) or HS-MHE on every conv/linear layer,
divided by the step without a regularizer (issue target <= 1.10; on a CPU the convolutions dominate,
so the ratio there understates a GPU's).

    python benchmarks/comhe_claims.py                       # 3 seeds, 15 epochs (~10 min on 1 CPU thread)
    python benchmarks/comhe_claims.py --variants baseline comhe_rp --seeds 0 1 2 3 4
    python benchmarks/comhe_claims.py --speed               # penalty cost ratios only
    python benchmarks/comhe_claims.py --overhead            # ResNet-18 step time with / without (CPU)
    python benchmarks/comhe_claims.py --smoke               # tiny, used by the tests
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import lightning as L
import torch

from lightning_hyper.callbacks import CoMHERegularizer, MHERegularizer
from lightning_hyper.callbacks.base import LayerSelection
from lightning_hyper.data import MNIST1DDataModule
from lightning_hyper.functional import compressive_energy, hyperspherical_energy, random_projections
from lightning_hyper.models import HypersphericalClassifier

VARIANTS = ("baseline", "mhe", "hs_mhe", "comhe_rp", "comhe_ap", "comhe_adv", "comhe_group")
DEFAULT_VARIANTS = ("baseline", "mhe", "hs_mhe", "comhe_rp", "comhe_ap")


def make_callbacks(variant: str, args: argparse.Namespace) -> list:
    ow = args.output_weight
    if variant == "baseline":
        return []
    if variant == "mhe":
        return [MHERegularizer(output_weight=ow)]
    if variant == "hs_mhe":
        return [MHERegularizer(half_space=True, output_weight=ow)]
    projection = {"comhe_rp": "random", "comhe_ap": "angle_preserving", "comhe_adv": "adversarial",
                  "comhe_group": "group"}[variant]
    return [CoMHERegularizer(projection=projection, output_weight=ow, full_energy_every=0, seed=args.seed_offset)]


def hidden_energy(model: torch.nn.Module) -> float:
    """Sum over hidden layers of the half-space s=2 energy of the original neurons."""
    total = 0.0
    for ref in LayerSelection().resolve(model):
        if ref.role == "hidden":
            total += float(hyperspherical_energy(ref.neurons().detach(), half_space=True))
    return total


def run_one(variant: str, seed: int, args: argparse.Namespace) -> tuple[float, float]:
    """(test error %, final hidden-layer energy) of one variant trained with one seed."""
    data = MNIST1DDataModule(batch_size=args.batch_size, num_samples=args.num_samples, train_split=args.train_split)
    L.seed_everything(seed, verbose=False)
    model = HypersphericalClassifier(
        backbone="cnn1d", num_classes=10,
        backbone_kwargs={"blocks_per_stage": args.blocks_per_stage, "widths": list(args.widths), "kernel_size": 5},
        head="linear", head_kwargs={"bias": False},
        optimizer="sgd", lr=args.lr, momentum=0.9, weight_decay=args.weight_decay, scheduler="cosine",
    )
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=make_callbacks(variant, args), default_root_dir=root, num_sanity_val_steps=0,
                            limit_train_batches=args.limit_train_batches, check_val_every_n_epoch=args.epochs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, datamodule=data)
            out = trainer.test(model, datamodule=data, verbose=False)
    return 100.0 * (1.0 - out[0]["test/acc"]), hidden_energy(model)


def fmt(values: list[float], digits: int = 2) -> str:
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def claim(args: argparse.Namespace) -> dict[str, tuple[list[float], list[float]]]:
    results: dict[str, tuple[list[float], list[float]]] = {}
    for variant in args.variants:
        errs, energies = [], []
        for seed in args.seeds:
            t0 = time.perf_counter()
            err, energy = run_one(variant, seed, args)
            errs.append(err)
            energies.append(energy)
            print(f"  {variant:<12} seed {seed}: test error {err:6.2f} %  hidden energy {energy:.4f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        results[variant] = (errs, energies)
    print(f"\nMNIST-1D ({args.num_samples} sequences, train share {args.train_split}), cnn1d "
          f"{'/'.join(map(str, args.widths))} x{args.blocks_per_stage} per stage, {args.epochs} epochs, "
          f"seeds {list(args.seeds)}")
    print(f"{'variant':<12} {'test error (%)':>18} {'hidden energy (HS, s=2)':>26}")
    for variant, (errs, energies) in results.items():
        print(f"{variant:<12} {fmt(errs):>18} {fmt(energies, 4):>26}")
    return results


# ---------------------------------------------------------------------------------------- speed
def _time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed(args: argparse.Namespace) -> None:
    shapes = [(64, 576), (128, 1152)] if args.smoke else [(512, 4608), (4096, 512)]
    reps = 2 if args.smoke else args.reps
    gen = torch.Generator().manual_seed(0)
    print("\npenalty forward+backward time on one layer (median of interleaved repetitions, CPU)")
    print(f"{'(N, D)':>14} {'RP-CoMHE ms':>12} {'MHE ms':>9} {'HS-MHE ms':>10} {'RP/MHE':>8} {'RP/HS-MHE':>10} "
          f"{'target':>8}")
    for n, d in shapes:
        w = torch.randn(n, d, generator=gen).requires_grad_(True)

        def rp():
            # spec defaults: a fresh draw every step (part of the cost), 30 rows, C = 5, half-space
            p = random_projections(5, 30, d, generator=gen)
            compressive_energy(w, p).backward()

        def mhe():
            hyperspherical_energy(w).backward()

        def hs():
            hyperspherical_energy(w, half_space=True).backward()

        for fn in (rp, mhe, hs):  # warm-up
            fn()
        t_rp, t_mhe, t_hs = [], [], []
        for _ in range(reps):
            for fn, acc in ((rp, t_rp), (mhe, t_mhe), (hs, t_hs)):
                acc.append(_time(fn, 1))
        a, b, c = (statistics.median(t) for t in (t_rp, t_mhe, t_hs))
        print(f"{str((n, d)):>14} {1e3 * a:12.1f} {1e3 * b:9.1f} {1e3 * c:10.1f} {a / b:8.2f} {a / c:10.2f} "
              f"{'<= 1.0':>8}")


def overhead(args: argparse.Namespace) -> None:
    """Training-step time of ResNet-18 (32x32, batch ``--overhead-batch``) with a regularizer / without."""
    from torch import nn

    from lightning_hyper.models.backbones import build_backbone

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("backbone", build_backbone("resnet18", in_channels=3))
    model.add_module("head", nn.Linear(model.backbone.out_features, 10))
    batch = args.overhead_batch
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    regs = {"none": None, "HS-MHE": MHERegularizer(half_space=True), "RP-CoMHE": CoMHERegularizer(full_energy_every=0)}
    for cb in regs.values():
        if cb is not None:
            cb.layers = cb.selection.resolve(model)
    step = [0]

    def train_step(cb) -> None:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if cb is not None:  # the callback's per-layer terms at a new global step (fresh projections)
            loss = loss + sum(t["penalty"] for t in (cb.layer_terms(ref, None, step[0]) for ref in cb.layers) if t)
        loss.backward()
        opt.step()
        step[0] += 1

    reps = args.reps
    for cb in regs.values():
        train_step(cb)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in regs}
    for _ in range(reps):
        for name, cb in regs.items():
            times[name].append(_time(lambda: train_step(cb), 1))
    base = statistics.median(times["none"])
    print(f"\nResNet-18 training step, 32x32, batch {batch}, CPU ({torch.get_num_threads()} threads), median of {reps}")
    for name, ts in times.items():
        print(f"  {name:<9} {1e3 * statistics.median(ts):9.1f} ms   ratio to none {statistics.median(ts) / base:.3f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line options (``--smoke`` applied), also used by ``benchmarks/reproduce.py``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--blocks-per-stage", type=int, default=3, help="3 = CNN-9 analogue, 1 = CNN-3")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-samples", type=int, default=5000, help="generated MNIST-1D sequences (train + test)")
    parser.add_argument("--train-split", type=float, default=0.8, help="training share of the generated sequences")
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128], help="channels of the 3 stages")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--output-weight", type=float, default=1.0)
    parser.add_argument("--seed-offset", type=int, default=0, help="seed of the CoMHE projections")
    parser.add_argument("--limit-train-batches", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--speed", action="store_true", help="only the penalty cost ratios")
    parser.add_argument("--overhead", action="store_true", help="only the ResNet-18 training-step overhead")
    parser.add_argument("--overhead-batch", type=int, default=64)
    parser.add_argument("--smoke", action="store_true", help="tiny run (1 seed, 1 epoch, 3 batches, 2 variants)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.variants, args.seeds, args.epochs = ["baseline", "comhe_rp"], [0], 1
        args.num_samples, args.limit_train_batches, args.blocks_per_stage = 400, 3, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not (args.speed or args.overhead):
        claim(args)
    if args.speed or args.smoke:
        speed(args)
    if args.overhead:
        overhead(args)


if __name__ == "__main__":
    main()
