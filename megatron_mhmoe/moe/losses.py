"""Auxiliary router losses from replica-wide sums (the dispatcher provides the sums).

All three balance losses are E * sum_e f_e P_e (Switch Transformer, Fedus et al. 2021, Eq. 4; DeepSeek-V3,
arXiv 2412.19437, Eqs. 17-20; the global-batch form: Qwen, arXiv 2501.11873). P_e is the mean router
probability of e (the gradient path); f_e = counts_e / (choices x sub-tokens) is a constant, where counts
and choices follow MoEConfig.balance_counting:
  'topk' (default; DeepSeek-V3 Eq. 18, Megatron-core's compute_routing_scores_for_aux_loss): counts_e =
      sub-tokens with e among the top-k of their UNBIASED scores over all experts (no bias, no group limit),
      every one of the k choices counted, choices = k;
  'first_choice' (GShard / Switch's top-1 fraction): counts_e = sub-tokens whose routed first choice (after
      bias and group limit) is e, choices = 1.
At k = 1 without a bias or a group limit both are the MH-MoE paper's top-1 fraction. Uniform routing
gives 1 in either form.
"""
from __future__ import annotations

import torch


def load_balance_loss(prob_sum: torch.Tensor, counts: torch.Tensor, num_sub_tokens: int,
                      choices: int = 1) -> torch.Tensor:
    """E * sum_e f_e * P_e over the sub-tokens of one routing group.

    prob_sum: (E,) sum over sub-tokens of the router probabilities (carries the gradient);
    counts: (E,) the balance counts (no gradient); choices: what f divides them by besides the sub-tokens.
    """
    E = prob_sum.shape[0]
    f = counts.to(prob_sum.dtype) / (num_sub_tokens * choices)  # (E,)
    P = prob_sum / num_sub_tokens  # (E,)
    return E * torch.sum(f * P)


def sequence_balance_loss(prob_sums: torch.Tensor, counts: torch.Tensor, sub_tokens_per_seq: int,
                          choices: int = 1) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss (Eqs. 17-20): (1/B) sum_b E * sum_e f_{b,e} P_{b,e}.

    prob_sums: (B, E) per sequence b, the sum of the router probabilities of its sub-tokens (gradient);
    counts: (B, E) its balance counts; sub_tokens_per_seq: s * h (the same for every sequence of a
    micro-batch). f_{b,e} divides by choices x it, P_{b,e} by it, as the micro-batch loss does by S.
    """
    B, E = prob_sums.shape
    per = max(sub_tokens_per_seq, 1)
    f = counts.to(prob_sums.dtype) / (per * choices)
    P = prob_sums / per
    return E * (f * P).sum() / max(B, 1)


def global_balance_loss(prob_sum: torch.Tensor, num_sub_tokens: int, global_counts: torch.Tensor,
                        global_sub_tokens: float, choices: int = 1) -> torch.Tensor:
    """E * sum_e f_e^global P_e^local: P from this routing group (gradient), f from constant counts.

    global_counts: (E,) balance counts over the DP group of this micro-batch plus the step's earlier
    micro-batches (running counts, as Megatron-core's global-batch loss); global_sub_tokens: their sub-tokens.
    """
    E = prob_sum.shape[0]
    f = global_counts.to(prob_sum.dtype) / (max(global_sub_tokens, 1) * choices)
    P = prob_sum / max(num_sub_tokens, 1)
    return E * (f * P).sum()
