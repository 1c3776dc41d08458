"""Key/value cache for incremental decoding (single process, inference only).

Each attention layer appends the keys and values of the new positions and attends over everything cached so
far, so generating token t costs one position's forward instead of t. Token routing in an MoE layer is per
sub-token, so a cached forward routes exactly as the full forward does when routing is dropless
(capacity_factor <= 0); with a capacity, a full forward decides drops over all positions at once and a cached
one over the new positions only, so the two can differ.
"""
from __future__ import annotations

from typing import Optional

import torch


class KVCache:
    """Per-layer (k, v) of shape (b, nh, t, hd), and t: the number of positions cached."""

    def __init__(self, num_layers: int):
        self.keys: list[Optional[torch.Tensor]] = [None] * num_layers
        self.values: list[Optional[torch.Tensor]] = [None] * num_layers
        self.offset = 0
        """Positions already cached (in every layer): the position of the next token fed."""

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache the new positions' k, v (b, nh, s_new, hd) of `layer`; all of that layer's k, v so far."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)  # (b, nh, t + s_new, hd)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def advance(self, s_new: int) -> None:
        """Called once per forward, after every layer appended its s_new positions."""
        self.offset += s_new
