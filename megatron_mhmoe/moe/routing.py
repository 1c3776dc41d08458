"""One routing record per MoE forward: the decision and everything derived from it, computed once.

Capacity, the dispatcher and the statistics all work on the assignments in choice-major order (flat
index f = j*S + i for sub-token i's j-th choice); the record holds that flattening, its stable sort by
expert, the counts and the keep mask, so none of them re-derives another's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_mhmoe.moe import capacity as cap
from megatron_mhmoe.moe.router import TopK


def choice_major(experts: torch.Tensor) -> torch.Tensor:
    """(S, k) expert ids -> (k*S,) in choice-major order: all first choices, then all second choices..."""
    return experts.t().reshape(-1)


@dataclass
class RoutingRecord:
    """The routing of one forward's local sub-tokens (S of this rank, k choices each)."""

    choice: TopK
    """Probabilities, chosen experts (S, k), gates (S, k) and logsumexp."""
    flat_experts: torch.Tensor
    """(k*S,) choice-major expert ids."""
    order: torch.Tensor
    """(k*S,) stable argsort of flat_experts: grouped by expert, queue order within an expert."""
    local_counts: torch.Tensor
    """(k, E) this rank's sub-tokens whose j-th choice is e."""
    counts_all: torch.Tensor
    """(TP, k, E) every TP rank's local_counts (the replica's routing group)."""
    capacity: int
    """Per-expert capacity over the replica; 0 = dropless."""
    keep: Optional[torch.Tensor]
    """(k*S,) choice-major: the assignment fits the capacity; None when dropless."""

    @property
    def experts(self) -> torch.Tensor:
        return self.choice.experts

    @property
    def gates(self) -> torch.Tensor:
        return self.choice.gates


def build_record(choice: TopK, num_experts: int, capacity: int, dispatcher, tp_rank: int) -> RoutingRecord:
    """Counts (exchanged over TP by `dispatcher`), sort and keep mask for a routing decision.

    tp_rank: this rank's place among the TP ranks sharing the replica (0 when there is one)."""
    flat = choice_major(choice.experts)
    k = choice.experts.shape[1]
    local_counts = cap.choice_counts(flat, k, num_experts)
    counts_all = dispatcher.replica_counts(local_counts)
    # One stable sort of the choice-major expert ids serves capacity and dispatch.
    order = torch.argsort(flat, stable=True)
    keep = cap.capacity_keep(choice.experts, counts_all, tp_rank, capacity, order, flat) if capacity > 0 else None
    return RoutingRecord(choice=choice, flat_experts=flat, order=order, local_counts=local_counts,
                         counts_all=counts_all, capacity=capacity, keep=keep)


def dispatch_record(experts: torch.Tensor, gates: torch.Tensor, keep: Optional[torch.Tensor] = None,
                    order: Optional[torch.Tensor] = None, flat: Optional[torch.Tensor] = None) -> RoutingRecord:
    """A record of bare routing tensors for a dispatch path (no router, no counts over TP, capacity 0):
    experts/gates (S, k), keep (k*S,) choice-major or None, the flattening and its stable sort if known."""
    flat = choice_major(experts) if flat is None else flat
    order = torch.argsort(flat, stable=True) if order is None else order
    choice = TopK(probs=gates.new_zeros(0), experts=experts, gates=gates, lse=gates.new_zeros(0))
    return RoutingRecord(choice=choice, flat_experts=flat, order=order, local_counts=None, counts_all=None,
                         capacity=0, keep=keep)
