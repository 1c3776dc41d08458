"""Tensor-parallel layers (Megatron conventions).

- Weights are [out, in] (torch.nn.Linear). A column-parallel linear splits `out` (dim 0) over the TP
  group, a row-parallel linear splits `in` (dim 1). Column(out) followed by Row(in) needs no
  communication between them: the pair costs one all-reduce forward and one backward.
- Activations are [s, b, d] (sequence first), so sequence parallelism splits dim 0.
- Without sequence parallelism the activations between blocks are replicated over TP:
  column input: copy_to_region (identity fwd, all-reduce bwd); row output: reduce_from_region.
  With sequence parallelism (ctx.sequence_parallel) they are split along the sequence:
  column input: gather_from_sequence_region (all-gather fwd, reduce-scatter bwd); row output:
  reduce_scatter_to_sequence_region (reduce-scatter fwd, all-gather bwd). Same bytes as one
  all-reduce, but norms/dropout/residual adds run on s/TP tokens.
- Every TP-split parameter is marked with `params.mark_tp`; replicated parameters that see only this
  rank's tokens under sequence parallelism (row bias) are marked `params.mark_tp_partial`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_mhmoe.parallel import comm
from megatron_mhmoe.parallel import init as pinit
from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.parallel.params import mark_tp, mark_tp_partial


def _divide(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ValueError(f"{what} {n} is not divisible by tensor-parallel size {tp} ({n} % {tp} = {n % tp})")
    return n // tp


def enter_column_region(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Make the input of column-parallel layers: the full sequence, replicated over TP.

    With SP, x is [s/tp, ...] and is all-gathered along dim 0 (backward: reduce-scatter, because every
    TP rank's column shard contributes a partial input gradient for all tokens). Without SP, x is
    already full and replicated: identity forward, all-reduce backward for the same reason.
    Call it once when several column-parallel layers read the same input (QKV; SwiGLU gate and up).
    """
    if ctx.sequence_parallel:
        return comm.gather_from_sequence_region(x, 0, ctx.tp_group)
    return comm.copy_to_region(x, ctx.tp_group)


def leave_row_region(y: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Sum the partial outputs of a row-parallel layer: all-reduce, or reduce-scatter along s with SP."""
    if ctx.sequence_parallel:
        return comm.reduce_scatter_to_sequence_region(y, 0, ctx.tp_group)
    return comm.reduce_from_region(y, ctx.tp_group)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W [out, in] split along `out`: this rank computes out/TP output features.

    Input: [s, b, in] (or [s/tp, b, in] with sequence parallelism); output: [s, b, out/tp].
    `vocab=True` marks the output dim as a padded vocabulary (LM head): `out_features` is then the
    padded size and the full tensors of checkpoints/init hold the true vocabulary.
    """

    def __init__(self, in_features: int, out_features: int, ctx: ParallelContext, bias: bool = True,
                 init_method: Optional[pinit.InitMethod] = None, vocab: bool = False):
        super().__init__()
        self.ctx = ctx
        self.in_features = in_features
        self.out_features = out_features
        self.out_local = _divide(out_features, ctx.tp_size, "column-parallel out_features")
        self.weight = nn.Parameter(torch.empty(self.out_local, in_features))
        mark_tp(self.weight, 0, vocab=vocab)
        pinit.set_init(self.weight, init_method)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_local))
            mark_tp(self.bias, 0, vocab=vocab)
            pinit.set_init(self.bias, pinit.zeros())
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, input_in_region: bool = False) -> torch.Tensor:
        """`input_in_region=True`: x already went through `enter_column_region` (shared input)."""
        if not input_in_region:
            x = enter_column_region(x, self.ctx)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features} (local {self.out_local}), "
                f"bias={self.bias is not None}")


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W [out, in] split along `in`; x is already split (a column layer's output).

    Input: [s, b, in/tp]; output: [s, b, out] replicated, or [s/tp, b, out] with sequence parallelism.
    The bias is replicated and added after the reduction (else it would be summed TP times).
    """

    def __init__(self, in_features: int, out_features: int, ctx: ParallelContext, bias: bool = True,
                 init_method: Optional[pinit.InitMethod] = None):
        super().__init__()
        self.ctx = ctx
        self.in_features = in_features
        self.out_features = out_features
        self.in_local = _divide(in_features, ctx.tp_size, "row-parallel in_features")
        self.weight = nn.Parameter(torch.empty(out_features, self.in_local))
        mark_tp(self.weight, 1)
        pinit.set_init(self.weight, init_method)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features))
            pinit.set_init(self.bias, pinit.zeros())
            if ctx.sequence_parallel:
                # Added to this rank's s/tp tokens only: its gradient is a partial sum over TP.
                mark_tp_partial(self.bias)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = leave_row_region(F.linear(x, self.weight), self.ctx)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in={self.in_features} (local {self.in_local}), out={self.out_features}, "
                f"bias={self.bias is not None}")


def vocab_range(padded_vocab: int, ctx: ParallelContext) -> tuple[int, int]:
    """[start, end) of the padded-vocabulary ids this TP rank holds."""
    local = padded_vocab // ctx.tp_size
    return ctx.tp_rank * local, (ctx.tp_rank + 1) * local


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the (padded) vocabulary split over TP.

    Each rank looks up the ids in its range, writes zeros for the others, and the TP group sums:
    all-reduce -> [s, b, d] replicated, or reduce-scatter along s -> [s/tp, b, d] with SP.
    Padded rows (ids >= vocab_size) start at zero and are never looked up.
    """

    def __init__(self, vocab_size: int, padded_vocab: int, embedding_dim: int, ctx: ParallelContext,
                 init_method: Optional[pinit.InitMethod] = None):
        super().__init__()
        if padded_vocab < vocab_size:
            raise ValueError(f"padded vocabulary {padded_vocab} < vocabulary {vocab_size}")
        self.ctx = ctx
        self.vocab_size = vocab_size
        self.padded_vocab = padded_vocab
        self.embedding_dim = embedding_dim
        local = _divide(padded_vocab, ctx.tp_size, "padded vocabulary")
        self.vocab_start, self.vocab_end = vocab_range(padded_vocab, ctx)
        self.weight = nn.Parameter(torch.empty(local, embedding_dim))
        mark_tp(self.weight, 0, vocab=True)
        pinit.set_init(self.weight, init_method)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [s, b] long -> [s, b, d] (or [s/tp, b, d] with sequence parallelism)."""
        if self.ctx.tp_size > 1:
            outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
            local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
            out = F.embedding(local_ids, self.weight)  # (s, b, d)
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        else:
            out = F.embedding(ids, self.weight)  # (s, b, d)
        if self.ctx.sequence_parallel:
            return comm.reduce_scatter_to_sequence_region(out, 0, self.ctx.tp_group)  # (s/tp, b, d)
        return comm.reduce_from_region(out, self.ctx.tp_group)

    def extra_repr(self) -> str:
        return (f"vocab={self.vocab_size} (padded {self.padded_vocab}, local [{self.vocab_start}, "
                f"{self.vocab_end})), dim={self.embedding_dim}")


def parallel_lm_logits(x: torch.Tensor, weight: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Logits over this rank's vocab shard from a vocab-split weight [V_local, d] (e.g. a tied embedding).

    x: [s, b, d] (or [s/tp, b, d] with SP) -> [s, b, V_local]. The logits stay split over the vocab:
    the vocab-parallel cross-entropy consumes them without gathering.
    """
    return F.linear(enter_column_region(x, ctx), weight)
