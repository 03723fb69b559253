r"""Hyperspherical energy of neurons sharded across ranks (FSDP2 ``DTensor`` weights; no Lightning).

Two ways to get the energy of a weight whose rows live on several ranks:

* **gather** (:func:`gather_rows`): the full weight of *one* layer is all-gathered on every rank and the
  ordinary :func:`~lightning_hyper.functional.energy.hyperspherical_energy` runs on it. The backward is
  a reduce-scatter that **averages** over the ranks, so a penalty that differs between ranks (it uses
  each rank's labels) gets the gradient DDP would give it (the mean over the ranks); a penalty that is
  the same on every rank gets its own gradient. Per-rank memory: the layer's full weight (N·d) plus the
  energy core's Gram tiles.
* **ring** (:func:`ring_hyperspherical_energy`): each rank keeps its own rows; the normalized row blocks
  travel around a ring of point-to-point sends, and every rank sums the pair terms of its rows against
  each block as it passes (an all-reduce adds the ranks' sums). The backward runs the same ring again and
  recomputes the block terms: the gradient of rank r's rows is :math:`2\sum_q K_{rq}\hat W_q`, so no
  gradient is ever sent. Per-rank memory: O(N/p·d + block²) (Gram tiles of ``block`` = :data:`RING_BLOCK`
  rows and columns, or ``chunk_size``), never the full weight or a full row of the Gram matrix. Both ranks'
  gradients are those of the one global energy, which every rank holds.

:func:`sharded_hyperspherical_energy` picks one of them for a ``DTensor`` (``method="gather" | "ring" |
"auto"``); :func:`hyperspherical_energy` itself gathers a ``DTensor`` argument.
"""
from __future__ import annotations

from typing import Any
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_hyper.functional.checks import argument_error, check_choice
from lightning_hyper.functional.energy import (
    PairKernel,
    block_rows,
    compute_dtype,
    hyperspherical_energy,
    validate_energy_args,
    ZERO_NORM_POLICIES,
    warn_no_pairs,
)

__all__ = ["SHARDED_ENERGY_METHODS", "RING_MIN_ROWS", "is_dtensor", "gather_rows", "local_rows",
           "ring_hyperspherical_energy", "sharded_hyperspherical_energy", "all_finite"]

SHARDED_ENERGY_METHODS = ("gather", "ring", "auto")
#: default tile of the ring: ``RING_BLOCK`` x ``RING_BLOCK`` Gram entries at a time (16 MiB in float32)
RING_BLOCK = 2048
#: ``method="auto"`` uses the ring for a row-sharded weight of at least this many rows (a 8192 x 8192
#: float32 Gram is 256 MiB; smaller layers are cheaper to gather)
RING_MIN_ROWS = 8192


def is_dtensor(x: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2 / tensor-parallel parameters)."""
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(x, DTensor)


class _GatherMean(torch.autograd.Function):
    """DTensor -> its full tensor; backward: the mean over all ranks of the full gradients, scattered to
    the DTensor's placements (a reduce-scatter for ``Shard``, an all-reduce for ``Replicate``)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        ctx.mesh, ctx.placements = x.device_mesh, x.placements
        with torch.no_grad():
            return x.full_tensor()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        from torch.distributed.tensor import DTensor, Partial

        mesh = ctx.mesh
        grad = grad.contiguous() / mesh.size()
        partial = DTensor.from_local(grad, mesh, [Partial("sum")] * mesh.ndim, run_check=False)
        return partial.redistribute(mesh, ctx.placements)


def gather_rows(x: Tensor) -> Tensor:
    """The full tensor of a ``DTensor`` (all-gathered on every rank; other tensors are returned as they are).

    Differentiable: the backward averages the gradient over the ranks of the DTensor's mesh and hands each
    rank its shard, as DDP averages a loss gradient. Every rank of the mesh must call it (a collective)."""
    if not is_dtensor(x):
        return x
    if not x.requires_grad or not torch.is_grad_enabled():
        return x.full_tensor()
    return _GatherMean.apply(x)


