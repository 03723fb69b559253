"""Every custom autograd function on CUDA against CPU float64, then the performance ratios on the GPU.

    python benchmarks/gpu_check.py            # skips cleanly (exit 0) without CUDA
    python benchmarks/gpu_check.py --json out.json

Part 1 (correctness): value and gradient of each hand-written forward/backward -- the Gram energy (one
block, tiles, chunked, wide layers' raw-row Gram; full and half space, euclidean and angular), the compressive energy,
the margin functions and the Caffe A-Softmax backward, the SphereConv / decoupled operators, the
orthogonal maps (Löwdin's polar-factor backward, Cayley, Householder) -- computed on CUDA in float32 and
compared with the same call on CPU in float64. Part 2 (speed): the ratios of docs/performance.md, measured
side by side on the GPU (CUDA events, median of repeats). Never part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lightning_hyper.functional import compressive_energy, hyperspherical_energy, psi
from lightning_hyper.functional.orthogonal import cayley, householder, lowdin
from lightning_hyper.nn import ASoftmaxHead, DecoupledConv2d, SphereConv2d

Case = tuple[str, Callable[[torch.Tensor], torch.Tensor], tuple[int, ...], float]


def correctness_cases() -> list[Case]:
    """(name, fn(x) -> scalar, input shape, float32 tolerance relative to the float64 reference)."""
    cases: list[Case] = []
    for n in (64, 600):  # one full Gram / stored triangular blocks
        for half in (False, True):
            for metric in ("euclidean", "angular"):
                cases.append((f"energy n={n} {metric} half={half}",
                              lambda x, h=half, m=metric: hyperspherical_energy(x, s=2.0, metric=m, half_space=h),
                              (n, 32), 2e-4))
    cases.append(("energy chunked", lambda x: hyperspherical_energy(x, s=1.0, chunk_size=50), (300, 32), 2e-4))
    for shape in ((40, 64), (300, 400), (3, 40, 64)):  # wide layers: the raw-row Gram (split from 128 rows)
        for half in (False, True):
            cases.append((f"energy wide {shape} half={half}",
                          lambda x, h=half: hyperspherical_energy(x, s=2.0, half_space=h).sum(), shape, 2e-4))
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(5, 8, 32, generator=g, dtype=torch.float64)
    cases.append(("compressive energy", lambda x: compressive_energy(x, proj.to(x)), (200, 32), 2e-4))
    cases.append(("psi m=4", lambda x: psi(torch.tanh(x), 4).sum(), (64, 16), 1e-4))
    cases.append(("sphere conv", lambda x: _conv(SphereConv2d, x, angle_fn="sigmoid", k=0.3), (2, 3, 8, 8), 1e-4))
    cases.append(("decoupled conv", lambda x: _conv(DecoupledConv2d, x, magnitude="tanh", angular="cosine"),
                  (2, 3, 8, 8), 1e-4))
    cases.append(("a-softmax caffe backward", _asoftmax, (16, 8), 1e-4))
    cases.append(("lowdin", lambda x: (lowdin(x) * _ramp(x)).sum(), (16, 16), 1e-4))
    cases.append(("cayley", lambda x: (cayley(0.1 * x) @ torch.ones_like(x)).sum(), (16, 16), 1e-4))
    cases.append(("householder", lambda x: (householder(x) * _ramp(x)).sum(), (12, 12), 1e-4))
    return cases


def _ramp(x: torch.Tensor) -> torch.Tensor:
    """Fixed weights 0..1 of x's shape: an objective that is not invariant under the map's symmetries."""
    return torch.linspace(0, 1, x.numel(), dtype=x.dtype, device=x.device).view_as(x)


def _conv(cls, x: torch.Tensor, **kw) -> torch.Tensor:
    torch.manual_seed(0)
    layer = cls(3, 4, 3, padding=1, **kw).to(x.device, x.dtype)
    w = torch.linspace(-1, 1, layer.weight.numel(), dtype=x.dtype, device=x.device).view_as(layer.weight)
    with torch.no_grad():
        layer.weight.copy_(w)
    return (layer(x) * torch.linspace(0, 1, 2 * 4 * 8 * 8, dtype=x.dtype, device=x.device).view(2, 4, 8, 8)).sum()


def _asoftmax(x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)
    head = ASoftmaxHead(8, 5, m=4, gradient_mode="caffe_normalized", weight_norm_mode="project").to(x.device, x.dtype)
    labels = torch.arange(x.shape[0], device=x.device) % 5
    return F.cross_entropy(head(x, labels), labels)


def check_correctness(device: str) -> list[dict]:
    rows = []
    for name, fn, shape, tol in correctness_cases():
        base = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        ref_x = base.clone().requires_grad_()
        ref = fn(ref_x)
        (ref_g,) = torch.autograd.grad(ref, ref_x)
        x = base.to(device=device, dtype=torch.float32).requires_grad_()
        out = fn(x)
        (grad,) = torch.autograd.grad(out, x)
        value_err = abs(out.item() - ref.item()) / max(abs(ref.item()), 1e-12)
        grad_err = float((grad.double().cpu() - ref_g).norm() / ref_g.norm().clamp_min(1e-12))
        ok = value_err <= tol and grad_err <= 10 * tol
        rows.append({"case": name, "value_rel_err": value_err, "grad_rel_err": grad_err, "ok": ok})
        print(f"{name:32s} value {value_err:9.2e}  grad {grad_err:9.2e}  {'ok' if ok else 'FAIL'}", flush=True)
    return rows


def _cuda_time(fn: Callable[[], None], reps: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def speed_ratios(device: str) -> list[dict]:
    """The ratios of docs/performance.md on the GPU, each against its named floor, side by side."""
    rows = []

    def backward_of(f, *ts):
        def run():
            for t in ts:
                t.grad = None
            f().backward()
        return run

    for n, d in ((64, 576), (512, 4608), (4096, 512), (2048, 2048)):
        w = torch.randn(n, d, device=device, requires_grad=True)
        floor = _cuda_time(backward_of(lambda: (w @ w.T).sum(), w))
        ours = _cuda_time(backward_of(lambda: hyperspherical_energy(w), w))
        rows.append({"what": f"energy fwd+bwd / (W Wᵀ).sum() fwd+bwd, ({n}, {d})", "ratio": ours / floor})
    w = torch.randn(4096, 512, device=device, requires_grad=True)
    p = torch.randn(5, 30, 512, device=device)
    hs = _cuda_time(backward_of(lambda: hyperspherical_energy(w, half_space=True), w))
    co = _cuda_time(backward_of(lambda: compressive_energy(w, p), w))
    rows.append({"what": "compressive_energy (5 x 30-d) / half-space MHE, (4096, 512)", "ratio": co / hs})
    x = torch.randn(256, 512, device=device, requires_grad=True)
    y = torch.randint(0, 10000, (256,), device=device)
    head = ASoftmaxHead(512, 10000, m=4).to(device)
    lin = torch.nn.Linear(512, 10000, bias=False).to(device)
    t_head = _cuda_time(backward_of(lambda: F.cross_entropy(head(x, y), y), x))
    t_lin = _cuda_time(backward_of(lambda: F.cross_entropy(lin(x), y), x))
    rows.append({"what": "ASoftmaxHead + CE / Linear + CE (256 x 512 -> 10000)", "ratio": t_head / t_lin})
    xi = torch.randn(16, 64, 56, 56, device=device, requires_grad=True)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(device)
    t_conv = _cuda_time(backward_of(lambda: conv(xi).sum(), xi))
    for name, layer in (("SphereConv2d", SphereConv2d(64, 64, 3, padding=1)),
                        ("DecoupledConv2d", DecoupledConv2d(64, 64, 3, padding=1, magnitude="tanh",
                                                            angular="cosine"))):
        layer = layer.to(device)
        rows.append({"what": f"{name} / nn.Conv2d (16 x 64 x 56 x 56)",
                     "ratio": _cuda_time(backward_of(lambda: layer(xi).sum(), xi)) / t_conv})
    for r in rows:
        print(f"{r['what']:70s} {r['ratio']:6.2f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (run it on a machine with a GPU)")
        return 0
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    correctness = check_correctness("cuda")
    speed = speed_ratios("cuda")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "correctness": correctness, "speed": speed}, f, indent=1)
    return 0 if all(r["ok"] for r in correctness) else 1


if __name__ == "__main__":
    sys.exit(main())
