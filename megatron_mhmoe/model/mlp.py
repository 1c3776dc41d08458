"""The FFN slot of a transformer block: dense tensor-parallel MLP, or the MH-MoE layer.

Contract for every FFN module: `forward(x) -> (y, stats)` with x, y [s, b, d] ([s/tp, b, d] with
sequence parallelism); `stats` is None for the dense MLP and, for MoE, an object with 0-dim tensor
attributes `aux_loss` and `z_loss` (plus whatever metrics the MoE layer reports).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_mhmoe.config import ModelConfig
from megatron_mhmoe.parallel import init as pinit
from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear, enter_column_region


class ParallelMLP(nn.Module):
    """Dense FFN, hidden dim split over TP.

    gelu:   fc1 (column) -> GELU -> fc2 (row)
    swiglu: silu(gate(x)) * up(x) with gate, up column-parallel -> down (row). gate and up are two
            layers (not one fused [2 ffn, d] weight) so a contiguous TP split of each stays aligned.
    """

    def __init__(self, config: ModelConfig, ctx: ParallelContext):
        super().__init__()
        d, f = config.hidden_size, config.ffn_hidden_size
        self.ctx = ctx
        self.activation = config.activation
        w_in = pinit.normal(config.init_std)
        w_out = pinit.scaled_normal(config.init_std, config.num_layers)
        if self.activation == "gelu":
            self.fc1 = ColumnParallelLinear(d, f, ctx, bias=True, init_method=w_in)
            self.fc2 = RowParallelLinear(f, d, ctx, bias=True, init_method=w_out)
        else:
            # LLaMA-style SwiGLU: no biases.
            self.gate = ColumnParallelLinear(d, f, ctx, bias=False, init_method=w_in)
            self.up = ColumnParallelLinear(d, f, ctx, bias=False, init_method=w_in)
            self.down = RowParallelLinear(f, d, ctx, bias=False, init_method=w_out)

    def forward(self, x: torch.Tensor):
        if self.activation == "gelu":
            return self.fc2(F.gelu(self.fc1(x))), None
        x = enter_column_region(x, self.ctx)  # once for both column layers (one all-gather with SP)
        h = F.silu(self.gate(x, input_in_region=True)) * self.up(x, input_in_region=True)  # (s, b, f/tp)
        return self.down(h), None


def build_ffn(config: ModelConfig, ctx: ParallelContext, layer_idx: int) -> nn.Module:
    """The FFN of block `layer_idx`: MH-MoE on MoE layers (config.is_moe_layer), dense otherwise.

    The MoE layer handles its own TP token split/gather, so it is not wrapped in copy/reduce regions.
    Imported lazily: dense models do not need the MoE package.
    """
    if config.is_moe_layer(layer_idx):
        from megatron_mhmoe.moe.layer import MHMoELayer
        return MHMoELayer(config, ctx, layer_idx)
    return ParallelMLP(config, ctx)
