"""White-box FGSM / BIM accuracy of a plain CNN vs DCNets on digits (DCNet thesis §4.6.2, Table 4.7).

Small-scale version of the claim "naturally trained bounded DCNets (SphereConv, BallConv, TanhConv)
are much more robust to white-box FGSM than the CNN, and none resists BIM" (dcnet spec §12, T14):

* data: scikit-learn digits (8x8, pixels in [0, 1]; DigitsDataModule's stratified 70/30 split);
* network (same for every operator, no BN, as the thesis' attack models): 3x3 convs 16-16, 2x2 max-pool,
  32-32, 2x2 max-pool, ReLU after every conv, linear softmax classifier; the DCNets use the cosine
  angular activation, learned radius with radius normalization (momentum 0.1), no optimization trick;
* training: Adam 1e-3, batch 64, 15 epochs, natural (no adversarial) training;
* attacks in pixel space, white-box (on the model itself): FGSM ``x + eps sign(grad_x CE)`` and BIM
  (20 steps of size eps/4, projected on the eps-ball and [0, 1]); eps = 0.125 (digits have only 17 gray
  levels, so the CIFAR budget 8/255 would be below one level).

Prints clean / FGSM / BIM test accuracy, mean +- std over seeds.

    python benchmarks/dcnet_robustness.py            # 3 seeds (~2-4 min on 1 CPU thread)
    python benchmarks/dcnet_robustness.py --smoke    # 1 seed, 1 epoch, 2 models (used by the tests)
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lightning_hyper.data import DigitsDataModule
from lightning_hyper.models.backbones import build_backbone

MODELS = {  # name -> (operator, operator_kwargs)
    "baseline CNN": ("conv", None),
    "SphereConv": ("decoupled", {"magnitude": "sphere"}),
    "BallConv": ("decoupled", {"magnitude": "ball", "radius_norm_momentum": 0.1}),
    "TanhConv": ("decoupled", {"magnitude": "tanh", "radius_norm_momentum": 0.1}),
}


def fgsm(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, eps: float,
         lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """Fast gradient sign method: one step ``eps * sign(grad_x CE)``, clipped to ``[lo, hi]``."""
    x_adv = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
    return (x + eps * grad.sign()).clamp(lo, hi).detach()


def bim(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, eps: float,
        step: float, iters: int = 20, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """Basic iterative method: ``iters`` FGSM steps of size ``step``, each projected onto the
    ``eps`` L-inf ball around ``x`` and the pixel range (no random start)."""
    x_adv = x.clone()
    for _ in range(iters):
        x_adv = fgsm(model, x_adv, y, step, lo, hi)
        x_adv = torch.max(torch.min(x_adv, x + eps), x - eps).clamp(lo, hi)
    return x_adv


def load_digits():
    dm = DigitsDataModule(batch_size=64, val_fraction=0.3, seed=0)
    dm.setup("fit")
    return (*dm.train_set.tensors, *dm.val_set.tensors)


def make_model(name: str) -> nn.Module:
    operator, kwargs = MODELS[name]
    backbone = build_backbone(
        "spherenet_cnn", operator=operator, operator_kwargs=kwargs, widths=(16, 32), blocks_per_stage=2,
        in_channels=1, input_size=8, fc_features=0, use_bn=False,
    )
    return nn.Sequential(backbone, nn.Linear(backbone.out_features, 10))


def train(name: str, seed: int, epochs: int, data) -> nn.Module:
    xtr, ytr = data[0], data[1]
    torch.manual_seed(seed)
    model = make_model(name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, bim_iters: int) -> dict[str, float]:
    acc = lambda xx: float((model(xx).argmax(1) == y).float().mean())  # noqa: E731
    with torch.no_grad():
        clean = acc(x)
    x_fgsm = fgsm(model, x, y, eps)
    x_bim = bim(model, x, y, eps, eps / 4, bim_iters)
    for adv in (x_fgsm, x_bim):  # hard invariants of the attacks
        assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        return {"clean": clean, "FGSM": acc(x_fgsm), "BIM": acc(x_bim)}


def _fmt(v: list[float]) -> str:
    return f"{100 * v[0]:.1f}" if len(v) == 1 else f"{100 * statistics.mean(v):.1f}+-{100 * statistics.stdev(v):.1f}"


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="1 seed, 1 epoch, 2 models, 2 BIM steps")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed-list", type=int, nargs="+", default=None, help="explicit seeds (overrides --seeds)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--eps", type=float, default=0.125)
    parser.add_argument("--bim-iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        seeds, epochs, names, iters = [0], 1, ["baseline CNN", "TanhConv"], 2
    else:
        seeds = args.seed_list or list(range(args.seeds))
        epochs, names, iters = args.epochs, list(MODELS), args.bim_iters
    data = load_digits()
    print(f"digits, eps={args.eps} (pixels in [0,1]), BIM {iters} steps of eps/4; {epochs} epochs; seeds {seeds}")
    print(f"{'model':14s} {'clean %':>12s} {'FGSM %':>12s} {'BIM %':>12s}")
    results: dict[str, dict[str, list[float]]] = {}
    t0 = time.time()
    for name in names:
        runs = [evaluate(train(name, s, epochs, data), data[2], data[3], args.eps, iters) for s in seeds]
        results[name] = {k: [r[k] for r in runs] for k in ("clean", "FGSM", "BIM")}
        r = results[name]
        print(f"{name:14s} {_fmt(r['clean']):>12s} {_fmt(r['FGSM']):>12s} {_fmt(r['BIM']):>12s}", flush=True)
    print(f"({time.time() - t0:.0f} s)")
    return results


if __name__ == "__main__":
    main()
