"""Cross-entropy over logits that are split along the vocabulary across the TP group.

Gathering [s, b, V] logits would cost V/TP times more memory than needed; instead each rank keeps
its shard and the TP group exchanges three [s, b] tensors (Megatron's vocab-parallel CE):
1. m = max over the vocab (all-reduce MAX) -- for a stable exp;
2. the target's logit z_t (each rank contributes it only when the target is in its range; all-reduce SUM);
3. sum_v exp(z_v - m) (all-reduce SUM).
loss = log(sum exp) - (z_t - m). The backward needs no communication: d loss / d z_v = softmax_v - [v == t]
on this rank's columns.

Padded vocabulary entries (ids >= vocab_size, present because the vocabulary is padded to a multiple
of make_vocab_divisible_by x TP) are set to -inf: the loss must not depend on how much padding a TP
size implies.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_mhmoe.parallel import comm
from megatron_mhmoe.parallel.context import ParallelContext


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, vocab_size):
        # logits: (..., V_local) this rank's columns [vocab_start, vocab_start + V_local); target: (...)
        v_local = logits.shape[-1]
        # At least fp32 (bf16 exp/sum loses the loss); float64 stays float64.
        z = logits.to(torch.promote_types(logits.dtype, torch.float32))
        n_real = max(0, min(v_local, vocab_size - vocab_start))  # columns that are real vocabulary
        if n_real < v_local:
            # Not in place: z is the caller's tensor when the dtype did not change.
            pad = torch.arange(v_local, device=z.device) >= n_real
            z = z.masked_fill(pad, float("-inf"))

        # 1. global max (a constant for autograd: it cancels out of the loss)
        m = z.max(dim=-1).values  # (...)
        if group is not None:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        z = z - m.unsqueeze(-1)

        # 2. target logit, contributed by the rank that holds the target id
        outside = (target < vocab_start) | (target >= vocab_start + v_local)
        t_local = (target - vocab_start).masked_fill(outside, 0)
        z_t = z.gather(-1, t_local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)  # (...)
        comm.all_reduce_(z_t, group)

        # 3. partition function
        e = z.exp()  # (..., V_local); padded columns: exp(-inf) = 0
        sum_e = e.sum(dim=-1)  # (...)
        comm.all_reduce_(sum_e, group)

        loss = sum_e.log() - z_t
        softmax = e.div_(sum_e.unsqueeze(-1))  # in place: `e` is ours
        ctx.save_for_backward(softmax, t_local, outside)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, t_local, outside = ctx.saved_tensors
        grad = softmax.clone()  # (..., V_local)
        # minus one-hot on the rank that holds the target column
        grad.scatter_add_(-1, t_local.unsqueeze(-1), (~outside).to(grad.dtype).neg().unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ctx: ParallelContext,
                                 vocab_size: int) -> torch.Tensor:
    """Per-token loss -log softmax(logits)[target], logits split over the vocabulary across TP.

    logits: (..., V_local), this TP rank's contiguous shard of the padded vocabulary (any float dtype;
    computed in at least fp32). target: (...) long ids in [0, vocab_size). vocab_size: the true vocabulary;
    columns at or beyond it are padding and are excluded. Returns (...) losses in at least fp32.
    """
    v_local = logits.shape[-1]
    vocab_start = ctx.tp_rank * v_local
    return _VocabParallelCrossEntropy.apply(logits, target, ctx.tp_group, vocab_start, vocab_size)


def masked_mean(loss: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """sum(loss * mask) / sum(mask) (plain mean without a mask); 0 when the mask is all zero."""
    if loss_mask is None:
        return loss.mean()
    mask = loss_mask.to(loss.dtype)
    denom = mask.sum()
    # An all-zero mask has a zero numerator: clamping the denominator gives 0 instead of NaN.
    return (loss * mask).sum() / denom.clamp_min(torch.finfo(loss.dtype).tiny)
