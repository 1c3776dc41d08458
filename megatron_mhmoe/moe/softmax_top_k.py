"""Softmax, top-k and logsumexp of router logits as one autograd node (router.top_k's hot path).

Forward, for logits l (S, E): p = softmax(l); (p_top, e_top) = top-k of p; lse = l_{e1} - log p_{e1} (the
top-1 choice's logit and probability give logsumexp in O(S): router.top_k says why that is well conditioned).

Backward, with G = dL/dp (dense, a broadcast row, or absent), g = dL/dp_top and g_lse = dL/dlse:
  dL/dl = p * (G - r) + scatter(e_top, p_top * g),   r = rowsum(G * p) + rowsum(g * p_top) - g_lse,
which is softmax's backward of G + scatter(e_top, g) plus lse's gradient g_lse * p, written out. Autograd
over the separate ops builds two dense (S, E) zero tensors for the top-k's and the gather's gradients and
adds each to a second dense gradient; at E = 256 those passes cost as much as the softmax itself. The balance
losses read p only through sums over sub-tokens, so G is usually one (E,) row broadcast over S: rowsum(G * p)
is then a matrix-vector product and nothing (S, E) is read for G.

`router.top_k_reference` is the same computation as separate autograd ops; tests compare the two.
"""
from __future__ import annotations

import torch


SMALL_E_CPU = 64
"""CPU: below this many experts the softmax is exp(l - max) / sum as four ops. torch's softmax kernel
vectorises along the expert dim, which is too short to fill a vector there: measured on the 2-core Xeon,
(2048, 8) logits took 260 us in torch.softmax and 50 us as four ops; at E = 64 the two are equal."""


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    if logits.device.type == "cpu" and logits.shape[-1] < SMALL_E_CPU:
        e = (logits - logits.amax(dim=-1, keepdim=True)).exp_()  # (S, E)
        return e.div_(e.sum(dim=-1, keepdim=True))
    return torch.softmax(logits, dim=-1)


def _is_broadcast_row(g: torch.Tensor) -> bool:
    """G is one row repeated over the sub-tokens (the backward of a sum over dim 0)."""
    return g.dim() == 2 and g.shape[0] > 1 and g.stride(0) == 0


class SoftmaxTopK(torch.autograd.Function):
    """logits (S, E), k -> probs (S, E), top_p (S, k), top_e (S, k) int64, lse (S,)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, k: int):
        probs = _softmax(logits)  # (S, E)
        top_p, top_e = probs.topk(k, dim=-1)  # (S, k)
        lse = logits.gather(1, top_e[:, :1]).squeeze(1) - torch.log(top_p[:, 0])  # (S,)
        ctx.save_for_backward(probs, top_p, top_e)
        ctx.mark_non_differentiable(top_e)
        return probs, top_p, top_e, lse

    @staticmethod
    def backward(ctx, g_probs, g_top, _g_e, g_lse):
        probs, top_p, top_e = ctx.saved_tensors
        S = probs.shape[0]
        r = probs.new_zeros(S)  # (S,)
        if g_top is not None:
            r += (g_top * top_p).sum(dim=1)
        if g_lse is not None:
            r -= g_lse
        if g_probs is None:
            grad = probs * r.neg().unsqueeze(1)  # (S, E)
        elif _is_broadcast_row(g_probs):
            row = g_probs[0]  # (E,)
            r += probs @ row
            grad = (row.unsqueeze(0) - r.unsqueeze(1)).mul_(probs)  # (S, E)
        else:
            r += (g_probs * probs).sum(dim=1)
            grad = (g_probs - r.unsqueeze(1)).mul_(probs)  # (S, E)
        if g_top is not None:
            grad.scatter_add_(1, top_e, g_top * top_p)
        return grad, None


def softmax_top_k(logits: torch.Tensor, k: int):
    """(probs, top_p, top_e, lse) of `logits` (S, E) fp32; see the module docstring."""
    return SoftmaxTopK.apply(logits, k)
