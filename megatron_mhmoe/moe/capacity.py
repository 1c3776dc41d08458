"""Expert capacity: which routed assignments fit. Local maths only (the counts come from the dispatcher).

A routing group is one data-parallel replica's tokens; with tensor parallelism those tokens are split
over the TP ranks, and the decision must not depend on the split. So the queue order at an expert is
defined on the whole replica: all first choices before all second choices (GShard's priority), then
by token index. A TP rank knows its place in that order from the per-(choice, expert) counts of every
TP rank, all-gathered by the dispatcher; the drop decision is then exactly the single-process one.
"""
from __future__ import annotations

import math

import torch

from megatron_mhmoe.moe.fixed_counts import fixed_bincount


def expert_capacity(capacity_factor: float, top_k: int, num_sub_tokens: int, num_experts: int) -> int:
    """ceil(cf * k * S / E); 0 means dropless (cf <= 0)."""
    if capacity_factor <= 0:
        return 0
    return int(math.ceil(capacity_factor * top_k * num_sub_tokens / num_experts))


def local_choice_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(S, k) expert ids -> (k, E) number of sub-tokens whose j-th choice is e."""
    return choice_counts(experts.t().reshape(-1), experts.shape[1], num_experts)


def choice_counts(e_flat: torch.Tensor, k: int, num_experts: int) -> torch.Tensor:
    """(k*S,) choice-major expert ids -> (k, E) number of sub-tokens whose j-th choice is e."""
    S = e_flat.numel() // k
    choice = torch.arange(k, device=e_flat.device).repeat_interleave(S)  # (k*S,) choice-major
    flat = choice * num_experts + e_flat  # (k*S,)
    return fixed_bincount(flat, k * num_experts).view(k, num_experts)


def capacity_keep(experts: torch.Tensor, counts_all: torch.Tensor, tp_rank: int, capacity: int,
                  order: torch.Tensor | None = None, e_flat: torch.Tensor | None = None) -> torch.Tensor:
    """Which assignments fit, in choice-major order (k*S,) bool.

    experts: (S, k) this rank's choices; counts_all: (TP, k, E) every TP rank's local_choice_counts;
    order: argsort(choice-major ids, stable=True) and e_flat: the choice-major ids, if the caller has them
    (routing.RoutingRecord holds both).
    1. Local position of each assignment among this rank's assignments to the same expert, in
       choice-major order (stable sort by expert id).
    2. Offset of (choice j, expert e) on this rank within the replica queue: the other TP ranks'
       assignments of earlier choices to e, plus lower TP ranks' choice-j assignments to e.
    3. Keep when local position + offset < capacity.
    """
    S, k = experts.shape
    if e_flat is None:
        e_flat = experts.t().reshape(-1)  # (k*S,) choice-major
    choice = torch.arange(k, device=experts.device).repeat_interleave(S)  # (k*S,)
    # 1.
    if order is None:
        order = torch.argsort(e_flat, stable=True)
    local = counts_all[tp_rank]  # (k, E)
    per_expert = local.sum(0)  # (E,)
    starts = torch.cumsum(per_expert, 0) - per_expert  # (E,) first sorted slot of each expert
    pos = torch.empty_like(e_flat)
    pos[order] = torch.arange(e_flat.numel(), device=e_flat.device) - starts[e_flat[order]]
    # 2.
    others = counts_all.sum(0) - local  # (k, E) other TP ranks' counts
    earlier_choices = torch.cumsum(others, 0) - others  # (k, E) exclusive cumsum over choices
    lower_ranks = counts_all[:tp_rank].sum(0)  # (k, E)
    offset = earlier_choices + lower_ranks
    # 3.
    return pos + offset[choice, e_flat] < capacity


def capacity_keep_reference(experts: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Slow reference for one routing group: walk the queue (choice, token) and fill each expert.

    Returns (S, k) bool: keep[i, j] for sub-token i's j-th choice.
    """
    S, k = experts.shape
    filled = [0] * num_experts
    keep = torch.zeros(S, k, dtype=torch.bool)
    for j in range(k):
        for i in range(S):
            e = int(experts[i, j])
            if filled[e] < capacity:
                keep[i, j] = True
            filled[e] += 1
    return keep
