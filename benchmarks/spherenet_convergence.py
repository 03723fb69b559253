"""Early convergence of SphereNet vs a plain CNN on the same budget (SphereNet thesis §3.4.2, Fig. 3.3).

Small-scale version of the claim "SphereNets converge faster than CNNs" (spherenet spec §9, T2):
scikit-learn digits (8x8, offline; DigitsDataModule's stratified 70/30 split), the same small
network for every operator -- 3x3 convs with 16 then 32 channels, 2x2 max-pool after each, an FC
layer of 64 units (the operator with kernel = remaining map, then BN) and a plain linear softmax
classifier -- Adam 1e-3, batch 64, BN momentum 0.1, He init. Test accuracy (BN in eval mode) at
fixed iteration counts, mean +- std over seeds. Rows with and without BN: the thesis always uses
BN; the spec predicts that a bounded SphereNet without BN and with a plain softmax converges
*slower* at this scale. ``--optimizer sgd`` trains with SGD (momentum 0.9, lr 0.1: the thesis' SGD
setting, spec §6.3); ``--dataset mnist1d`` uses MNIST-1D and the same network in 1-D.

    python benchmarks/spherenet_convergence.py            # 3 seeds, 300 iterations (~2-4 min on 1 CPU thread)
    python benchmarks/spherenet_convergence.py --dataset mnist1d --optimizer sgd --checkpoints 100 500 1000 \
        --variants "plain CNN + BN" "SphereNet cosine + BN"
    python benchmarks/spherenet_convergence.py --smoke    # 1 seed, a few iterations (used by the tests)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from lightning_hyper.data import DigitsDataModule
from lightning_hyper.models.backbones import build_backbone

VARIANTS = {  # name -> (operator, operator_kwargs, use_bn)
    "plain CNN + BN": ("conv", None, True),
    "SphereNet cosine + BN": ("sphere", {"angle_fn": "cosine"}, True),
    "SphereNet linear + BN": ("sphere", {"angle_fn": "linear"}, True),
    "SphereNet sigmoid(0.3) + BN": ("sphere", {"angle_fn": "sigmoid", "k": 0.3}, True),
    "SphereNet learnable + BN": ("sphere", {"angle_fn": "learnable"}, True),
    "plain CNN, no BN": ("conv", None, False),
    "SphereNet cosine, no BN": ("sphere", {"angle_fn": "cosine"}, False),
}


#: iterations at which test accuracy is measured (full run / ``--smoke``)
CHECKPOINTS = [20, 50, 100, 200, 300]
SMOKE_CHECKPOINTS = [2, 5]


def load_digits(standardize: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits tensors; ``standardize``: per-pixel zero mean / unit std from the training split
    (constant pixels stay 0), as in the spec's runs; default: DigitsDataModule's [0, 1] pixels."""
    dm = DigitsDataModule(batch_size=64, val_fraction=0.3, seed=0)
    dm.setup("fit")
    xtr, ytr = dm.train_set.tensors
    xte, yte = dm.val_set.tensors
    if standardize:
        mean, std = xtr.mean(0, keepdim=True), xtr.std(0, keepdim=True)
        std = torch.where(std > 0, std, torch.ones_like(std))
        xtr, xte = (xtr - mean) / std, (xte - mean) / std
    return xtr, ytr, xte, yte


def load_mnist1d(num_samples: int = 5000, train_split: float = 0.8) -> tuple[torch.Tensor, ...]:
    """MNIST-1D tensors ``(B, 1, 40)`` (offline generation, see ``MNIST1DDataModule``)."""
    from lightning_hyper.data import MNIST1DDataModule

    dm = MNIST1DDataModule(num_samples=num_samples, train_split=train_split)
    dm.setup("fit")
    return (*dm.train_set.tensors, *dm.test_set.tensors)


def load_data(dataset: str = "digits", standardize: bool = False, num_samples: int = 5000,
              train_split: float = 0.8) -> tuple[torch.Tensor, ...]:
    if dataset == "digits":
        return load_digits(standardize)
    if dataset == "mnist1d":
        return load_mnist1d(num_samples, train_split)
    raise ValueError(f"dataset={dataset!r} is not supported; accepted values: ['digits', 'mnist1d']")


