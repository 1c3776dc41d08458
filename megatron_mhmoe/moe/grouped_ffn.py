"""Expert FFNs over rows grouped by expert, as one autograd node: the compute floor of an MoE layer.

rows (n, d_in) hold expert 0's rows, then expert 1's, ... with exact counts (no padding). For each
expert e with rows X_e: H_e = X_e W1_e; A_e = act(H_e); Y_e = A_e W2_e (SwiGLU: A_e = silu(H_e) * X_e W3_e).

Why a hand-written backward instead of autograd over a per-expert loop:
1. Autograd over `rows.split(counts)` / `w.unbind(0)` / `torch.cat` allocates the per-expert pieces and
   then concatenates them again in backward (the split's backward is a cat over n rows, the unbind's a
   stack of E gradient matrices): at E=256 that cost ~12% of the step on CPU. Here every GEMM writes
   straight into a slice of one preallocated output (`torch.mm(out=...)`), weight gradients included.
2. The activation (and its backward) runs once over all n rows instead of once per expert: at E=256
   with ~128 rows per expert, 256 tiny elementwise kernels cost more than one large one.
3. Saved for backward: X, H and the activation output A (and X W3 for SwiGLU), as autograd would.
   Recomputing A in backward saves an (n, f) tensor but costs a GELU pass, ~10% of the step on CPU
   (erf is expensive). Backward frees A once W2's gradient is done and builds its (rows, f)
   temporaries a chunk of experts at a time (about n/4 rows), to keep the peak near per-expert autograd's.
An expert with zero rows gets an exact zero gradient, so expert-data-parallel all-reduces never wait.

On CUDA in bf16/fp16, `torch._grouped_mm` (one kernel for all experts) replaces the per-expert loop
where it exists; `GroupedFFN.grouped_mm_failed` records a fallback.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _segments(counts: list[int]) -> list[tuple[int, int, int]]:
    """(expert, start, end) of every non-empty expert's rows."""
    segs, start = [], 0
    for e, c in enumerate(counts):
        if c:
            segs.append((e, start, start + c))
        start += c
    return segs


def _mm_rows(a: torch.Tensor, w: torch.Tensor, segs, out: torch.Tensor, transpose_w: bool = False) -> torch.Tensor:
    """out[s:t] = a[s:t] @ w[e] (or w[e]^T) for every segment; rows outside segments are untouched."""
    for e, s, t in segs:
        torch.mm(a[s:t], w[e].t() if transpose_w else w[e], out=out[s:t])
    return out


def _mm_weight_grad(a: torch.Tensor, g: torch.Tensor, segs, num_experts: int) -> torch.Tensor:
    """grad[e] = a[s:t]^T @ g[s:t]; experts without rows get exact zeros."""
    grad = a.new_zeros(num_experts, a.shape[1], g.shape[1]) if len(segs) < num_experts else \
        a.new_empty(num_experts, a.shape[1], g.shape[1])
    for e, s, t in segs:
        torch.mm(a[s:t].t(), g[s:t], out=grad[e])
    return grad


