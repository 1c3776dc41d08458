"""Collectives as small autograd functions whose backward is the conjugate collective.

| forward                  | backward                 | used for                                   |
|--------------------------|--------------------------|--------------------------------------------|
| copy (identity)          | all-reduce               | entering a column-parallel region          |
| all-reduce               | copy (identity)          | leaving a row-parallel region              |
| split along dim          | all-gather along dim     | taking this rank's shard of a replica      |
| all-gather along dim     | split along dim          | rebuilding a replica whose grad is replicated |
| all-gather along dim     | reduce-scatter along dim | sequence parallel: shard -> full sequence  |
| reduce-scatter along dim | all-gather along dim     | sequence parallel: partial sums -> shard   |
| all-to-all (v)           | all-to-all (v), swapped  | expert-parallel dispatch / combine         |
| all-to-all start + wait  | all-to-all (v), swapped  | the same, overlapped with computation      |

Every function is the identity when its group is None (size 1), so single-process code runs the
same path. gloo (CPU) has no reduce-scatter and no all_gather_into_tensor: the helpers fall back to
all-reduce + split and list all-gather there.

This module (and the rest of parallel/) is the only caller of torch.distributed. Every tensor handed to a
collective is checked against the device its backend needs (`check_device`): NCCL takes only CUDA tensors,
which gloo does not enforce, and under the host-tensor guard (parallel/host_tensor.py) no host tensor
may reach a collective, so a CPU test sees what a GPU run would hit.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_mhmoe.parallel.host_tensor import DeviceMismatch, is_host

Group = Optional[dist.ProcessGroup]

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def group_size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _is_gloo(group: Group) -> bool:
    return dist.get_backend(group) == "gloo"


def world_group() -> Group:
    """The default group, or None on one process (then every collective here is the identity)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist.group.WORLD


def check_device(x: torch.Tensor, group: Group) -> None:
    """Refuse a tensor the group's backend would refuse on a GPU node (module docstring)."""
    if is_host(x):
        raise DeviceMismatch(f"a host tensor of shape {tuple(x.shape)} was handed to a collective: on NCCL this "
                             f"fails; create it with device=engine.device or move it with .to(engine.device)")
    if group is not None and x.device.type != "cuda" and dist.get_backend(group) == "nccl":
        raise DeviceMismatch(f"a {x.device} tensor of shape {tuple(x.shape)} was handed to an NCCL collective, "
                             f"which takes CUDA tensors only: create it on engine.device")


# ------------------------------------------------------------------ raw (non-autograd) helpers
def all_reduce_(x: torch.Tensor, group: Group, op: str = "sum") -> torch.Tensor:
    check_device(x, group)  # also on one process: the same call meets NCCL at world > 1
    if group is not None:
        dist.all_reduce(x, op=_REDUCE_OPS[op], group=group)
    return x


def broadcast_(x: torch.Tensor, src: int, group: Group) -> torch.Tensor:
    """In place from global rank src (a member of group)."""
    check_device(x, group)
    if group is not None:
        dist.broadcast(x, src=src, group=group)
    return x


def barrier(group: Group = None) -> None:
    """Wait for every rank of group (the world when None and more than one process)."""
    group = group if group is not None else world_group()
    if group is not None:
        dist.barrier(group=group)


