"""Early convergence of SphereNet vs a plain CNN on the same budget (SphereNet thesis §3.4.2, Fig. 3.3).

Small-scale version of the claim "SphereNets converge faster than CNNs" (spherenet spec §9, T2):
scikit-learn digits (8x8, offline; DigitsDataModule's stratified 70/30 split), the same small
network for every operator -- 3x3 convs with 16 then 32 channels, 2x2 max-pool after each, an FC
layer of 64 units (the operator with kernel = remaining map, then BN) and a plain linear softmax
classifier -- Adam 1e-3, batch 64, BN momentum 0.1, He init. Test accuracy (BN in eval mode) at
fixed iteration counts, mean +- std over seeds. Rows with and without BN: the thesis always uses
BN; the spec predicts that a bounded SphereNet without BN and with a plain softmax converges
*slower* at this scale.

    python benchmarks/spherenet_convergence.py            # 3 seeds, 300 iterations (~2-4 min on 1 CPU thread)
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


def run(variant: str, seed: int, checkpoints: list[int], data) -> tuple[list[float], float]:
    """Train one model; return test accuracy at every checkpoint and the final training loss."""
    operator, op_kwargs, use_bn = VARIANTS[variant]
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    backbone = build_backbone(
        "spherenet_cnn", operator=operator, operator_kwargs=op_kwargs, widths=(16, 32), blocks_per_stage=1,
        in_channels=1, input_size=8, fc_features=64, use_bn=use_bn, bn_momentum=0.1,
    )
    model = nn.Sequential(backbone, nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    accs, step, loss_val = [], 0, float("nan")
    while step < checkpoints[-1]:
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
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
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--standardize", action="store_true", help="per-pixel standardized inputs")
    parser.add_argument("--variants", nargs="*", default=None, help=f"subset of {list(VARIANTS)}")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        seeds, checkpoints, variants = [0], SMOKE_CHECKPOINTS, ["plain CNN + BN", "SphereNet cosine + BN"]
    else:
        seeds, checkpoints, variants = list(range(args.seeds)), CHECKPOINTS, list(VARIANTS)
    if args.variants:
        unknown = sorted(set(args.variants) - set(VARIANTS))
        if unknown:
            parser.error(f"unknown variants {unknown}; accepted values: {list(VARIANTS)}")
        variants = args.variants
    data = load_digits(args.standardize)
    print(f"digits ({'standardized' if args.standardize else 'pixels in [0, 1]'}): {len(data[0])} train / "
          f"{len(data[2])} test; seeds {seeds}; test accuracy at iterations {checkpoints}")
    header = f"{'variant':30s} " + " ".join(f"{'it ' + str(c):>13s}" for c in checkpoints) + f" {'final loss':>13s}"
    print(header)
    results: dict[str, list[list[float]]] = {}
    t0 = time.time()
    for variant in variants:
        runs = [run(variant, s, checkpoints, data) for s in seeds]
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
