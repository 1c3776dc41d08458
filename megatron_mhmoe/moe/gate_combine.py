"""The combine's last step, shared by every dispatch path: expert outputs times their gates, summed into rows.

y = zeros(S, d).index_add(0, src, out * w[:, None]) as one autograd node. Autograd over those ops would keep
g*w and g*out as two new (n, d) tensors in the backward (plus the reduction of the second); here dL/dout is
dL/dy[src] scaled in place and dL/dw one batched dot per row.
"""
from __future__ import annotations

import torch


class GateCombine(torch.autograd.Function):
    """out (n, d), w (n,), src (n,) row of each output, num_rows S -> y (S, d)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, w: torch.Tensor, src: torch.Tensor, num_rows: int) -> torch.Tensor:
        y = out.new_zeros(num_rows, out.shape[1])  # (S, d)
        y.index_add_(0, src, out * w.unsqueeze(1))
        ctx.save_for_backward(out, w, src)
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        out, w, src = ctx.saved_tensors
        g_rows = gy.index_select(0, src)  # (n, d): a new tensor, free to scale in place
        gw = None
        if ctx.needs_input_grad[1]:
            gw = torch.bmm(g_rows.unsqueeze(1), out.unsqueeze(2)).view(-1)  # (n,) <dL/dy[src_i], out_i>
        g_out = g_rows.mul_(w.unsqueeze(1)) if ctx.needs_input_grad[0] else None
        return g_out, gw, None, None


def gate_combine(out: torch.Tensor, w: torch.Tensor, src: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(n, d) outputs, (n,) gates, (n,) destination rows -> (num_rows, d) sums (GateCombine)."""
    return GateCombine.apply(out, w, src, num_rows)
