"""Forward+backward time of SphereConv2d / DecoupledConv2d divided by nn.Conv2d's (Performance II target: <= 1.6).

Shapes: a CIFAR ResNet-20 layer (batch 128, 64 -> 64 channels, 8x8, 3x3, padding 1) and a ResNet-18
layer (64 -> 64 channels, 56x56, 3x3, the conv2_x layer of ImageNet ResNet-18; batch 128 on GPU, 16 on
CPU by default to keep the run short). Each variant is timed side by side with the plain convolution
(same input, interleaved repetitions); each time is the minimum over the repetitions, the usual
estimator of the uncontended cost on a shared machine (``--stat median`` prints medians instead).

    python benchmarks/operator_speed.py            # full
    python benchmarks/operator_speed.py --threads 1 --reps 20   # one CPU thread (pin the process to one core)
    python benchmarks/operator_speed.py --smoke    # tiny shapes, a few repetitions (used by the tests)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from lightning_hyper.nn import DecoupledConv2d, SphereConv2d

VARIANTS = {
    "SphereConv2d(cosine)": lambda c: SphereConv2d(c, c, 3, padding=1, angle_fn="cosine"),
    "SphereConv2d(linear)": lambda c: SphereConv2d(c, c, 3, padding=1, angle_fn="linear"),
    "SphereConv2d(sigmoid)": lambda c: SphereConv2d(c, c, 3, padding=1, angle_fn="sigmoid"),
    "SphereConv2d(learnable)": lambda c: SphereConv2d(c, c, 3, padding=1, angle_fn="learnable"),
    "DecoupledConv2d(tanh,cosine)": lambda c: DecoupledConv2d(c, c, 3, padding=1, magnitude="tanh"),
    "DecoupledConv2d(ball,cosine)": lambda c: DecoupledConv2d(c, c, 3, padding=1, magnitude="ball"),
    "DecoupledConv2d(linear,sqcos)": lambda c: DecoupledConv2d(c, c, 3, padding=1, magnitude="linear",
                                                               angular="sqcos"),
    "DecoupledConv2d(seg,linear)": lambda c: DecoupledConv2d(c, c, 3, padding=1, magnitude="seg", angular="linear"),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step(layer: nn.Module, x: torch.Tensor) -> None:
    out = layer(x)
    out.backward(torch.ones_like(out))


def measure(layer: nn.Module, base: nn.Module, x: torch.Tensor, reps: int, warmup: int,
            stat: str = "min") -> tuple[float, float]:
    """Forward+backward seconds (min or median over ``reps``) of ``layer`` and ``base``, timed interleaved."""
    device = x.device
    for _ in range(warmup):
        _step(layer, x)
        _step(base, x)
    t_layer, t_base = [], []
    for _ in range(reps):
        for mod, acc in ((base, t_base), (layer, t_layer)):
            _sync(device)
            t0 = time.perf_counter()
            _step(mod, x)
            _sync(device)
            acc.append(time.perf_counter() - t0)
    agg = min if stat == "min" else statistics.median
    return agg(t_layer), agg(t_base)


def main(argv: list[str] | None = None) -> list[tuple[str, str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and few repetitions")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--r18-batch", type=int, default=None, help="batch of the ResNet-18 shape")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--stat", choices=("min", "median"), default="min")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.smoke:
        shapes = {"tiny (4, 8x6x6)": (4, 8, 6)}
        reps, warmup = args.reps or 2, 1
    else:
        r18_batch = args.r18_batch or (128 if device.type == "cuda" else 16)
        shapes = {
            "ResNet-20 layer (128, 64x8x8)": (128, 64, 8),
            f"ResNet-18 layer ({r18_batch}, 64x56x56)": (r18_batch, 64, 56),
        }
        reps, warmup = args.reps or (50 if device.type == "cuda" else 10), 3
    print(f"device={device} threads={torch.get_num_threads()} reps={reps} ({args.stat} forward+backward time)")
    results = []
    for shape_name, (b, c, s) in shapes.items():
        x = torch.randn(b, c, s, s, device=device, requires_grad=True)
        base = nn.Conv2d(c, c, 3, padding=1, bias=False).to(device)
        print(f"\n{shape_name}")
        print(f"  {'operator':32s} {'time ms':>9s} {'conv ms':>9s} {'ratio':>7s}")
        for name, make in VARIANTS.items():
            layer = make(c).to(device)
            t, t0 = measure(layer, base, x, reps, warmup, args.stat)
            ratio = t / t0
            results.append((shape_name, name, ratio))
            flag = "  (target <= 1.6)" if ratio <= 1.6 else "  (above the 1.6 target)"
            print(f"  {name:32s} {1e3 * t:9.2f} {1e3 * t0:9.2f} {ratio:7.2f}{flag}")
    return results


if __name__ == "__main__":
    main()
