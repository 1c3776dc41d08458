"""The local experts of one rank: FFN(d/h -> d_expert -> d/h), GELU or SwiGLU, no biases.

Weights are stacked along dim 0 ([E_local, ...]) so that expert parallelism is a split of that dim
and a grouped GEMM can take them whole. `forward` runs on rows already grouped by expert with exact
counts (no padding to a capacity); `forward_reference` is the slow, obvious version used by tests.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_mhmoe.moe.grouped_ffn import grouped_ffn, grouped_ffn_combine
from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.parallel.init import set_init
from megatron_mhmoe.parallel.params import mark_expert


class GroupedExperts(nn.Module):
    def __init__(self, num_local_experts: int, d_in: int, d_hidden: int, activation: str,
                 ctx: ParallelContext, init: object, output_init: object):
        super().__init__()
        self.num_local_experts = num_local_experts
        self.activation = activation
        self.w1 = nn.Parameter(torch.empty(num_local_experts, d_in, d_hidden))  # up (GELU) / gate (SwiGLU)
        self.w2 = nn.Parameter(torch.empty(num_local_experts, d_hidden, d_in))  # down
        self.w3 = nn.Parameter(torch.empty(num_local_experts, d_in, d_hidden)) if activation == "swiglu" else None
        for w, fn in ((self.w1, init), (self.w2, output_init), (self.w3, init)):
            if w is not None:
                mark_expert(w, ctx, dim=0)
                set_init(w, fn)

    def _ffn(self, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3) -> torch.Tensor:
        if self.activation == "swiglu":
            return (F.silu(x @ w1) * (x @ w3)) @ w2
        return F.gelu(x @ w1) @ w2

    def forward(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """rows (sum(counts), d_in) grouped by local expert -> (sum(counts), d_in).

        One autograd node over all experts (grouped_ffn.py): GEMMs on exact counts into preallocated
        slices, weight gradients written in place, an expert without rows gets an exact zero gradient
        (so the EDP all-reduce never waits for a missing one).
        """
        return grouped_ffn(rows, self.w1, self.w2, self.w3, counts, self.activation == "swiglu")

    def forward_padded(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (E_local, M, d_in): M rows per expert, as the capacity-slot dispatch gives them -> same shape.

        Batched GEMMs by autograd: static shapes and no Python-side counts, which is what torch.compile
        (fullgraph) and CUDA graphs need. Empty slots are zero rows: with no biases and act(0) = 0 they give
        zero outputs and add nothing to the weight gradients, as in `forward`."""
        w1, w2, w3 = self.w1.to(rows.dtype), self.w2.to(rows.dtype), self.w3
        if self.activation == "swiglu":
            return torch.bmm(F.silu(torch.bmm(rows, w1)) * torch.bmm(rows, w3.to(rows.dtype)), w2)
        return torch.bmm(F.gelu(torch.bmm(rows, w1)), w2)  # (E_local, M, d_in)

    def forward_combine(self, x: torch.Tensor, src: torch.Tensor, weights: torch.Tensor, counts: list[int],
                        num_rows: int):
        """EP=1: zeros(num_rows, d_in).index_add(0, src, weights[:, None] * forward(x[src], counts)) as one
        node that never builds the gathered rows (grouped_ffn.grouped_ffn_combine); None where the caller
        must take the separate gather / forward / combine path."""
        return grouped_ffn_combine(x, src, weights, self.w1, self.w2, self.w3, counts,
                                   self.activation == "swiglu", num_rows)

    def forward_loop(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The same maths by autograd over a per-expert loop (benchmarks compare it with forward)."""
        # unbind, not W[e] in the loop: indexing a stacked parameter makes autograd allocate a
        # full-size gradient buffer per expert.
        w1s, w2s = self.w1.unbind(0), self.w2.unbind(0)
        w3s = self.w3.unbind(0) if self.w3 is not None else [None] * self.num_local_experts
        chunks = rows.split(counts, dim=0)
        outs = [self._ffn(c, w1, w2, w3) for c, w1, w2, w3 in zip(chunks, w1s, w2s, w3s)]
        return torch.cat(outs, dim=0)

    def forward_reference(self, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Slow reference: y[i] = sum_j gates[i, j] * FFN_{expert_ids[i, j]}(x[i]), skipping ids < 0.

        x (S, d_in), expert_ids (S, k) local ids (-1 = dropped), gates (S, k).
        """
        y = torch.zeros_like(x)
        for e in range(self.num_local_experts):
            w3 = self.w3[e] if self.w3 is not None else None
            for j in range(expert_ids.shape[1]):
                rows = (expert_ids[:, j] == e).nonzero().flatten()
                if rows.numel():
                    out = self._ffn(x[rows], self.w1[e], self.w2[e], w3)
                    y = y.index_add(0, rows, out * gates[rows, j:j + 1].to(out.dtype))
        return y
