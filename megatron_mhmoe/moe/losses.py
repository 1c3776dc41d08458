"""Auxiliary router losses from replica-wide sums (the dispatcher provides the sums)."""
from __future__ import annotations

import torch


def load_balance_loss(prob_sum: torch.Tensor, top1_counts: torch.Tensor, num_sub_tokens: int) -> torch.Tensor:
    """E * sum_e f_e * P_e (Switch/GShard), over the sub-tokens of one routing group.

    prob_sum: (E,) sum over sub-tokens of the router probabilities (carries the gradient);
    top1_counts: (E,) sub-tokens whose first choice is e (no gradient). Equals 1 when routing is uniform.
    """
    E = prob_sum.shape[0]
    f = top1_counts.to(prob_sum.dtype) / num_sub_tokens  # (E,)
    P = prob_sum / num_sub_tokens  # (E,)
    return E * torch.sum(f * P)
