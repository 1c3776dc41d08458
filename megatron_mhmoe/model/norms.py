"""LayerNorm and RMSNorm that know about sequence parallelism.

With sequence parallelism each TP rank normalises a different s/TP slice of the tokens, so the
norm's weight and bias receive partial gradients that must be summed over TP (`mark_tp_partial`).
Without it every TP rank sees the same tokens and the gradients are already equal.
Statistics are computed in fp32 whatever the activation dtype (bf16 variance is too coarse).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_mhmoe.config import ModelConfig
from megatron_mhmoe.parallel import init as pinit
from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.parallel.params import mark_tp_partial


def _mark(p: nn.Parameter, ctx: ParallelContext, init) -> nn.Parameter:
    pinit.set_init(p, init)
    if ctx.sequence_parallel:
        mark_tp_partial(p)
    return p


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dim."""

    def __init__(self, dim: int, eps: float, ctx: ParallelContext):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = _mark(nn.Parameter(torch.ones(dim)), ctx, pinit.ones())
        self.bias = _mark(nn.Parameter(torch.zeros(dim)), ctx, pinit.zeros())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.float(), (self.dim,), self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dim (no centring, no bias)."""

    def __init__(self, dim: int, eps: float, ctx: ParallelContext):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = _mark(nn.Parameter(torch.ones(dim)), ctx, pinit.ones())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (self.dim,), self.weight.float(), self.eps)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


def build_norm(config: ModelConfig, ctx: ParallelContext) -> nn.Module:
    cls = LayerNorm if config.norm == "layernorm" else RMSNorm
    return cls(config.hidden_size, config.norm_eps, ctx)