def local_rows(x: Tensor) -> tuple[Tensor, Any] | None:
    """``(this rank's rows, process group)`` of a DTensor sharded by rows only (``Shard(0)`` on one mesh
    dimension, ``Replicate`` on the others, as FSDP2 and HSDP shard weights); ``None`` otherwise.
    The local rows are differentiable (``to_local``): their gradient becomes the DTensor's shard gradient."""
    if not is_dtensor(x):
        return None
    from torch.distributed.tensor import Replicate, Shard

    sharded = [i for i, p in enumerate(x.placements) if isinstance(p, Shard)]
    if len(sharded) != 1 or x.placements[sharded[0]].dim != 0:
        return None
    if not all(isinstance(p, Replicate) for i, p in enumerate(x.placements) if i != sharded[0]):
        return None
    return x.to_local(), x.device_mesh.get_group(sharded[0])


def all_finite(tensors: Sequence[Tensor], group: Any = None) -> list[bool]:
    """For each tensor, whether all of its entries are finite, agreed on by every rank (one all-reduce when a
    tensor is a DTensor: each rank checks its shard; a plain tensor is checked as it is)."""
    import torch.distributed as dist

    local = [t.to_local() if is_dtensor(t) else t for t in tensors]
    flags = torch.stack([torch.isfinite(t.detach()).all() for t in local]).to(torch.int32) if local else None
    if flags is None:
        return []
    if any(is_dtensor(t) for t in tensors) and dist.is_available() and dist.is_initialized():
        flags = flags.cpu()
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=group)
    return [bool(f) for f in flags.tolist()]


# ---------------------------------------------------------------------------------------------- ring
def _ring_pass(block: Tensor, sizes: list[int], rank: int, world: int, step: int, group: Any,
               global_ranks: list[int]) -> tuple[Tensor, list]:
    """Start sending ``block`` (the rows of rank ``rank - step``) to the next rank and receiving the rows of
    rank ``rank - step - 1`` from the previous one; returns the receive buffer and the requests."""
    import torch.distributed as dist

    src = (rank - step - 1) % world
    buf = block.new_empty((sizes[src], block.shape[1]))
    nxt, prv = global_ranks[(rank + 1) % world], global_ranks[(rank - 1) % world]
    ops = [dist.P2POp(dist.isend, block.contiguous(), nxt, group), dist.P2POp(dist.irecv, buf, prv, group)]
    return buf, dist.batch_isend_irecv(ops)


def _ring(unit: Tensor, sizes: list[int], rank: int, world: int, group: Any, global_ranks: list[int]):
    """Yield ``(q, U_q)`` for every rank q, starting with this rank's own rows; the next block's transfer
    runs while the caller computes on the current one."""
    block = unit
    for step in range(world):
        reqs = None
        if step < world - 1:
            nxt, reqs = _ring_pass(block, sizes, rank, world, step, group, global_ranks)
        yield (rank - step) % world, block
        if reqs is not None:
            for r in reqs:
                r.wait()
            block = nxt


def _block_terms(unit: Tensor, cols: Tensor, same: bool, spec: PairKernel, block: int, need_slope: bool,
                 g_out: Tensor | None) -> Tensor:
    """Sum of the pair terms of ``unit`` (this rank's rows) against ``cols`` (one rank's rows), in
    ``block`` x ``block`` tiles of the Gram matrix; ``same``: ``cols`` is ``unit`` (its diagonal is left out).
    ``g_out``: accumulate ``K @ cols`` into it (the slopes K, for the backward)."""
    total = torch.zeros((), dtype=torch.float64, device=unit.device)
    n, m = unit.shape[0], cols.shape[0]
    for a in range(0, n, block):
        b = min(a + block, n)
        for c0 in range(0, m, block):
            c1 = min(c0 + block, m)
            c = unit[a:b] @ cols[c0:c1].T
            if same and c0 == a:  # a diagonal tile (square: rows and columns are cut alike)
                c.diagonal().zero_()  # safe value before the kernel
                t, k = spec.sum_and_slope_(c.unsqueeze(0), 0, need_slope)
            else:
                t, k = spec.sum_and_slope_(c.unsqueeze(0), None, need_slope)
            total += t[0]
            if g_out is not None and k is not None:
                g_out[a:b] += k[0] @ cols[c0:c1]
    return total


