"""Counting ids into a histogram of a size known in advance, without reading anything back to the host.

`torch.bincount(ids, minlength=M)` sizes its output by max(ids) + 1 when that exceeds M, so its shape
depends on the data: on CUDA it reads the maximum back (a host synchronisation), and torch.compile cannot
put it in a graph (a graph break, which also rules out CUDA graphs). Every histogram of the MoE layer has
a size fixed by the config (E, k*E, h*E, h*k+1, ...) and ids below it, so a scatter-add into zeros of that
size gives the same integers with a static shape.
"""
from __future__ import annotations

import torch


def fixed_bincount(ids: torch.Tensor, size: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(n,) int64 ids in [0, size) -> (size,) int64 counts, as torch.bincount(ids, minlength=size).

    weights (n,) integer or bool, optional: count each id weights[i] times (0/1 masks count only the kept)."""
    ids = ids.reshape(-1)
    add = torch.ones_like(ids) if weights is None else weights.reshape(-1).to(ids.dtype)
    return torch.zeros(size, dtype=torch.long, device=ids.device).scatter_add_(0, ids, add)


def fixed_bincount_reference(ids: torch.Tensor, size: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The obvious version (tests): torch.bincount over the ids a weight keeps."""
    ids = ids.reshape(-1)
    if weights is not None:
        ids = ids.repeat_interleave(weights.reshape(-1).long())
    return torch.bincount(ids, minlength=size)
