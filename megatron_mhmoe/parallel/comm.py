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

Every function is the identity when its group is None (size 1), so single-process code runs the
same path. gloo (CPU) has no reduce-scatter and no all_gather_into_tensor: the helpers fall back to
all-reduce + split and list all-gather there.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

Group = Optional[dist.ProcessGroup]


def group_size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _is_gloo(group: Group) -> bool:
    return dist.get_backend(group) == "gloo"


# ------------------------------------------------------------------ raw (non-autograd) helpers
def all_reduce_(x: torch.Tensor, group: Group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(x, group=group)
    return x


def all_gather(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    x = x.contiguous()
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
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


def all_to_all_v(x: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int],
                 group: Group) -> torch.Tensor:
    """all_to_all_single along dim 0 with uneven splits (rows sent to / received from each rank)."""
    if group is None:
        return x
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=list(out_splits),
                           input_split_sizes=list(in_splits), group=group)
    return out


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