class _RingEnergyFn(torch.autograd.Function):
    """Sum over ordered pairs i != j of all ranks' rows of the pair term; input: this rank's rows."""

    @staticmethod
    def forward(ctx, x: Tensor, norms: Tensor, spec: PairKernel, rows: int, group: Any, sizes: list[int],
                rank: int, global_ranks: list[int]) -> Tensor:  # type: ignore[override]
        import torch.distributed as dist

        world = len(sizes)
        unit = x / norms.unsqueeze(-1)
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        for q, block in _ring(unit, sizes, rank, world, group, global_ranks):
            total += _block_terms(unit, block, q == rank, spec, rows, False, None)
        dist.all_reduce(total, group=group)
        ctx.spec, ctx.rows, ctx.group, ctx.sizes, ctx.rank, ctx.global_ranks = (spec, rows, group, sizes, rank,
                                                                                 global_ranks)
        ctx.save_for_backward(unit, norms)
        return total.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        with torch.autocast(device_type=grad_out.device.type, enabled=False):
            unit, norms = ctx.saved_tensors
            world = len(ctx.sizes)
            g_unit = torch.zeros_like(unit)
            for q, block in _ring(unit, ctx.sizes, ctx.rank, world, ctx.group, ctx.global_ranks):
                _block_terms(unit, block, q == ctx.rank, ctx.spec, ctx.rows, True, g_unit)
            # dE/dû_i = sum_j (K_ij + K_ji) û_j = 2 (K û)_i  (K symmetric)
            g_unit.mul_(grad_out * 2.0)
            radial = (g_unit * unit).sum(dim=-1, keepdim=True)
            g_x = (g_unit - radial * unit) / norms.unsqueeze(-1)
        return g_x, None, None, None, None, None, None, None


def ring_hyperspherical_energy(
    local: Tensor,
    group: Any = None,
    s: float = 2.0,
    metric: str = "euclidean",
    half_space: bool = False,
    reduction: str = "mean",
    angle_unit: str = "radian",
    eps: float = 1e-6,
    chunk_size: int | None = None,
    min_norm: float = 1e-6,
    zero_norm: str = "error",
) -> Tensor:
    r"""Hyperspherical energy of the rows of every rank's ``local`` together, without gathering them.

    Every rank of ``group`` (default: the whole world) calls it with its own rows ``(n_r, d)`` (``n_r`` may
    differ, or be 0); each returns the same global energy, equal to :func:`hyperspherical_energy` of the
    concatenated rows (in rank order), and its gradient flows to this rank's rows only. Arguments as in
    :func:`~lightning_hyper.functional.energy.hyperspherical_energy` (2-D neurons only; ``chunk_size``: the
    side of the Gram tiles, default :data:`RING_BLOCK`). Memory per rank: O(n_r·d + block²); time: every rank
    computes its rows against all N rows (N·n_r·d per pass), forward and again in the backward.
    """
    import torch.distributed as dist

    validate_energy_args(s, metric, reduction, angle_unit, eps)
    check_choice("zero_norm", zero_norm, ZERO_NORM_POLICIES, owner="ring_hyperspherical_energy")
    if not isinstance(local, Tensor) or local.dim() != 2:
        argument_error("local", getattr(local, "shape", type(local).__name__), "a tensor (n_r, d) of this rank's rows",
                       owner="ring_hyperspherical_energy", exc=ValueError)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("ring_hyperspherical_energy needs an initialized torch.distributed process group; on one "
                           "process use hyperspherical_energy")
    with torch.autocast(device_type=local.device.type, enabled=False):
        x = local.to(compute_dtype(local))
        norms = torch.linalg.vector_norm(x.detach(), dim=-1)
        bad = ~torch.isfinite(x.detach()).all(dim=-1) if x.shape[0] else norms.bool()
        small = norms < min_norm
        counts = torch.tensor([int(bad.sum()), int(small.sum())], dtype=torch.int64)
        dist.all_reduce(counts, group=group)  # every rank takes the same branch below
        if counts[0]:
            raise ValueError("neurons: contain NaN or Inf entries; the energy of such neurons is undefined")
        if counts[1]:
            if zero_norm == "error":
                raise ValueError(f"neurons: {int(counts[1])} neuron(s) have norm < min_norm={min_norm:g}; their "
                                 "direction is undefined. Pass zero_norm='exclude' to leave them out of the energy")
            x, norms = x[~small], norms[~small]
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        sizes_t = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(sizes_t, torch.tensor([x.shape[0]], dtype=torch.int64), group=group)
        sizes = [int(t) for t in sizes_t]
        n = sum(sizes)
        spec = PairKernel(float(s), metric, float(eps), angle_unit, bool(half_space))
        if n < 2 and not (half_space and n == 1):
            warn_no_pairs(n, "ring_hyperspherical_energy")
            return x.sum() * 0.0
        global_ranks = list(range(world)) if group is None else dist.get_process_group_ranks(group)
        if n == 1:
            total = x.sum() * 0.0
        else:
            block = RING_BLOCK if chunk_size is None else block_rows(n, chunk_size)
            total = _RingEnergyFn.apply(x, norms, spec, block, group, sizes, rank, global_ranks)
        if half_space:
            total = total + 2 * n * spec.antipodal_value()
            pairs = 2 * n * (2 * n - 1)
        else:
            pairs = n * (n - 1)
        return total / pairs if reduction == "mean" else total


