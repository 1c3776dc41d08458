"""Shared experts (DeepSeekMoE): always-on experts beside the routed ones, applied to every sub-token.

Where they act: on each sub-token (width d/h), between the head and the merge projections, as experts
every sub-token chooses with gate weight 1, of the routed experts' shape (d/h -> e_s -> d/h, the same
activation). Why the sub-token and not the token:
  - at h=1 (SMoE) a sub-token is the token, so this is exactly DeepSeekMoE's token-level shared expert;
  - at h>1 a shared expert has the routed experts' shape, so it costs what one more top-k choice costs
    (h sub-tokens x one expert's FLOPs per token, n (d/h) e_s weights), and the parameter/FLOPs matching
    of SMoE vs MH-MoE (moe/sizing.py) carries over unchanged with the shared expert added on both sides;
  - its output joins the routed output before the merge projection, so the merge mixes the heads of both.
A token-level shared expert (width d, outside the projections) of the same hidden width would cost the
same FLOPs per token but h x the weights, so the MH-MoE of a matched pair would gain more parameters from
it than its SMoE does.

Parallelism: no all-to-all. The weights are replicated on every EP rank (not expert parameters): like the
router they are non-expert parameters, averaged over DP; with TP each rank feeds them its own share of
the tokens, so the layer marks their gradients TP-partial (summed over TP) as it does the router's.

Several shared experts are one fused FFN of width n_s x e_s: with gate weight 1 each, the sum over the
n_s experts of W2_j act(x W1_j) is act(x [W1_1 .. W1_ns]) [W2_1; ..; W2_ns] (the activation is
elementwise), so expert j is columns [j e_s, (j+1) e_s) of w1 (and w3) and rows of w2. Biases: none, as
for the routed experts.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_mhmoe.parallel.init import set_init


class SharedExperts(nn.Module):
    def __init__(self, num_shared: int, d_in: int, d_hidden: int, activation: str, init: object,
                 output_init: object):
        super().__init__()
        self.num_shared, self.d_hidden, self.activation = num_shared, d_hidden, activation
        width = num_shared * d_hidden
        self.w1 = nn.Parameter(torch.empty(d_in, width))  # up (GELU) / gate (SwiGLU)
        self.w2 = nn.Parameter(torch.empty(width, d_in))  # down
        self.w3 = nn.Parameter(torch.empty(d_in, width)) if activation == "swiglu" else None
        for w, fn in ((self.w1, init), (self.w2, output_init), (self.w3, init)):
            if w is not None:
                set_init(w, fn)
                w.shared_expert = True  # GPTModel.num_params: counted h times in the active parameters

    def forward(self, x_sub: torch.Tensor) -> torch.Tensor:
        """x_sub (S, d/h) -> (S, d/h): the sum of the shared experts on every sub-token (one fused FFN)."""
        if self.activation == "swiglu":
            return (F.silu(x_sub @ self.w1) * (x_sub @ self.w3)) @ self.w2
        return F.gelu(x_sub @ self.w1) @ self.w2

    def forward_reference(self, x_sub: torch.Tensor) -> torch.Tensor:
        """Slow reference: each shared expert j on its own slice of the fused weights, summed."""
        y = torch.zeros_like(x_sub)
        e = self.d_hidden
        for j in range(self.num_shared):
            cols = slice(j * e, (j + 1) * e)
            w1, w2 = self.w1[:, cols], self.w2[cols]
            if self.activation == "swiglu":
                y = y + (F.silu(x_sub @ w1) * (x_sub @ self.w3[:, cols])) @ w2
            else:
                y = y + F.gelu(x_sub @ w1) @ w2
        return y
