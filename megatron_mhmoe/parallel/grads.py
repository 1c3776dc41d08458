"""Gradient reduction by parameter kind, without DeepSpeed.

The loss of each DP replica is the mean over its own tokens, and the training loss is the mean over
replicas. Hence:
1. params replicated over TP but fed different tokens (`tp_partial_grad`): sum over TP first;
2. non-expert params: average over DP;
3. expert params: sum over the EDP group (every rank that holds the same experts), divide by DP.
The DeepSpeed engine does steps 2-3 itself; step 1 is ours in both paths (`reduce_tp_partial_grads`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from megatron_mhmoe.parallel import comm
from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.parallel.params import is_expert


def _grads(model: nn.Module, select) -> list[torch.Tensor]:
    out = []
    for p in model.parameters():
        if p.requires_grad and select(p):
            if p.grad is None:
                # A parameter that got no gradient still takes part in the collective (else ranks hang).
                p.grad = torch.zeros_like(p)
            out.append(p.grad)
    return out


def _all_reduce_flat(grads: list[torch.Tensor], group, scale: float = 1.0) -> None:
    if not grads:
        return
    if group is not None:
        # One flat buffer per dtype: one collective instead of one per parameter.
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for same in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in same])
            comm.all_reduce_(flat, group)
            offset = 0
            for g in same:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
    if scale != 1.0:
        for g in grads:
            g.mul_(scale)


def reduce_tp_partial_grads(model: nn.Module, ctx: ParallelContext) -> None:
    """Sum over TP the grads of params that each TP rank fed with different tokens."""
    _all_reduce_flat(_grads(model, lambda p: getattr(p, "tp_partial_grad", False)), ctx.tp_group)


def reduce_gradients(model: nn.Module, ctx: ParallelContext) -> None:
    """All three steps; after it every rank holds the gradient of the global mean loss."""
    reduce_tp_partial_grads(model, ctx)
    _all_reduce_flat(_grads(model, lambda p: not is_expert(p)), ctx.dp_group, 1.0 / ctx.dp_size)
    _all_reduce_flat(_grads(model, is_expert), ctx.edp_group, 1.0 / ctx.dp_size)


@torch.no_grad()
def global_grad_norm(model: nn.Module, ctx: ParallelContext) -> torch.Tensor:
    """L2 norm of the full model's gradient, every element counted once (call after reduction).

    A rank counts TP shards when it is in DP replica 0, replicated params when it is also TP rank 0,
    and its local experts when it is EDP rank 0; one all-reduce over the world sums the rest.
    """
    total = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is None:
            continue
        if is_expert(p):
            mine = ctx.edp_rank == 0
        elif getattr(p, "tp_dim", None) is not None:
            mine = ctx.dp_rank == 0
        else:
            mine = ctx.dp_rank == 0 and ctx.tp_rank == 0
        if mine:
            total += p.grad.detach().double().square().sum().cpu()
    if ctx.world_size > 1:
        import torch.distributed as dist
        dist.all_reduce(total)
    return total.sqrt().float()


@torch.no_grad()
def clip_gradients_(model: nn.Module, ctx: ParallelContext, max_norm: float) -> float:
    """Scale gradients so their global norm is at most max_norm; returns the norm before clipping."""
    norm = float(global_grad_norm(model, ctx))
    if max_norm > 0 and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm
