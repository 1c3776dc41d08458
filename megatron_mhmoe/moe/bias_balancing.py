"""Aux-loss-free load balancing (DeepSeek-V3, Wang et al. 2024): a per-expert bias on the routing scores.

The bias b (E,) shifts which experts a sub-token chooses (top-k of scores + b) but not how their outputs
are weighed (the gates use the unbiased scores), so balancing adds no gradient that competes with the
language-model loss. It is not trained: after each applied optimizer step,

    b_e <- b_e + gamma * sign(mean_c - c_e),    mean_c = (1/E) sum_e c_e,

where c_e counts the assignments to expert e (all k choices of every sub-token, before capacity) over the
whole global batch: every DP replica and every gradient-accumulation micro-batch. An overloaded expert's
bias falls by gamma, an underloaded one's rises by gamma, a balanced one's stays. Every rank applies the
same update to the same all-reduced counts, so the bias is identical on every rank.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def bias_update(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> torch.Tensor:
    """The rule above: (E,) bias, (E,) global-batch counts -> the new (E,) bias (same dtype as bias)."""
    c = counts.double()
    step = torch.sign(c.mean() - c)  # (E,) +1 underloaded, -1 overloaded, 0 at the mean
    return bias + (rate * step).to(bias.dtype)


class ExpertBias(nn.Module):
    """The bias as a persistent fp32 buffer `value` (E,): saved in the model's state dict (checkpoints,
    resharding and export carry it as a replicated buffer), outside the optimizer, and kept fp32 when the
    model is cast to bf16/fp16 (the steps of size gamma would round away in bf16)."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.register_buffer("value", torch.zeros(num_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.value.dtype != torch.float32:  # a dtype cast of the whole model (module.bfloat16())
            self._buffers["value"] = self.value.float()
        return self

    @torch.no_grad()
    def update(self, counts: torch.Tensor, rate: float) -> None:
        self.value.copy_(bias_update(self.value, counts.to(self.value.device), rate))

    def extra_repr(self) -> str:
        return f"num_experts={self.value.numel()}"