def _chunks(segs, n: int, parts: int = 4) -> list[list[tuple[int, int, int]]]:
    """Consecutive experts grouped into about `parts` chunks of rows (an expert is never split)."""
    target, out, cur, rows = max(1, -(-n // parts)), [], [], 0
    for seg in segs:
        cur.append(seg)
        rows += seg[2] - seg[1]
        if rows >= target:
            out.append(cur)
            cur, rows = [], 0
    return out + ([cur] if cur else [])


class _GroupedFFNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, w1, w2, w3, counts: list[int], swiglu: bool):
        segs = _segments(counts)
        n = rows.shape[0]
        h = _mm_rows(rows, w1, segs, rows.new_empty(n, w1.shape[2]))  # (n, f)
        if swiglu:
            u = _mm_rows(rows, w3, segs, rows.new_empty(n, w3.shape[2]))  # (n, f)
            a = F.silu(h) * u
        else:
            u = None
            a = F.gelu(h)  # (n, f)
        y = _mm_rows(a, w2, segs, rows.new_empty(n, w2.shape[2]))  # (n, d_in)
        ctx.save_for_backward(rows, w1, w2, w3)
        # Intermediates live on ctx, not in save_for_backward, so that backward can drop each one as
        # soon as it is used (saved tensors stay alive until backward returns).
        ctx.h, ctx.u, ctx.a = h, u, a
        ctx.segs, ctx.swiglu = segs, swiglu
        return y

    @staticmethod
    def backward(ctx, gy):
        rows, w1, w2, w3 = ctx.saved_tensors
        h, u, a = ctx.h, ctx.u, ctx.a
        del ctx.h, ctx.u, ctx.a
        segs, E = ctx.segs, w1.shape[0]
        gy = gy.contiguous()
        n, f = h.shape
        gw2 = _mm_weight_grad(a, gy, segs, E)  # (E, f, d_in)
        del a  # frees (n, f) before the weight gradients and the backward's temporaries exist
        gw1 = rows.new_zeros(w1.shape) if len(segs) < E else rows.new_empty(w1.shape)  # (E, d_in, f)
        gw3 = (rows.new_zeros(w3.shape) if len(segs) < E else rows.new_empty(w3.shape)) if ctx.swiglu else None
        gx = rows.new_empty(rows.shape) if ctx.needs_input_grad[0] else None  # (n, d_in), every row written
        # The (rows, f) temporaries are built a chunk of experts at a time: peak memory stays near the
        # forward's, as autograd over per-expert modules would have it, with few elementwise calls.
        for chunk in _chunks(segs, n):
            c0, c1 = chunk[0][1], chunk[-1][2]
            ga = rows.new_empty(c1 - c0, f)  # (rows of chunk, f)
            for e, s, t in chunk:
                torch.mm(gy[s:t], w2[e].t(), out=ga[s - c0:t - c0])
            hc = h[c0:c1]
            if ctx.swiglu:
                sh, sig = F.silu(hc), torch.sigmoid(hc)
                gu = ga * sh  # d/du of silu(h) * u
                gh = ga * u[c0:c1] * (sig * (1 + hc * (1 - sig)))  # silu'(h) = sig (1 + h (1 - sig))
                del sh, sig
            else:
                gh, gu = torch.ops.aten.gelu_backward(ga, hc), None  # (rows of chunk, f)
            del ga
            for e, s, t in chunk:
                torch.mm(rows[s:t].t(), gh[s - c0:t - c0], out=gw1[e])
                if gu is not None:
                    torch.mm(rows[s:t].t(), gu[s - c0:t - c0], out=gw3[e])
                if gx is not None:
                    torch.mm(gh[s - c0:t - c0], w1[e].t(), out=gx[s:t])
                    if gu is not None:
                        gx[s:t].addmm_(gu[s - c0:t - c0], w3[e].t())
            del gh, gu
        return gx, gw1, gw2, gw3, None, None


class GroupedFFN:
    """Namespace for the grouped-GEMM policy (per-expert loop vs torch._grouped_mm)."""

    grouped_mm_failed: Optional[str] = None
    """Why torch._grouped_mm was abandoned in this process (None: not tried or working)."""
    _checked: dict = {}

    @staticmethod
    def use_grouped_mm(rows: torch.Tensor, w1: torch.Tensor) -> bool:
        # On CPU torch._grouped_mm loops over experts itself and its fp32 backward fails on expanded
        # gradients (torch 2.13): measured no faster than the loop above, so only CUDA half types use it.
        if not (rows.device.type == "cuda" and rows.dtype in (torch.bfloat16, torch.float16)
                and hasattr(torch, "_grouped_mm") and GroupedFFN.grouped_mm_failed is None):
            return False
        if rows.shape[1] % 8 or w1.shape[2] % 8:  # row strides must be multiples of 16 bytes
            return False
        key = (str(rows.device), rows.dtype)
        if key not in GroupedFFN._checked:
            GroupedFFN._checked[key] = _self_test(rows.device, rows.dtype)
        return GroupedFFN._checked[key]


def _self_test(device: torch.device, dtype: torch.dtype) -> bool:
    """Forward and backward of a tiny grouped FFN against the loop: a failure here cannot surface
    later inside a backward pass, where no fallback is possible."""
    try:
        with torch.enable_grad():  # the caller may be under no_grad (evaluation)
            return _self_test_body(device, dtype)
    except RuntimeError as err:
        GroupedFFN.grouped_mm_failed = str(err).splitlines()[0] if str(err) else type(err).__name__
        return False


def _self_test_body(device: torch.device, dtype: torch.dtype) -> bool:
    g = torch.Generator(device=device).manual_seed(0)
    rows = torch.randn(24, 16, device=device, dtype=dtype, generator=g, requires_grad=True)
    w1 = torch.randn(3, 16, 32, device=device, dtype=dtype, generator=g, requires_grad=True)
    w2 = torch.randn(3, 32, 16, device=device, dtype=dtype, generator=g, requires_grad=True)
    counts = [8, 0, 16]
    outs = []
    for fn in (_grouped_mm_ffn, _GroupedFFNFunction.apply):
        for t in (rows, w1, w2):
            t.grad = None
        y = fn(rows, w1, w2, None, counts, False)
        y.float().square().sum().backward()
        outs.append([y.float(), rows.grad.float(), w1.grad.float(), w2.grad.float()])
    for a, b in zip(*outs):
        if not torch.allclose(a, b, atol=0.1 * float(b.abs().max()) + 1e-3, rtol=0.05):
            raise RuntimeError("torch._grouped_mm disagrees with the per-expert loop")
    return True


def _grouped_mm_ffn(rows, w1, w2, w3, counts: list[int], swiglu: bool) -> torch.Tensor:
    """One grouped kernel per GEMM (autograd through torch._grouped_mm). CUDA half types only."""
    offs = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(rows.device, non_blocking=True)
    h = torch._grouped_mm(rows, w1, offs=offs)  # (n, f)
    a = F.silu(h) * torch._grouped_mm(rows, w3, offs=offs) if swiglu else F.gelu(h)
    return torch._grouped_mm(a, w2, offs=offs)  # (n, d_in)


def grouped_ffn(rows: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: Optional[torch.Tensor],
                counts: list[int], swiglu: bool) -> torch.Tensor:
    """rows (sum(counts), d_in) grouped by expert; w1/w3 (E, d_in, f), w2 (E, f, d_in) -> (n, d_in)."""
    if len(counts) != w1.shape[0] or sum(counts) != rows.shape[0]:
        raise ValueError(f"counts {len(counts)} experts / {sum(counts)} rows do not match weights "
                         f"{tuple(w1.shape)} and rows {tuple(rows.shape)}")
    dev = rows.device.type
    if torch.is_autocast_enabled(dev):
        # mm(out=...) is not autocast-aware: cast once here, as autocast would for each GEMM.
        dt = torch.get_autocast_dtype(dev)
        rows, w1, w2 = rows.to(dt), w1.to(dt), w2.to(dt)
        w3 = w3.to(dt) if w3 is not None else None
    with torch.autocast(dev, enabled=False):
        if GroupedFFN.use_grouped_mm(rows, w1):
            try:
                return _grouped_mm_ffn(rows, w1, w2, w3, counts, swiglu)
            except RuntimeError as err:  # unsupported arch/layout: remember and use the loop
                GroupedFFN.grouped_mm_failed = str(err).splitlines()[0]
        return _GroupedFFNFunction.apply(rows.contiguous(), w1, w2, w3, counts, swiglu)