def leave_process_group() -> None:
    """A clean exit after training: wait for every rank, then tear the group down."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_gather_object(obj, group: Group = None) -> list:
    """Picklable objects of every rank of group (the world when None), in rank order."""
    group = group if group is not None else world_group()
    if group is None:
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def all_gather(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    check_device(x, group)
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def split(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(f"cannot split dim {dim} of size {x.shape[dim]} over {size} ranks "
                         f"({x.shape[dim]} % {size} = {x.shape[dim] % size})")
    return x.chunk(size, dim=dim)[group_rank(group)].contiguous()


def reduce_scatter(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(f"cannot reduce-scatter dim {dim} of size {x.shape[dim]} over {size} ranks")
    if _is_gloo(group):
        return split(all_reduce_(x.contiguous().clone(), group), dim, group)
    parts = [p.contiguous() for p in x.chunk(size, dim=dim)]
    check_device(parts[0], group)
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


def all_to_all_v(x: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int],
                 group: Group) -> torch.Tensor:
    """all_to_all_single along dim 0 with uneven splits (rows sent to / received from each rank)."""
    if group is None:
        return x
    check_device(x, group)
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=list(out_splits),
                           input_split_sizes=list(in_splits), group=group)
    return out


class Pending:
    """An asynchronous collective in flight: `wait()` before reading its output (all_to_all_start)."""

    def __init__(self, work=None, keep=None):
        self.work, self.keep = work, keep  # keep: the input, alive until the collective is done
        self.conjugate = None  # all_to_all_start's box: what the backward's conjugate exchange needs

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
        self.work = self.keep = None


def all_to_all_v_start(x: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int],
                       group: Group) -> tuple[torch.Tensor, Pending]:
    """all_to_all_v launched with async_op=True: returns (output buffer, Pending); read it after wait()."""
    if group is None:
        return x, Pending()
    check_device(x, group)
    x = x.contiguous()
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    work = dist.all_to_all_single(out, x, output_split_sizes=list(out_splits),
                                  input_split_sizes=list(in_splits), group=group, async_op=True)
    return out, Pending(work, x)


def all_reduce_max_int(value: int, like: torch.Tensor, group: Group) -> int:
    """max over the group of one integer per rank (a one-element int64 tensor on like's device)."""
    t = torch.tensor([value], dtype=torch.int64, device=like.device)
    return int(all_reduce_(t, group, op="max").item())


# ------------------------------------------------------------------ autograd functions
class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return all_reduce_(g.contiguous().clone(), ctx.group), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce_(x.contiguous().clone(), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return split(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.dim, ctx.group), None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return split(g, ctx.dim, ctx.group), None, None


class _GatherReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return reduce_scatter(g, ctx.dim, ctx.group), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.dim, ctx.group), None, None


class _AllToAllV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return all_to_all_v(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, g):
        # The conjugate of a permutation across ranks is the reverse permutation.
        return all_to_all_v(g, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


class _AllToAllStart(torch.autograd.Function):
    """Forward: launch the all-to-all (async_op=True) and return its buffer, filled once `pending` is
    waited on (all_to_all_wait). Backward: wait for the conjugate all-to-all that _Wait's backward launched.

    So the backward overlaps too, mirrored: the conjugate starts where the forward waited and completes where
    the forward started, and the autograd engine runs whatever else is ready in between (in the two-level
    dispatch, another chunk's expert backward)."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, box):
        ctx.box = box
        out, box[0] = all_to_all_v_start(x, out_splits, in_splits, group)
        box[0].conjugate = box  # all_to_all_wait hands it to _Wait
        return out

    @staticmethod
    def backward(ctx, g):
        # g only carries the order: the gradient is the buffer of the conjugate all-to-all that
        # _Wait.backward launched (shaped like x, not like g): complete it before use.
        buf, pending = ctx.box[1]
        pending.wait()
        ctx.box[1] = None
        return buf, None, None, None, None


class _Wait(torch.autograd.Function):
    """Forward: wait for the collective that fills x, return x. Backward: launch the conjugate all-to-all
    asynchronously (when x came from _AllToAllStart), whose buffer is the gradient _AllToAllStart's backward
    completes; identity otherwise."""

    @staticmethod
    def forward(ctx, x, pending, box):
        ctx.box = box
        pending.wait()
        return x

    @staticmethod
    def backward(ctx, g):
        box = ctx.box
        if box is None:
            return g, None, None
        out_splits, in_splits, group = box[2]
        box[1] = all_to_all_v_start(g, in_splits, out_splits, group)  # (buffer, pending)
        return g, None, None


def all_to_all_start(x: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int],
                     group: Group) -> tuple[torch.Tensor, Pending]:
    """all_to_all, asynchronous: (buffer, pending). Read the buffer only through all_to_all_wait."""
    if group is None:
        return x, Pending()
    box = [None, None, (list(out_splits), list(in_splits), group)]  # forward work, backward work, splits
    out = _AllToAllStart.apply(x, list(out_splits), list(in_splits), group, box)
    return out, box[0]


def all_to_all_wait(out: torch.Tensor, pending: Pending) -> torch.Tensor:
    """The buffer of all_to_all_start, once its collective is done (gradient: the conjugate, asynchronous
    from here back to all_to_all_start)."""
    return _Wait.apply(out, pending, pending.conjugate)


def copy_to_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Identity forward, all-reduce backward (inputs to column-parallel layers)."""
    return x if group is None else _Copy.apply(x, group)


def reduce_from_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """All-reduce forward, identity backward (outputs of row-parallel layers)."""
    return x if group is None else _Reduce.apply(x, group)


def scatter_to_region(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Take this rank's chunk of a replicated tensor; backward all-gathers."""
    return x if group is None else _Split.apply(x, dim, group)


def gather_from_region(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """All-gather chunks into a replica whose gradient is replicated; backward takes this rank's chunk."""
    return x if group is None else _Gather.apply(x, dim, group)


def gather_from_sequence_region(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Sequence parallel: all-gather shards; backward reduce-scatters (each rank holds partial grads)."""
    return x if group is None else _GatherReduceScatter.apply(x, dim, group)


def reduce_scatter_to_sequence_region(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Sequence parallel: sum partial results and keep this rank's shard; backward all-gathers."""
    return x if group is None else _ReduceScatter.apply(x, dim, group)


def all_to_all(x: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int], group: Group) -> torch.Tensor:
    """Uneven all-to-all along dim 0: in_splits[r] rows go to rank r, out_splits[r] rows come from it."""
    return x if group is None else _AllToAllV.apply(x, list(out_splits), list(in_splits), group)
