"""Speed and memory of ``hyperspherical_energy`` measured side by side with a plain GEMM.

For each (N, d) it prints, measured in the same run on the same W:
  * ours / gemm : time of energy forward+backward divided by the time of ``(W @ W.T).sum().backward()``
  * naive / gemm: the same for a naive autograd implementation (normalize, full Gram, masked pow)
and, in a fresh subprocess, the peak resident memory added by one energy forward+backward at N=20000
(the naive implementation's too, unless --skip-naive-memory).

    python benchmarks/energy_speed.py            # all shapes
    python benchmarks/energy_speed.py --quick    # small shapes only (smoke)
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time

import torch

from lightning_hyper.functional import hyperspherical_energy

SHAPES = [(64, 576), (512, 4608), (4096, 512), (2048, 2048), (20000, 512)]


def naive_energy(w: torch.Tensor, s: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """What one writes without care: full N×N matrices through autograd, mask after the kernel."""
    u = w / w.norm(dim=1, keepdim=True)
    g = u @ u.T
    n = w.shape[0]
    mask = ~torch.eye(n, dtype=torch.bool, device=w.device)
    r2 = (2 - 2 * g).clamp_min(0) + eps
    return (r2.pow(-s / 2) * mask).sum() / (n * (n - 1))


def gemm_reference(w: torch.Tensor) -> torch.Tensor:
    return (w @ w.T).sum()


def timed(fn, w: torch.Tensor, reps: int) -> float:
    times = []
    for _ in range(reps + 1):  # first call warms up
        w.grad = None
        t0 = time.perf_counter()
        fn(w).backward()
        if w.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _status_bytes(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process from /proc/self/status, in bytes (``ru_maxrss`` cannot be reset)."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def memory_child(kind: str, n: int, d: int, device: str) -> None:
    w = torch.randn(n, d, device=device, requires_grad=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:  # reset the resident high-water mark so the imports' own peak does not hide ours (Linux)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_bytes("VmRSS")
    fn = {"ours": hyperspherical_energy, "naive": naive_energy, "gemm": gemm_reference}[kind]
    fn(w).backward()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_bytes("VmHWM") - base
    print(json.dumps({"peak_bytes": peak}))


def peak_memory(kind: str, n: int, d: int, device: str) -> float:
    out = subprocess.run([sys.executable, __file__, "--memory-child", kind, str(n), str(d), device],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"] / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the two smallest shapes, no memory run")
    parser.add_argument("--skip-naive-memory", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        kind, n, d, device = args.memory_child
        memory_child(kind, int(n), int(d), device)
        return
    shapes = SHAPES[:2] if args.quick else SHAPES
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'N':>6} {'d':>5} {'gemm ms':>9} {'ours ms':>9} {'naive ms':>9} {'ours/gemm':>10} {'naive/gemm':>11} "
          f"{'target':>7}")
    for n, d in shapes:
        torch.manual_seed(0)
        w = torch.randn(n, d, device=args.device, requires_grad=True)
        # small shapes: many repetitions (a fixed overhead of microseconds is what is measured there); all three
        # timed in alternating rounds so that background load drifts hit them alike
        reps = 200 if n * n * d < 1e7 else (5 if n * n * d < 5e9 else 2)
        rounds = 5 if n * n * d < 1e7 else 1
        acc: dict[str, list[float]] = {"gemm": [], "ours": [], "naive": []}
        for _ in range(rounds):
            for key, fn in (("gemm", gemm_reference), ("ours", hyperspherical_energy), ("naive", naive_energy)):
                acc[key].append(timed(fn, w, reps))
        t_gemm, t_ours, t_naive = (statistics.median(acc[k]) for k in ("gemm", "ours", "naive"))
        target = 1.2 if n * d < 100_000 else 0.6  # fixed overhead dominates the small shape
        print(f"{n:>6} {d:>5} {t_gemm * 1e3:9.1f} {t_ours * 1e3:9.1f} {t_naive * 1e3:9.1f} "
              f"{t_ours / t_gemm:10.2f} {t_naive / t_gemm:11.2f} {'<= ' + str(target):>7}", flush=True)
    if not args.quick:
        n, d = 20000, 512
        kinds = ["gemm", "ours"] + ([] if args.skip_naive_memory else ["naive"])
        report = {k: peak_memory(k, n, d, args.device) for k in kinds}
        print(f"peak memory added by forward+backward at N={n}, d={d} (an N×N×d float32 tensor would be "
              f"{n * n * d * 4 / 2**30:.0f} GiB; one N×N matrix is {n * n * 4 / 2**30:.2f} GiB):")
        for k, v in report.items():
            print(f"  {k:>6}: {v:6.2f} GiB")


if __name__ == "__main__":
    main()
