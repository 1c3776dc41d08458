"""Gradient reduction by parameter kind, without DeepSpeed.

The loss of each DP replica is the mean over its own tokens, and the training loss is the mean over
replicas. Hence:
1. params replicated over TP but fed different tokens (`tp_partial_grad`): sum over TP first;
2. non-expert params: average over DP;
3. expert params: sum over the EDP group (every rank that holds the same experts), divide by DP.
The DeepSpeed engine does steps 2-3 itself; step 1 is ours in both paths: a grad hook inside backward
(`install_tp_partial_grad_hooks`, the training path) or after it (`reduce_tp_partial_grads`).
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


def is_tp_partial(p: torch.Tensor) -> bool:
    """Replicated over TP but fed different tokens on each TP rank: its gradient is a partial sum."""
    return bool(getattr(p, "tp_partial_grad", False))


def reduce_tp_partial_grads(model: nn.Module, ctx: ParallelContext) -> None:
    """Sum over TP the grads of params that each TP rank fed with different tokens."""
    _all_reduce_flat(_grads(model, is_tp_partial), ctx.tp_group)


def install_tp_partial_grad_hooks(model: nn.Module, ctx: ParallelContext) -> int:
    """The same sum inside backward, before DeepSpeed's reduction hooks see the gradient."""
    if ctx.tp_group is None:
        return 0
    n = 0
    for p in model.parameters():
        if is_tp_partial(p):
            p.register_hook(lambda g, group=ctx.tp_group: comm.all_reduce_(g.clone(), group))
            n += 1
    return n


def reduce_gradients(model: nn.Module, ctx: ParallelContext) -> None:
    """All three steps; after it every rank holds the gradient of the global mean loss."""
    reduce_tp_partial_grads(model, ctx)
    _all_reduce_flat(_grads(model, lambda p: not is_expert(p)), ctx.dp_group, 1.0 / ctx.dp_size)
    _all_reduce_flat(_grads(model, is_expert), ctx.edp_group, 1.0 / ctx.dp_size)


def _counted_here(p: torch.Tensor, ctx: ParallelContext) -> bool:
    """Whether this rank counts p in the global norm, so that the world counts every element once."""
    if is_expert(p):
        return ctx.edp_rank == 0
    if getattr(p, "tp_dim", None) is not None:
        return ctx.dp_rank == 0
    return ctx.dp_rank == 0 and ctx.tp_rank == 0


@torch.no_grad()
def global_norm(pairs, ctx: ParallelContext, device=None) -> torch.Tensor:
    """L2 norm over (param, gradient) pairs of every rank, every element counted once (after reduction).

    A rank counts TP shards when it is in DP replica 0, replicated params when it is also TP rank 0,
    and its local experts when it is EDP rank 0; one all-reduce over the world sums the rest. The
    gradient may be another tensor than p.grad (DeepSpeed's fp32 buffers); p says what kind it is.
    """
    pairs = list(pairs)
    if device is None:
        device = pairs[0][1].device if pairs else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for p, g in pairs:
        if g is not None and _counted_here(p, ctx):
            total += g.detach().double().square().sum()
    if ctx.world_size > 1:
        comm.all_reduce_(total, comm.world_group())
    return total.sqrt().float()


def global_grad_norm(model: nn.Module, ctx: ParallelContext) -> torch.Tensor:
    """global_norm over the params' own .grad."""
    return global_norm([(p, p.grad) for p in model.parameters()], ctx)


def clip_coefficient(norm: float, max_norm: float) -> float:
    """The factor that brings a gradient of global norm `norm` to at most max_norm (1.0: no clipping)."""
    return max_norm / (norm + 1e-6) if max_norm > 0 and norm > max_norm else 1.0
