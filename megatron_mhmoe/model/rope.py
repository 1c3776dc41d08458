"""Rotary position embeddings (RoPE, Su et al. 2021), "rotate half" convention (GPT-NeoX / LLaMA).

The cos/sin tables are computed in fp32 per forward from positions, not stored as buffers: a buffer
would be cast to bf16 with the model and lose precision at large positions, and the cost
(s x head_dim/2 trig ops once per forward, shared by all layers) is negligible.
"""
from __future__ import annotations

import torch


def rotary_tables(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, each (s, head_dim/2) fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)  # (s, hd/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + hd/2]) by the position's angle. x: (b, nh, s, hd); cos/sin: (s, hd/2)."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]  # (b, nh, s, hd/2) each
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (b, nh, s, hd)
    return out.to(x.dtype)
