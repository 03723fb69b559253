"""Issue 17: the energy of neurons sharded across ranks (functional/distributed.py), float64.

One spawned gloo world (2 CPU processes, plain torch.distributed, no Lightning) checks, on uneven shards:
the ring energy and its gradient equal an independent float64 reference (explicit pair loops and autograd
of the plain formula) for every kernel variant, chunked or not; ``sharded_hyperspherical_energy`` agrees
between "ring" and "gather" on a FSDP2-style ``DTensor``; and the gather's backward averages the ranks'
gradients (as DDP averages a loss gradient).
"""
from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

from lightning_hyper.functional import hyperspherical_energy
from lightning_hyper.functional.distributed import (SHARDED_ENERGY_METHODS, gather_rows, ring_hyperspherical_energy,
                                                    sharded_hyperspherical_energy)
from tests.distributed import free_port

N, D = 23, 5
VARIANTS = [dict(s=2.0), dict(s=1.0, reduction="sum"), dict(s=0.0), dict(s=2.0, half_space=True),
            dict(s=1.0, metric="angular"), dict(s=0.5, metric="angular", half_space=True, angle_unit="pi"),
            dict(s=2.0, chunk_size=3), dict(s=0.0, half_space=True, chunk_size=2)]


def reference_energy(w: torch.Tensor, s: float = 2.0, metric: str = "euclidean", half_space: bool = False,
                     reduction: str = "mean", angle_unit: str = "radian", eps: float = 1e-6,
                     chunk_size=None) -> torch.Tensor:
    """Explicit pair loop of thesis Eq. 5.1 (half space: the 2N points ±w_i), float64, autograd-differentiable."""
    unit = w / w.norm(dim=1, keepdim=True)
    pts = torch.cat([unit, -unit]) if half_space else unit

    def f(a, b):
        if metric == "euclidean":
            r2 = ((a - b) ** 2).sum() + eps
            return -0.5 * torch.log(r2) if s == 0 else r2 ** (-s / 2)
        theta = torch.acos((a * b).sum().clamp(-1 + eps, 1 - eps)) / (math.pi if angle_unit == "pi" else 1.0)
        return -torch.log(theta) if s == 0 else theta ** (-s)

    def antipodal():  # the pair (w, -w) is at the largest distance exactly (no clamp), as documented
        r = torch.tensor(4.0 + eps if metric == "euclidean" else (1.0 if angle_unit == "pi" else math.pi),
                         dtype=w.dtype)
        if metric == "euclidean":
            return -0.5 * torch.log(r) if s == 0 else r ** (-s / 2)
        return -torch.log(r) if s == 0 else r ** (-s)

    n = len(unit)
    terms = [antipodal() if half_space and abs(i - j) == n else f(pts[i], pts[j])
             for i, j in itertools.permutations(range(len(pts)), 2)]
    total = torch.stack(terms).sum()
    return total / len(terms) if reduction == "mean" else total


def _world(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(7)
        w = torch.randn(N, D, dtype=torch.float64, generator=g)
        sizes = [13, 10]  # uneven, not FSDP's chunking
        start = sum(sizes[:rank])
        for kw in VARIANTS:
            full = w.clone().requires_grad_()
            ref = reference_energy(full, **kw)
            (ref_grad,) = torch.autograd.grad(ref, full)
            local = w[start:start + sizes[rank]].clone().requires_grad_()
            e = ring_hyperspherical_energy(local, **kw)
            (grad,) = torch.autograd.grad(e, local)
            torch.testing.assert_close(e, ref.detach(), rtol=1e-11, atol=0, msg=f"energy {kw}")
            torch.testing.assert_close(grad, ref_grad[start:start + sizes[rank]], rtol=1e-9, atol=1e-13,
                                       msg=f"gradient {kw}")
        # a rank without rows, and zero-norm rows excluded on one rank
        local = w[:N] if rank == 0 else w[:0]
        e = ring_hyperspherical_energy(local.clone().requires_grad_())
        torch.testing.assert_close(e, hyperspherical_energy(w), rtol=1e-12, atol=0)
        wz = w.clone()
        wz[3] = 0
        local = wz[start:start + sizes[rank]]
        e = ring_hyperspherical_energy(local, zero_norm="exclude")
        torch.testing.assert_close(e, hyperspherical_energy(wz, zero_norm="exclude"), rtol=1e-12, atol=0)
        # FSDP2 layout: DTensor Shard(0), uneven chunks (12 + 11)
        mesh = init_device_mesh("cpu", (world,))
        dw = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_()
        results = {}
        for method in SHARDED_ENERGY_METHODS:
            e = sharded_hyperspherical_energy(dw, method=method, s=1.0)
            (grad,) = torch.autograd.grad(e, dw)
            results[method] = (e.detach(), grad.full_tensor())
        full = w.clone().requires_grad_()
        ref = reference_energy(full, s=1.0)
        (ref_grad,) = torch.autograd.grad(ref, full)
        for method, (e, grad) in results.items():
            torch.testing.assert_close(e, ref.detach(), rtol=1e-11, atol=0, msg=method)
            torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-13, msg=method)
        # the gather's backward is the MEAN over the ranks: rank r's penalty weighted by (r + 1) -> 1.5 x
        e = (rank + 1.0) * hyperspherical_energy(gather_rows(dw), s=1.0)
        (grad,) = torch.autograd.grad(e, dw)
        torch.testing.assert_close(grad.full_tensor(), 1.5 * ref_grad, rtol=1e-9, atol=1e-13)
        # hyperspherical_energy takes a DTensor itself (gathered)
        torch.testing.assert_close(hyperspherical_energy(dw.detach(), s=1.0), ref.detach(), rtol=1e-11, atol=0)
    finally:
        dist.destroy_process_group()


def test_reference_matches_energy_core():
    """The test's loop reference agrees with the single-process energy core (so the spawned checks compare
    the ring with the thesis formula, not with itself)."""
    w = torch.randn(6, 3, dtype=torch.float64)
    for kw in VARIANTS:
        torch.testing.assert_close(hyperspherical_energy(w, **kw), reference_energy(w, **kw), rtol=1e-11, atol=0)


@pytest.mark.spawn
@pytest.mark.timeout(300)
def test_ring_and_gather_energies_equal_reference_float64():
    import torch.multiprocessing as mp

    mp.start_processes(_world, args=(2, free_port()), nprocs=2, start_method="spawn")


def test_ring_needs_a_process_group_and_2d_rows():
    with pytest.raises(RuntimeError, match="process group"):
        ring_hyperspherical_energy(torch.randn(4, 3))
    with pytest.raises(ValueError, match="method='spiral'.*'gather', 'ring', 'auto'"):
        sharded_hyperspherical_energy(torch.randn(4, 3), method="spiral")
    # a plain tensor: the ordinary energy
    w = torch.randn(5, 3)
    assert torch.equal(sharded_hyperspherical_energy(w, method="ring"), hyperspherical_energy(w))
