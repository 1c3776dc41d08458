"""DeepSpeed's own MoE layer (deepspeed.moe.layer.MoE) set up to route exactly like one of our layers.

Same experts (weights copied), same softmax gate weights, k, capacity factor and drop order (GShard:
all first choices before second choices), no noise: for k <= 2 its output equals ours, which the
benchmark checks before timing. For MH-MoE it runs at the sub-token shape (N*h rows of width d/h)
between copies of our head and merge projections, so the two layers do the same useful work.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


class DSExpert(nn.Module):
    """One expert FFN as DeepSpeed expects it: a module DeepSpeed deep-copies E times."""

    def __init__(self, d_in: int, d_hidden: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden, bias=False)
        self.fc2 = nn.Linear(d_hidden, d_in, bias=False)
        self.fc3 = nn.Linear(d_in, d_hidden, bias=False) if activation == "swiglu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc3 is not None:
            return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))
        return self.fc2(F.gelu(self.fc1(x)))


class DeepSpeedMHMoE(nn.Module):
    """head -> split into sub-tokens -> deepspeed MoE -> merge, with the weights of `ours` (an MHMoELayer)."""

    def __init__(self, ours: nn.Module):
        super().__init__()
        from deepspeed.moe.layer import MoE  # after init_deepspeed_single: MoE builds process groups

        moe = ours.moe
        if moe.gate != "softmax":
            raise ValueError(f"DeepSpeed's gate is Linear+softmax: build ours with gate='softmax', not {moe.gate!r}")
        self.h, self.d_sub = moe.num_heads, ours.d_sub
        self.head = copy.deepcopy(ours.head)
        self.merge = copy.deepcopy(ours.merge)
        expert = DSExpert(self.d_sub, moe.expert_hidden_size, moe.expert_activation)
        cf = moe.capacity_factor
        self.moe = MoE(hidden_size=self.d_sub, expert=expert, num_experts=moe.num_experts, ep_size=1, k=moe.top_k,
                       capacity_factor=cf, eval_capacity_factor=cf, min_capacity=0, drop_tokens=cf > 0,
                       use_rts=False, top2_2nd_expert_sampling=False)
        self.moe.set_deepspeed_parallelism()
        with torch.no_grad():
            self.moe.deepspeed_moe.gate.wg.weight.copy_(ours.router.proj.weight)
            for e, ex in enumerate(self.moe.deepspeed_moe.experts.deepspeed_experts):
                ex.fc1.weight.copy_(ours.experts.w1[e].t())  # (f, d_sub) = w1[e]^T
                ex.fc2.weight.copy_(ours.experts.w2[e].t())  # (d_sub, f) = w2[e]^T
                if ex.fc3 is not None:
                    ex.fc3.weight.copy_(ours.experts.w3[e].t())
        self.to(device=ours.experts.w1.device, dtype=ours.experts.w1.dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, d) -> y (N, d), load-balance loss."""
        n, d = x.shape
        x_hat = self.head(x) if self.head is not None else x  # (N, d)
        x_sub = x_hat.reshape(n * self.h, self.d_sub)  # (N*h, d/h) token-major, as ours
        y_sub, l_aux, _ = self.moe(x_sub)  # (N*h, d/h)
        y = y_sub.reshape(n, d)  # (N, d)
        return (self.merge(y) if self.merge is not None else y), l_aux
