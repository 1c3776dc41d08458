"""Routing statistics off the hot path: computed on the device from the RoutingRecord, summed later.

The statistics the log line and the routing report show -- kept counts per expert, the divergence and
fan-out histograms, the (head, expert) counts -- are not needed to train. MHMoELayer.stats_mode says when
a forward computes them:
- 'eager': computed and summed over the replica's TP ranks inside the forward, one collective per layer
  and forward (the slow obvious reference; evaluation and direct calls of the layer);
- 'deferred': this rank's share is computed on the device (no host read) and kept in
  MoEStats.local_routing; reduce_pending then sums the shares of every layer and micro-batch of a step in
  ONE all-reduce over TP (the trainer's log steps);
- 'off': not computed (the trainer's other steps).
What training needs every step (the balance counts of the aux loss, the routed counts and histograms of
bias and quantile balancing) is computed in every mode; moe/balancing.py reduces those once per step.
Counting uses scatter_add, never torch.bincount or a boolean mask: on CUDA both read a size back to the host.
"""
from __future__ import annotations

from typing import Sequence

import torch

from megatron_mhmoe.moe.fixed_counts import fixed_bincount
from megatron_mhmoe.moe.routing import RoutingRecord
from megatron_mhmoe.parallel import comm

FIELDS = ("kept", "divergence", "fanout_groups", "fanout_ranks", "head_counts")
"""The MoEStats fields that the deferred statistics fill, in their order in the one all-reduce."""


def counts(ids: torch.Tensor, n: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(m,) ids in [0, n) -> (n,) int64 occurrences (weighted by 0/1 `weights` when given), on ids' device."""
    return fixed_bincount(ids, n, weights)


def distinct_histogram(experts: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(n*h, k) ids of token-major sub-tokens -> (h*k+1,) tokens by their number of distinct ids
    (metrics.divergence_histogram without bincount)."""
    S, k = experts.shape
    per_token = experts.reshape(S // num_heads, num_heads * k)  # (n, h*k)
    s, _ = per_token.sort(dim=1)
    distinct = 1 + (s[:, 1:] != s[:, :-1]).sum(dim=1)  # (n,)
    return counts(distinct, num_heads * k + 1)


def local_statistics(rec: RoutingRecord, num_experts: int, num_heads: int, route_groups: int,
                     num_local_experts: int) -> dict:
    """This rank's share of the routing statistics of one forward (MoEStats fields, int64 on the device)."""
    E, h = num_experts, num_heads
    experts = rec.choice.experts  # (S_local, k)
    kept = counts(rec.flat_experts, E, rec.keep)  # after capacity; every assignment when dropless
    # Sub-token i (token-major) is head i mod h; every one of its k choices counts.
    n_sub, k = experts.shape
    head = (torch.arange(n_sub, device=experts.device) % h).repeat_interleave(k)  # (S_local*k,)
    return {"kept": kept, "divergence": distinct_histogram(experts, h),
            "fanout_groups": distinct_histogram(experts // (E // route_groups), h),
            "fanout_ranks": distinct_histogram(experts // num_local_experts, h),
            "head_counts": counts(head * E + experts.reshape(-1), h * E).view(h, E)}


@torch.no_grad()
def reduce_pending(stats: Sequence, group) -> int:
    """Sum every pending MoEStats.local_routing over `group` (the TP group: a replica's ranks) in one
    all-reduce and fill the fields; returns how many stats it filled."""
    pending = [s for s in stats if getattr(s, "local_routing", None) is not None]
    if not pending:
        return 0
    parts = [s.local_routing[f].reshape(-1) for s in pending for f in FIELDS]
    flat = comm.all_reduce_(torch.cat(parts), group)
    pieces = iter(flat.split([p.numel() for p in parts]))
    for s in pending:
        for f in FIELDS:
            setattr(s, f, next(pieces).view(s.local_routing[f].shape))
        s.local_routing = None
    return len(pending)
