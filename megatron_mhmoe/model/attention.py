"""Causal self-attention with heads split over the TP group.

The fused QKV projection is column-parallel. Its full weight's output dim is laid out head-major,
[heads, 3 (q, k, v), head_dim], so a contiguous 1/TP slice of it holds whole heads with their own
q, k and v: each rank attends over its heads alone. The output projection is row-parallel over the
same head dims, so the block costs one all-reduce (or reduce-scatter with SP) forward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_mhmoe.config import ModelConfig
from megatron_mhmoe.model.rope import apply_rotary
from megatron_mhmoe.parallel import init as pinit
from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear


class SelfAttention(nn.Module):
    """x [s, b, d] (or [s/tp, b, d] with SP) -> same shape; causal, optional RoPE."""

    def __init__(self, config: ModelConfig, ctx: ParallelContext):
        super().__init__()
        if config.num_attention_heads % ctx.tp_size:
            raise ValueError(f"num_attention_heads {config.num_attention_heads} is not divisible by "
                             f"tensor-parallel size {ctx.tp_size} ({config.num_attention_heads} % "
                             f"{ctx.tp_size} = {config.num_attention_heads % ctx.tp_size})")
        self.num_heads_local = config.num_attention_heads // ctx.tp_size
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.use_rope = config.position_embedding == "rope"
        d = config.hidden_size
        self.qkv = ColumnParallelLinear(d, 3 * d, ctx, bias=True, init_method=pinit.normal(config.init_std))
        self.proj = RowParallelLinear(d, d, ctx, bias=True,
                                      init_method=pinit.scaled_normal(config.init_std, config.num_layers))

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                kv_cache=None, layer_idx: int = 0, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """kv_cache (model/kv_cache.KVCache, inference): attend over the cached positions too; rope then holds
        the tables of the new positions only. padding_mask (b, 1, s, past + s) bool from padded_attention:
        replaces the causal mask (it is causal itself)."""
        qkv = self.qkv(x)  # (s, b, nh_local * 3 * hd): full sequence even with SP
        s, b = qkv.shape[:2]
        qkv = qkv.view(s, b, self.num_heads_local, 3, self.head_dim)  # (s, b, nh_local, 3, hd)
        qkv = qkv.permute(3, 1, 2, 0, 4)  # (3, b, nh_local, s, hd)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (b, nh_local, s, hd) each
        if self.use_rope:
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        mask, causal = None, True
        if padding_mask is not None:
            if kv_cache is not None:
                k, v = kv_cache.append(layer_idx, k, v)  # (b, nh_local, past + s, hd)
            mask, causal = padding_mask, False
        elif kv_cache is not None:
            past = kv_cache.offset
            k, v = kv_cache.append(layer_idx, k, v)  # (b, nh_local, past + s, hd)
            if past:
                # New query i sits at position past + i and may see keys 0 .. past + i.
                causal = False
                if s > 1:
                    pos_q = torch.arange(s, device=x.device).unsqueeze(1) + past  # (s, 1)
                    mask = torch.arange(past + s, device=x.device).unsqueeze(0) <= pos_q  # (s, past + s)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        # (b, nh_local, s, hd) -> (s, b, nh_local * hd)
        out = out.permute(2, 0, 1, 3).reshape(s, b, self.num_heads_local * self.head_dim)
        return self.proj(out)


def padded_attention(attention_mask: torch.Tensor, s: int, past: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a padding mask (b, past + s), 1 = token, 0 = padding (transformers' attention_mask): the positions
    (b, s) of the s new tokens and the attention mask (b, 1, s, past + s) bool, True = may attend.

    1. A token's position counts the real tokens before it (cumsum of the mask - 1; a pad gets 0), so a
       left-padded row computes what the prompt computes alone.
    2. Query i (column past + i) sees the columns <= past + i that are not padding;
    3. and itself, so that a pad query (which sees no real token) stays finite; its output is never read.
    The exported transformers model (megatron_mhmoe/hf/modeling_mhmoe.py) carries its own copy.
    """
    b, t = attention_mask.shape
    if t != past + s:
        raise ValueError(f"attention_mask covers {t} positions, not the {past} cached + {s} new = {past + s}")
    # 1.
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (b, s)
    # 2.
    col = torch.arange(t, device=attention_mask.device)
    query_col = col[past:].unsqueeze(1)  # (s, 1)
    allowed = (col.unsqueeze(0) <= query_col).unsqueeze(0) & attention_mask.bool().unsqueeze(1)  # (b, s, t)
    # 3.
    allowed |= (col.unsqueeze(0) == query_col).unsqueeze(0)
    return positions, allowed.unsqueeze(1)
