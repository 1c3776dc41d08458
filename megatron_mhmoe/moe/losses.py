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


def sequence_balance_loss(prob_sums: torch.Tensor, top1_counts: torch.Tensor, sub_tokens_per_seq: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss: (1/B) sum_b E * sum_e f_{b,e} P_{b,e}.

    prob_sums: (B, E) per sequence b, the sum of the router probabilities of its sub-tokens (gradient);
    top1_counts: (B, E) its sub-tokens whose first choice is e; sub_tokens_per_seq: s * h (the same for
    every sequence of a micro-batch). f_{b,e} and P_{b,e} divide by it, as the micro-batch loss does by S.
    """
    B, E = prob_sums.shape
    per = max(sub_tokens_per_seq, 1)
    f = top1_counts.to(prob_sums.dtype) / per
    P = prob_sums / per
    return E * (f * P).sum() / max(B, 1)


def global_balance_loss(prob_sum: torch.Tensor, num_sub_tokens: int, global_top1: torch.Tensor,
                        global_sub_tokens: float) -> torch.Tensor:
    """E * sum_e f_e^global P_e^local: P from this routing group (gradient), f from constant counts.

    global_top1: (E,) first-choice counts over the DP group of this micro-batch plus the step's earlier
    micro-batches (running counts, as Megatron-core's global-batch loss); global_sub_tokens: their sub-tokens.
    """
    E = prob_sum.shape[0]
    f = global_top1.to(prob_sum.dtype) / max(global_sub_tokens, 1)
    P = prob_sum / max(num_sub_tokens, 1)
    return E * (f * P).sum()
