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
