"""Training-step overhead of MHE on every conv/linear layer of a ResNet-18 (32×32 inputs, batch 64).

Prints, measured side by side in one run on the same model and batch:
  * with MHERegularizer / without  (target <= 1.05)
  * with a naive per-layer autograd energy / without (what a direct implementation costs)
  * the floor: without + the penalty's unavoidable GEMMs timed alone (half of each Gram matrix and the gradient's
    N×N by N×d product), over without: what no exact per-step energy can beat on this machine

    python benchmarks/train_overhead.py [--steps 5] [--batch 64] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from lightning_hyper.callbacks import MHERegularizer
from lightning_hyper.functional import as_neurons
from lightning_hyper.models.backbones import build_backbone


def naive_energy(w: torch.Tensor, s: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    u = w / w.norm(dim=1, keepdim=True)
    n = w.shape[0]
    mask = ~torch.eye(n, dtype=torch.bool, device=w.device)
    r2 = (2 - 2 * (u @ u.T)).clamp_min(0) + eps
    return (r2.pow(-s / 2) * mask).sum() / (n * (n - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("backbone", build_backbone("resnet18", in_channels=3))
    model.add_module("head", nn.Linear(model.backbone.out_features, 10))
    model.to(args.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch, 3, 32, 32, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    mhe = MHERegularizer(s=2.0, output_layer="head")
    mhe.layers = mhe.selection.resolve(model)
    layers = [(ref.module, ref.role) for ref in mhe.layers]

    def penalty_ours() -> torch.Tensor:
        return mhe.penalty(model, log=False)

    def penalty_naive() -> torch.Tensor:
        return sum((10.0 if role == "hidden" else 1.0) * naive_energy(as_neurons(m)) for m, role in layers)

    def step(extra) -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        if extra is not None:
            loss = loss + extra()
        loss.backward()
        opt.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    rows = [as_neurons(m).detach().contiguous() for m, _ in layers]
    slopes = [torch.randn(w.shape[0], w.shape[0], device=w.device) for w in rows]

    def gemm_floor() -> float:
        """The penalty's unavoidable GEMMs, timed alone: half of each layer's Gram matrix (its symmetric half; the
        full GEMM timed and halved) and the gradient's ``M x`` (N²d each: dE/dx_i sums over all j)."""
        half = sum(_timed_gemm(lambda w=w: w @ w.T) for w in rows) / 2
        grad = sum(_timed_gemm(lambda w=w, m=m: m @ w) for w, m in zip(rows, slopes))
        return half + grad

    def _timed_gemm(fn) -> float:
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    variants = {"plain": None, "mhe": penalty_ours, "naive": penalty_naive}
    for fn in variants.values():  # warm-up
        step(fn)
    times = {k: [] for k in variants}
    for _ in range(args.steps):  # interleave so background load hits all variants alike
        for k, fn in variants.items():
            times[k].append(step(fn))
    floor = statistics.median(gemm_floor() for _ in range(max(args.steps, 3)))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device={args.device} threads={torch.get_num_threads()} layers with MHE={len(layers)} "
          f"batch={args.batch} steps={args.steps}")
    for k in variants:
        print(f"  {k:>6}: {med[k] * 1e3:8.1f} ms/step")
    print(f"ratio MHE/plain   = {med['mhe'] / med['plain']:.3f}  (target <= 1.05)")
    print(f"ratio naive/plain = {med['naive'] / med['plain']:.3f}")
    print(f"floor: (plain + the penalty's GEMMs alone, {floor * 1e3:.1f} ms) / plain = "
          f"{(med['plain'] + floor) / med['plain']:.3f}  (no exact per-step energy can be cheaper)")


if __name__ == "__main__":
    main()