def sharded_hyperspherical_energy(neurons: Tensor, method: str = "auto", **kwargs: Any) -> Tensor:
    """Hyperspherical energy of a (possibly) sharded ``(N, d)`` neuron matrix.

    ``method="gather"``: all-gather the rows (:func:`gather_rows`) and compute it on each rank;
    ``"ring"``: :func:`ring_hyperspherical_energy` on each rank's rows (needs a row-sharded DTensor:
    ``Shard(0)``; others are gathered); ``"auto"``: the ring for row-sharded weights of at least
    :data:`RING_MIN_ROWS` rows, else gather. A plain tensor is computed as it is. ``kwargs``: those of
    :func:`hyperspherical_energy`.
    """
    check_choice("method", method, SHARDED_ENERGY_METHODS, owner="sharded_hyperspherical_energy")
    if not is_dtensor(neurons):
        return _energy_kw(neurons, **kwargs)
    local = local_rows(neurons) if neurons.dim() == 2 else None
    use_ring = local is not None and (method == "ring" or (method == "auto" and neurons.shape[0] >= RING_MIN_ROWS))
    if use_ring:
        rows, group = local
        return ring_hyperspherical_energy(rows, group=group, **kwargs)
    return _energy_kw(gather_rows(neurons), **kwargs)


def _energy_kw(neurons: Tensor, s: float = 2.0, metric: str = "euclidean", half_space: bool = False,
               reduction: str = "mean", angle_unit: str = "radian", eps: float = 1e-6,
               chunk_size: int | None = None, min_norm: float = 1e-6, zero_norm: str = "error") -> Tensor:
    return hyperspherical_energy(neurons, s, metric, half_space, reduction, angle_unit, eps, chunk_size, min_norm,
                                 zero_norm)


def use_ring(weight: Tensor, method: str) -> bool:
    """Whether :func:`sharded_hyperspherical_energy` takes the ring for this weight (2-D neurons) and method."""
    if method == "gather" or not is_dtensor(weight) or local_rows(weight) is None:
        return False
    return method == "ring" or weight.shape[0] >= RING_MIN_ROWS


__all__ += ["use_ring"]


class _BoundShardedGradientNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, max_norm: float, group: Any) -> Tensor:  # type: ignore[override]
        ctx.max_norm, ctx.group = max_norm, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        import torch.distributed as dist

        sq = torch.linalg.vector_norm(grad.detach().double()).square().reshape(1)
        dist.all_reduce(sq, group=ctx.group)
        norm = sq.sqrt()[0]
        scale = ctx.max_norm / norm if bool(torch.isfinite(norm)) and float(norm) > ctx.max_norm else 1.0
        return grad * scale, None, None


def bound_sharded_gradient_norm(x: Tensor, max_norm: float, group: Any = None) -> Tensor:
    """:func:`~lightning_hyper.functional.safeguards.bound_gradient_norm` for one rank's rows of a sharded
    matrix: the Frobenius norm is that of the whole gradient (an all-reduce over ``group`` in the backward),
    so every rank scales its rows by the same factor."""
    if not x.requires_grad:
        return x
    return _BoundShardedGradientNorm.apply(x, float(max_norm), group)


__all__ += ["bound_sharded_gradient_norm"]
