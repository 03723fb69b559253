"""Memory bound of ``hyperspherical_energy`` at scale (issue 8, guarantee 6).

Runs the energy of N neurons of dimension d (default N = 50 000, d = 512, float32) forward only and
forward + backward, each in a fresh subprocess so that peaks do not mix, and prints the wall time
and the peak memory next to what the naive computations would need:

* a full N x N Gram matrix:          N^2 * 4 bytes     (10 GB at N = 50 000)
* the naive N x N x d difference:    N^2 * d * 4 bytes (5.1 TB at N = 50 000, d = 512)

Peak memory is the kernel's high-water mark of resident memory (``VmHWM`` in /proc/self/status,
reset through ``/proc/self/clear_refs`` just before the energy call; ``resource.getrusage(RUSAGE_SELF)
.ru_maxrss``, which also counts the imports' peak, is reported too), in total and above the resident
size just before the call (after ``import torch`` and the N x d input exist).
tracemalloc is not used: it does not see torch's CPU allocations. On CUDA (``--device cuda``) the
peak is ``torch.cuda.max_memory_allocated``.

    python benchmarks/energy_memory.py                          # N=50000, d=512, both modes
    python benchmarks/energy_memory.py --n 20000 --chunk-size 256 --modes forward
    nice python benchmarks/energy_memory.py --json out.json     # also write the results as JSON
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

MODES = ("forward", "forward+backward")


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    except OSError:  # pragma: no cover - non-Linux
        return None
    return int(match.group(1)) * 1024 if match else None


def worker(n: int, d: int, chunk_size: int | None, mode: str, dtype: str, threads: int, device: str,
           seed: int) -> dict:
    """One measurement (run in a fresh process by :func:`measure`)."""
    import torch

    from lightning_hyper.functional import hyperspherical_energy
    from lightning_hyper.functional.energy import tile_rows

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=gen, dtype=getattr(torch, dtype)).to(device)
    w.requires_grad_(mode == "forward+backward")
    rows = tile_rows(n, chunk_size, 1, torch.device(device))  # the Gram tile (tall layers: N > d)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        try:  # reset the high-water mark to the current resident size (Linux >= 4.0), so import peaks do not count
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:  # pragma: no cover - then the peak may include the imports' own peak
            pass
        base = _status_bytes("VmRSS") or 0
    t0 = time.perf_counter()
    if mode == "forward":
        with torch.no_grad():
            energy = hyperspherical_energy(w, chunk_size=chunk_size)
    else:
        energy = hyperspherical_energy(w, chunk_size=chunk_size)
        energy.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if device == "cuda":
        peak_total = torch.cuda.max_memory_allocated()
    else:
        peak_total = _status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {
        "n": n, "d": d, "mode": mode, "dtype": dtype, "device": device, "threads": threads,
        "chunk_rows": min(rows, n), "seconds": seconds, "energy": float(energy),
        "baseline_bytes": base, "peak_bytes": peak_total, "peak_above_baseline_bytes": peak_total - base,
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "input_bytes": w.numel() * w.element_size(),
    }
    if mode == "forward+backward":
        out["grad_finite"] = bool(torch.isfinite(w.grad).all())
        out["grad_norm"] = float(w.grad.norm())
    return out


def measure(n: int, d: int, chunk_size: int | None, mode: str, dtype: str = "float32", threads: int = 2,
            device: str = "cpu", seed: int = 0, timeout: float | None = None) -> dict:
    """Run :func:`worker` in a fresh Python process and return its result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--n", str(n), "--d", str(d),
           "--modes", mode, "--dtype", dtype, "--threads", str(threads), "--device", device, "--seed", str(seed)]
    if chunk_size is not None:
        cmd += ["--chunk-size", str(chunk_size)]
    repo = str(Path(__file__).resolve().parents[1])  # importable without an install, too
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"energy_memory worker failed ({mode}, N={n}, d={d}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt_bytes(b: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(b) >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{b:.0f} B"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000, help="number of neurons N")
    parser.add_argument("--d", type=int, default=512, help="neuron dimension d")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="rows of a square Gram tile (default: the library's, cache-sized on CPU)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.n < 1 or args.d < 1 or (args.chunk_size is not None and args.chunk_size < 1):
        parser.error("--n, --d and --chunk-size must be positive integers")
    if args.worker:
        result = worker(args.n, args.d, args.chunk_size, args.modes[0], args.dtype, args.threads, args.device,
                        args.seed)
        print(json.dumps(result), flush=True)
        return [result]

    n, d = args.n, args.d
    item = 8 if args.dtype == "float64" else 4
    gram, naive = n * n * item, n * n * d * item
    print(f"hyperspherical_energy, N={n}, d={d}, {args.dtype}, device={args.device}, threads={args.threads}, "
          f"chunk_size={args.chunk_size if args.chunk_size is not None else 'default'}")
    print(f"  input N x d: {_fmt_bytes(n * d * item)}; a full N x N Gram would need {_fmt_bytes(gram)}; "
          f"the naive N x N x d tensor {_fmt_bytes(naive)}", flush=True)
    results = []
    for mode in args.modes:
        r = measure(n, d, args.chunk_size, mode, args.dtype, args.threads, args.device, args.seed)
        r["gram_bytes"], r["naive_bytes"] = gram, naive
        results.append(r)
        extra = f", grad finite={r['grad_finite']}" if "grad_finite" in r else ""
        print(f"  {mode:>16}: {r['seconds']:8.1f} s   peak {_fmt_bytes(r['peak_bytes'])} "
              f"(+{_fmt_bytes(r['peak_above_baseline_bytes'])} above the {_fmt_bytes(r['baseline_bytes'])} before "
              f"the call; {r['chunk_rows']}-row tiles)   energy={r['energy']:.6g}{extra}", flush=True)
        ratio = r["peak_above_baseline_bytes"] / gram
        print(f"  {'':>16}  = {100 * ratio:.2f}% of one N x N Gram, "
              f"{r['peak_above_baseline_bytes'] / naive:.2e} of the N x N x d tensor", flush=True)
        if not math.isfinite(r["energy"]):
            raise RuntimeError(f"non-finite energy {r['energy']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