def run(variant: str, seed: int, checkpoints: list[int], data, optimizer: str = "adam", lr: float = 1e-3,
        momentum: float = 0.9, batch_size: int = 64, widths: tuple[int, ...] = (16, 32),
        fc_features: int = 64) -> tuple[list[float], float]:
    """Train one model; return test accuracy at every checkpoint and the final training loss.

    ``optimizer="adam"`` (the thesis' CIFAR setting, lr 1e-3) or ``"sgd"`` (momentum ``momentum``, the
    thesis' ImageNet setting: lr 0.1, momentum 0.9); no weight decay. The input shape (8x8 images or
    length-40 sequences) picks the 2-D or 1-D network."""
    operator, op_kwargs, use_bn = VARIANTS[variant]
    xtr, ytr, xte, yte = data
    dims = xtr.dim() - 2
    torch.manual_seed(seed)
    backbone = build_backbone(
        "spherenet_cnn", operator=operator, operator_kwargs=op_kwargs, widths=tuple(widths), blocks_per_stage=1,
        in_channels=xtr.shape[1], input_size=xtr.shape[-1], fc_features=fc_features, use_bn=use_bn, bn_momentum=0.1,
        dims=dims,
    )
    model = nn.Sequential(backbone, nn.Linear(fc_features, int(ytr.max()) + 1))
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    else:
        raise ValueError(f"optimizer={optimizer!r} is not supported; accepted values: ['adam', 'sgd']")
    gen = torch.Generator().manual_seed(seed)
    accs, step, loss_val = [], 0, float("nan")
    while step < checkpoints[-1]:
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            model.train()
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_val = float(loss.detach())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{variant} seed {seed}: non-finite loss at step {step}")
            step += 1
            if step in checkpoints:
                model.eval()
                with torch.no_grad():
                    accs.append(float((model(xte).argmax(1) == yte).float().mean()))
            if step >= checkpoints[-1]:
                break
    return accs, loss_val


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f}+-{statistics.stdev(values):.3f}"


def main(argv: list[str] | None = None) -> dict[str, list[list[float]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="1 seed, 2 variants, a few iterations")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed-list", type=int, nargs="+", default=None, help="explicit seeds (overrides --seeds)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--standardize", action="store_true", help="per-pixel standardized inputs")
    parser.add_argument("--variants", nargs="*", default=None, help=f"subset of {list(VARIANTS)}")
    parser.add_argument("--dataset", default="digits", choices=["digits", "mnist1d"])
    parser.add_argument("--num-samples", type=int, default=5000, help="MNIST-1D: generated sequences")
    parser.add_argument("--train-split", type=float, default=0.8, help="MNIST-1D: training share")
    parser.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-3 (adam), 0.1 (sgd)")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--fc-features", type=int, default=64)
    parser.add_argument("--checkpoints", type=int, nargs="+", default=None, help=f"default {CHECKPOINTS}")
    args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = 1e-3 if args.optimizer == "adam" else 0.1
    torch.set_num_threads(args.threads)
    if args.smoke:
        seeds, checkpoints, variants = [0], SMOKE_CHECKPOINTS, ["plain CNN + BN", "SphereNet cosine + BN"]
    else:
        seeds = args.seed_list or list(range(args.seeds))
        checkpoints, variants = sorted(args.checkpoints or CHECKPOINTS), list(VARIANTS)
    if args.variants:
        unknown = sorted(set(args.variants) - set(VARIANTS))
        if unknown:
            parser.error(f"unknown variants {unknown}; accepted values: {list(VARIANTS)}")
        variants = args.variants
    data = load_data(args.dataset, args.standardize, args.num_samples, args.train_split)
    print(f"{args.dataset}: {len(data[0])} train / {len(data[2])} test; {args.optimizer} lr {args.lr}"
          f"{f' momentum {args.momentum}' if args.optimizer == 'sgd' else ''}, batch {args.batch_size}; "
          f"seeds {seeds}; test accuracy at iterations {checkpoints}")
    header = f"{'variant':30s} " + " ".join(f"{'it ' + str(c):>13s}" for c in checkpoints) + f" {'final loss':>13s}"
    print(header)
    results: dict[str, list[list[float]]] = {}
    t0 = time.time()
    for variant in variants:
        runs = [run(variant, s, checkpoints, data, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
                     batch_size=args.batch_size, widths=tuple(args.widths), fc_features=args.fc_features)
                for s in seeds]
        per_ckpt = [[r[0][i] for r in runs] for i in range(len(checkpoints))]
        results[variant] = per_ckpt
        losses = [r[1] for r in runs]
        print(f"{variant:30s} " + " ".join(f"{_fmt(v):>13s}" for v in per_ckpt) + f" {_fmt(losses):>13s}", flush=True)
    if "plain CNN + BN" in results and "SphereNet cosine + BN" in results and not args.smoke:
        base = results["plain CNN + BN"]
        sph = results["SphereNet cosine + BN"]
        gaps = [statistics.mean(s) - statistics.mean(b) for s, b in zip(sph, base)]
        print("gap cosine SphereNet - plain CNN (with BN), mean accuracy: "
              + ", ".join(f"it {c}: {g:+.3f}" for c, g in zip(checkpoints, gaps)))
    print(f"({time.time() - t0:.0f} s)")
    return results


if __name__ == "__main__":
    main()
