"""Per-rank peak memory and time of the sharded energy: ring vs gather (issue 17, docs/distributed.md).

For each N, 2 CPU processes (gloo, 1 thread each) hold the rows of one (N, d) float32 weight as FSDP2 does
(a ``DTensor`` sharded by rows, N/2 rows per rank) and compute its hyperspherical energy (s=2, mean) and the
gradient, once with ``method="gather"`` (the full weight all-gathered on every rank, then the chunked energy
core) and once with ``method="ring"`` (row blocks passed around the ranks). Every (N, method) runs in a fresh
pair of processes, so the peak resident memory (``ru_maxrss``) each rank reaches during the energy, minus what
it held before, is that computation's own. Prints one row per run and the ring/gather ratios, and checks that
both methods give the same energy.

    python benchmarks/sharded_energy.py                 # N = 20 000, 35 000, 50 000; d = 512
    python benchmarks/sharded_energy.py --smoke         # tiny, for the test suite
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import tempfile
import time


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _worker(rank: int, world: int, port: int, n: int, d: int, method: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from lightning_hyper.functional.distributed import sharded_hyperspherical_energy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    rows = [len(c) for c in torch.arange(n).chunk(world)]
    g = torch.Generator().manual_seed(1000 + rank)
    local = torch.randn(rows[rank], d, generator=g)  # only this rank's rows ever exist here
    weight = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size((n, d)),
                                stride=(d, 1)).requires_grad_()
    # warm up the process group and the kernels on a tiny layer (not measured)
    tiny = DTensor.from_local(torch.randn(4, d), mesh, [Shard(0)], run_check=False).requires_grad_()
    sharded_hyperspherical_energy(tiny, method=method).backward()
    dist.barrier()
    before = _rss_mb()
    start = time.perf_counter()
    energy = sharded_hyperspherical_energy(weight, method=method)
    energy.backward()
    dist.barrier()
    seconds = time.perf_counter() - start
    peak = _rss_mb() - before
    grad_norm = float(torch.linalg.vector_norm(weight.grad.to_local()))
    with open(os.path.join(out, f"{method}_{n}_{rank}.json"), "w") as f:
        json.dump({"seconds": seconds, "peak_mb": peak, "energy": float(energy.detach()), "grad_sq": grad_norm ** 2}, f)
    dist.destroy_process_group()


def run(sizes: list[int], d: int, world: int = 2, verbose: bool = False) -> list[dict]:
    import torch.multiprocessing as mp

    rows = []
    with tempfile.TemporaryDirectory() as out:
        for n in sizes:
            for method in ("gather", "ring"):
                mp.start_processes(_worker, args=(world, _port(), n, d, method, out), nprocs=world,
                                   start_method="spawn")
                ranks = [json.load(open(os.path.join(out, f"{method}_{n}_{r}.json"))) for r in range(world)]
                rows.append({"N": n, "d": d, "method": method, "seconds": max(r["seconds"] for r in ranks),
                             "peak_mb": max(r["peak_mb"] for r in ranks), "energy": ranks[0]["energy"],
                             "grad_norm": sum(r["grad_sq"] for r in ranks) ** 0.5})
                if verbose:
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def report(rows: list[dict]) -> str:
    lines = [f"{'N':>7} {'d':>5} {'method':>7} {'time s':>9} {'peak MiB/rank':>14} {'energy':>14}"]
    for r in rows:
        lines.append(f"{r['N']:>7} {r['d']:>5} {r['method']:>7} {r['seconds']:>9.2f} {r['peak_mb']:>14.1f} "
                     f"{r['energy']:>14.8g}")
    lines.append("ring / gather (per rank): N, time ratio, peak-memory ratio, |energy difference| (relative)")
    by = {(r["N"], r["method"]): r for r in rows}
    for n in sorted({r["N"] for r in rows}):
        g, q = by[(n, "gather")], by[(n, "ring")]
        rel = abs(q["energy"] - g["energy"]) / abs(g["energy"])
        memory = q["peak_mb"] / max(g["peak_mb"], 1e-9)
        lines.append(f"  N={n}: time x{q['seconds'] / g['seconds']:.2f}, memory x{memory:.2f}, "
                     f"energy rel. diff {rel:.1e}, grad-norm rel. diff "
                     f"{abs(q['grad_norm'] - g['grad_norm']) / g['grad_norm']:.1e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="N = 300, d = 16 (seconds)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 35000, 50000])
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args(argv)
    sizes, d = ([300], 16) if args.smoke else (args.sizes, args.dim)
    rows = run(sizes, d, verbose=not args.smoke)
    print(report(rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
