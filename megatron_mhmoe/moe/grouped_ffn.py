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
   (erf is expensive). On CPU all (rows, f) tensors are built in L2-sized row chunks of whole experts
   (CHUNK_ELEMS) and backward frees each chunk once used.
An expert with zero rows gets an exact zero gradient, so expert-data-parallel all-reduces never wait.

On CUDA in bf16/fp16, `torch._grouped_mm` (one kernel for all experts) replaces the per-expert loop
where it exists and `grouped_mm_self_test` passed; `GroupedFFN.grouped_mm_failed` records a fallback,
`GroupedFFN.policy` can force either path. That kernel only ever sees experts with rows (see
`_grouped_mm_ffn`). `python -m megatron_mhmoe.moe.grouped_ffn --self-test [--device D] [--dtype T]`
runs the self-test and prints one line.
"""
from __future__ import annotations

import argparse
import ctypes
import math
import sys
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


CHUNK_ELEMS = 2 ** 18
"""CPU: most elements of one (rows, f) intermediate (1 MB in fp32). Two reasons, both measured on the
2-core Xeon: (a) blocks above glibc's mmap threshold (<= 32 MB) are fresh pages the kernel zero-fills at
every step: one (32768, 1024) fp32 buffer cost more than its GEMMs' share; (b) a chunk that fits in L2 is
still cached when the activation and the next GEMM read it: 16 MB chunks ran the expert FFN 10-20% slower
than 1 MB ones, and as slow as DeepSpeed's per-expert modules. CUDA builds one chunk (caching allocator)."""


def _chunks(segs, n: int, f: int, cpu: bool = True) -> list[list[tuple[int, int, int]]]:
    """Consecutive whole experts grouped into chunks of at most CHUNK_ELEMS // f rows, as their
    (expert, start, end) pieces; only an expert larger than a chunk is cut (its weight gradient then
    sums the pieces)."""
    limit = max(1, CHUNK_ELEMS // max(1, f)) if cpu else max(1, n)
    out, cur, rows = [], [], 0
    for e, s, t in segs:
        while t - s > 0:
            if rows and rows + (t - s) > limit:  # close the chunk rather than cut this expert
                out.append(cur)
                cur, rows = [], 0
            take = min(t - s, limit - rows)
            cur.append((e, s, s + take))
            rows += take
            s += take
            if rows == limit:
                out.append(cur)
                cur, rows = [], 0
    return out + ([cur] if cur else [])


def _weight_grad(grad: torch.Tensor, e: int, a: torch.Tensor, b: torch.Tensor, seen: set) -> None:
    """grad[e] (+)= a @ b: the first piece of expert e writes, later pieces accumulate."""
    if e in seen:
        grad[e].addmm_(a, b)
    else:
        torch.mm(a, b, out=grad[e])
        seen.add(e)


def _hidden(xr: torch.Tensor, chunk, w1, w3, swiglu: bool):
    """One chunk's H = X W1, U = X W3 (SwiGLU, else None) and A = act(H) (* U); xr holds the chunk's rows."""
    c0, f = chunk[0][1], w1.shape[2]
    h = xr.new_empty(xr.shape[0], f)  # (rows of chunk, f)
    for e, s, t in chunk:
        torch.mm(xr[s - c0:t - c0], w1[e], out=h[s - c0:t - c0])
    u = None
    if swiglu:
        u = xr.new_empty(xr.shape[0], f)
        for e, s, t in chunk:
            torch.mm(xr[s - c0:t - c0], w3[e], out=u[s - c0:t - c0])
    return h, u, (F.silu(h) * u if swiglu else F.gelu(h))


def _activation_backward(ga: torch.Tensor, h: torch.Tensor, u, swiglu: bool):
    """dL/dA -> (dL/dH, dL/dU or None)."""
    if not swiglu:
        return torch.ops.aten.gelu_backward(ga, h), None
    sig = torch.sigmoid(h)
    gu = ga * F.silu(h)  # d/du of silu(h) * u
    return ga * u * (sig * (1 + h * (1 - sig))), gu  # silu'(h) = sig (1 + h (1 - sig))


def _cast_for_autocast(dev: str, x, w1, w2, w3):
    """mm(out=...) is not autocast-aware: cast once, as autocast would for each GEMM."""
    if not torch.is_autocast_enabled(dev):
        return x, w1, w2, w3
    dt = torch.get_autocast_dtype(dev)
    return x.to(dt), w1.to(dt), w2.to(dt), (w3.to(dt) if w3 is not None else None)


HUGE_PAGE_MIN_BYTES = 32 << 20
"""CPU (Linux): a new tensor of at least this size is advised onto transparent huge pages before it is
first written. glibc serves blocks this large (its largest dynamic mmap threshold) with a fresh mmap at
every allocation and the kernel faults them in 4 KB page by page: the stacked (E, d, f) weight gradients
are such blocks at every step (2 x 32 MB at E=32). Measured on the 2-core Xeon (THP in `madvise` mode),
SMoE E=32: 16k minor faults per fwd+bwd, ~10-15% of the step; with the advice 0.1-5k, the step 6-12%
faster. Advisory only: where THP is off or the call fails nothing changes. None: never advise."""

_madvise = None


def _advise_huge_pages(t: torch.Tensor) -> None:
    """madvise(MADV_HUGEPAGE) on the 2 MB-aligned part of a large, not yet written CPU tensor."""
    global _madvise
    if HUGE_PAGE_MIN_BYTES is None or t.device.type != "cpu" or t.nbytes < HUGE_PAGE_MIN_BYTES:
        return
    if _madvise is None:
        _madvise = False
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).madvise
                fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
                _madvise = fn
            except (OSError, AttributeError):
                pass
    if not _madvise:
        return
    huge, madv_hugepage = 2 << 20, 14
    start = -(-t.data_ptr() // huge) * huge
    end = (t.data_ptr() + t.nbytes) // huge * huge
    if end > start:
        _madvise(start, end - start, madv_hugepage)  # a failure only leaves the 4 KB pages


REUSE_GRAD_MIN_BYTES = 32 << 20
"""CPU: a stacked weight gradient at least this large is built on the storage of an earlier step's gradient
of the same shape once nothing else holds that storage (its .grad was set to None, or was accumulated
into the existing .grad), instead of a fresh block. Such blocks are above glibc's mmap threshold, so a fresh
one is new pages at every step: measured on the 2-core Xeon at SMoE E=256 (two 256 MB gradients per
step), 132k minor faults and ~250 ms of kernel time per step (40% of the step's CPU time) with 4 KB pages,
and with the huge-page advice 74-1305 ms of kernel time from rep to rep (direct compaction when the kernel
has no free 2 MB page: the 120-230% timing spread of that point). Like CUDA's caching allocator the kept
storage stays allocated between steps (at most what the step's gradients held at once);
`release_kept_grads()` frees it. None: always allocate."""

_kept_grads: dict = {}  # (shape, dtype) -> [UntypedStorage, ...] of earlier weight gradients


def _storage_free(storage) -> bool:
    """Only our handle holds the storage (no tensor, no .grad, no view)."""
    return torch._C._storage_Use_Count(storage._cdata) == 1


def release_kept_grads() -> None:
    """Free the storages kept for reuse (REUSE_GRAD_MIN_BYTES); benchmarks call it to measure a fresh step."""
    _kept_grads.clear()


def _grad_buffer(w: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of w's shape for w's gradient (REUSE_GRAD_MIN_BYTES)."""
    if REUSE_GRAD_MIN_BYTES is None or w.device.type != "cpu" or w.nbytes < REUSE_GRAD_MIN_BYTES \
            or not hasattr(torch._C, "_storage_Use_Count"):
        g = w.new_empty(w.shape)
        _advise_huge_pages(g)
        return g
    kept = _kept_grads.setdefault((tuple(w.shape), w.dtype), [])
    for storage in kept:
        if _storage_free(storage):
            return w.new_empty(0).set_(storage, 0, w.shape)  # contiguous, on the kept storage
    g = w.new_empty(w.shape)
    _advise_huge_pages(g)
    kept.append(g.untyped_storage())
    return g


def _new_grad(w: torch.Tensor, segs) -> torch.Tensor:
    """Zeros when some expert has no rows: its gradient must exist and be exactly 0."""
    g = _grad_buffer(w)
    return g.zero_() if len(segs) < w.shape[0] else g


class _GroupedFFNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, w1, w2, w3, counts: list[int], swiglu: bool):
        segs = _segments(counts)
        n, f = rows.shape[0], w1.shape[2]
        chunks = _chunks(segs, n, f, rows.device.type == "cpu")
        y = rows.new_empty(n, w2.shape[2])  # (n, d_in)
        saved = []
        for chunk in chunks:
            c0, c1 = chunk[0][1], chunk[-1][2]
            h, u, a = _hidden(rows[c0:c1], chunk, w1, w3, swiglu)  # (rows of chunk, f) each
            for e, s, t in chunk:
                torch.mm(a[s - c0:t - c0], w2[e], out=y[s:t])
            saved.append([h, u, a])
        ctx.save_for_backward(rows, w1, w2, w3)
        # On ctx, not in save_for_backward (whose tensors live until backward returns): backward frees
        # each chunk's intermediates as soon as they are used.
        ctx.saved, ctx.chunks, ctx.segs, ctx.swiglu = saved, chunks, segs, swiglu
        return y

    @staticmethod
    def backward(ctx, gy):
        rows, w1, w2, w3 = ctx.saved_tensors
        saved, chunks, segs, swiglu = ctx.saved, ctx.chunks, ctx.segs, ctx.swiglu
        del ctx.saved
        gy = gy.contiguous()
        # Pass 1: W2's gradient and dL/dH per chunk; each chunk's A and H are freed once used.
        gw2, seen = _new_grad(w2, segs), set()  # (E, f, d_in)
        grads_h = []
        for i, chunk in enumerate(chunks):
            h, u, a = saved[i]
            saved[i] = None
            c0 = chunk[0][1]
            ga = torch.empty_like(h)  # (rows of chunk, f)
            for e, s, t in chunk:
                _weight_grad(gw2, e, a[s - c0:t - c0].t(), gy[s:t], seen)
                torch.mm(gy[s:t], w2[e].t(), out=ga[s - c0:t - c0])
            del a
            gh, gu = _activation_backward(ga, h, u, swiglu)  # (rows of chunk, f)
            del ga, h, u
            grads_h.append((gh, gu))
        # Pass 2: W1's (and W3's) gradient and dL/dX, freeing each chunk's dL/dH.
        gw1, seen1 = _new_grad(w1, segs), set()  # (E, d_in, f)
        gw3, seen3 = (_new_grad(w3, segs), set()) if swiglu else (None, None)
        gx = rows.new_empty(rows.shape) if ctx.needs_input_grad[0] else None  # (n, d_in), every row written
        for i, chunk in enumerate(chunks):
            gh, gu = grads_h[i]
            grads_h[i] = None
            c0 = chunk[0][1]
            for e, s, t in chunk:
                _weight_grad(gw1, e, rows[s:t].t(), gh[s - c0:t - c0], seen1)
                if gu is not None:
                    _weight_grad(gw3, e, rows[s:t].t(), gu[s - c0:t - c0], seen3)
                if gx is not None:
                    torch.mm(gh[s - c0:t - c0], w1[e].t(), out=gx[s:t])
                    if gu is not None:
                        gx[s:t].addmm_(gu[s - c0:t - c0], w3[e].t())
            del gh, gu
        return gx, gw1, gw2, gw3, None, None


GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes torch._grouped_mm takes (torch 2.13: float64 is rejected)."""


class GroupedFFN:
    """Namespace for the grouped-GEMM policy (per-expert loop vs torch._grouped_mm)."""

    policy: str = "auto"
    """"auto": torch._grouped_mm on CUDA bf16/fp16 once its self-test passed for that device and dtype,
    else the per-expert loop. "always": torch._grouped_mm wherever torch has it, for every dtype in
    GROUPED_MM_DTYPES and aligned widths, with no self-test and no fallback (an error raises): tests set
    it to run that path on CPU. "never": the per-expert loop."""
    grouped_mm_failed: Optional[str] = None
    """Why torch._grouped_mm was abandoned in this process (None: not tried or working)."""
    _checked: dict = {}

    @staticmethod
    def use_grouped_mm(rows: torch.Tensor, w1: torch.Tensor) -> bool:
        policy = GroupedFFN.policy
        if policy not in ("auto", "always", "never"):
            raise ValueError(f"GroupedFFN.policy must be 'auto', 'always' or 'never', got {policy!r}")
        if policy == "never" or not hasattr(torch, "_grouped_mm") or rows.dtype not in GROUPED_MM_DTYPES:
            return False
        align = 16 // rows.element_size()  # row strides must be multiples of 16 bytes
        if rows.shape[1] % align or w1.shape[2] % align:
            return False
        if policy == "always":
            return True
        # On CPU torch._grouped_mm loops over experts itself: measured no faster than the loop above, so
        # by default only CUDA half types use it.
        if not (rows.device.type == "cuda" and rows.dtype in (torch.bfloat16, torch.float16)
                and GroupedFFN.grouped_mm_failed is None):
            return False
        key = (str(rows.device), rows.dtype)
        if key not in GroupedFFN._checked:
            ok, report = grouped_mm_self_test(rows.device, rows.dtype)
            if not ok:
                GroupedFFN.grouped_mm_failed = report
            GroupedFFN._checked[key] = ok
        return GroupedFFN._checked[key]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward passes on a contiguous gradient: torch._grouped_mm's backward rejects an
    expanded one (strides 0, as from y.sum()) with "Invalid strides/sizes" (torch 2.13, CPU, fp32 and
    bf16), and a backward cannot fall back to the loop."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, gy):
        return gy.contiguous()


def _grouped_mm_ffn(rows, w1, w2, w3, counts: list[int], swiglu: bool) -> torch.Tensor:
    """One grouped kernel per GEMM (autograd through torch._grouped_mm), over the experts with rows only.

    The kernel is never given an empty group: on some GPUs (Blackwell) its weight gradient for a zero-row
    group comes back non-zero, and the failure could only show inside a backward. So the weights of
    the experts with rows are gathered (index_select) and the offsets built for them; index_select's
    backward scatters into a zeroed (E, ...) gradient, so an expert without rows still gets an exact
    zero gradient of its full shape, as the expert-data-parallel all-reduce needs."""
    if len(counts) != w1.shape[0] or sum(counts) != rows.shape[0]:
        raise ValueError(f"counts {len(counts)} experts / {sum(counts)} rows do not match weights "
                         f"{tuple(w1.shape)} and rows {tuple(rows.shape)}")
    if rows.shape[0] == 0:
        # No rows at all: the weight gradients' contraction would be 0 long, which the kernel rejects, and
        # there is nothing to compute; the loop node returns (0, d_in) and zero weight gradients.
        return _GroupedFFNFunction.apply(rows.contiguous(), w1, w2, w3, counts, swiglu)
    live = [e for e, c in enumerate(counts) if c]
    if len(live) < len(counts):
        idx = torch.tensor(live, dtype=torch.long).to(rows.device, non_blocking=True)
        w1, w2 = w1.index_select(0, idx), w2.index_select(0, idx)
        w3 = w3.index_select(0, idx) if swiglu else None
    offs = torch.tensor([counts[e] for e in live], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    offs = offs.to(rows.device, non_blocking=True)
    rows = rows.contiguous()
    h = torch._grouped_mm(rows, w1, offs=offs)  # (n, f)
    a = F.silu(h) * torch._grouped_mm(rows, w3, offs=offs) if swiglu else F.gelu(h)
    return _ContiguousGrad.apply(torch._grouped_mm(a, w2, offs=offs))  # (n, d_in)


SELF_TEST_COUNTS = [0, 8, 0, 13, 3, 0]
"""Rows per expert in the self-test: empty experts first, in the middle (two adjacent) and last, and
counts that are not multiples of 8 (routing gives any counts: a kernel that needs aligned group sizes
must fail here, not in training)."""

SELF_TEST_TOL_EPS = 8.0
"""Self-test tolerance: |grouped - exact| <= SELF_TEST_TOL_EPS * eps(dtype) * max|exact|, per tensor.
The exact values are a float64 loop over the same (dtype-rounded) inputs. The longest path, to W1's
gradient, rounds to the dtype about 6 times (H, A, dL/dA, dL/dH, the GEMM outputs), each a relative error
<= eps/2, and with unit-variance data these random-walk errors stay below eps * max|value| each. The GEMMs
accumulate in fp32: negligible against a bf16/fp16 eps; in fp32 itself about eps/2 * sqrt(K) relative
(K <= 32 here). Measured: the per-expert loop in bf16/fp16, 20 seeds, <= 2 eps of max; this test on CPU
0.7 (bf16), 0.9 (fp16), 2.7 (fp32). A kernel fault (a wrong group, garbage, a missed row) is an error of
the order of the values themselves, 1/eps = 128 eps of max in bf16."""


def grouped_mm_self_test(device, dtype: torch.dtype) -> tuple[bool, str]:
    """Forward and backward of a tiny grouped FFN (GELU and SwiGLU, SELF_TEST_COUNTS, then all experts
    empty) through `_grouped_mm_ffn` against a float64 per-expert loop. Returns (ok, one-line report
    with the max error in eps units). A failure here must be found before training: inside a backward
    no fallback is possible."""
    device, tag = torch.device(device), f"device={device} dtype={str(dtype).replace('torch.', '')}"
    if not hasattr(torch, "_grouped_mm"):
        return False, f"grouped-gemm self-test: FAIL {tag}: this torch has no torch._grouped_mm"
    try:
        with torch.enable_grad():  # the caller may be under no_grad (evaluation)
            worst, problem = _self_test_body(device, dtype)
    except RuntimeError as err:
        worst, problem = math.inf, (str(err).splitlines()[0] if str(err) else type(err).__name__)
    ok = problem is None and worst <= SELF_TEST_TOL_EPS
    if problem is None and not ok:
        problem = "torch._grouped_mm disagrees with the per-expert loop"
    return ok, (f"grouped-gemm self-test: {'PASS' if ok else 'FAIL'} {tag} counts={SELF_TEST_COUNTS} "
                f"gelu+swiglu max err {worst:.2f} eps (tol {SELF_TEST_TOL_EPS:g})"
                + (f": {problem}" if problem else ""))


def _self_test_body(device: torch.device, dtype: torch.dtype) -> tuple[float, Optional[str]]:
    """(max error in eps * max|exact| units over outputs and gradients, a problem found or None)."""
    eps, worst = torch.finfo(dtype).eps, 0.0
    d, f = 16, 32
    g = torch.Generator(device=device).manual_seed(0)
    for counts in (SELF_TEST_COUNTS, [0] * len(SELF_TEST_COUNTS)):
        E, n = len(counts), sum(counts)
        for swiglu in (False, True):
            def randn(*shape, scale=1.0):
                return (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)
            # Weights scaled by 1/sqrt(fan-in): every stage keeps unit-size values.
            base = [randn(n, d), randn(E, d, f, scale=d ** -0.5), randn(E, f, d, scale=f ** -0.5),
                    randn(E, d, f, scale=d ** -0.5) if swiglu else None]
            gy = randn(n, d)
            got = []
            for fn, dt in ((_grouped_mm_ffn, dtype), (_GroupedFFNFunction.apply, torch.float64)):
                ts = [t.detach().to(dt).requires_grad_() if t is not None else None for t in base]
                y = fn(*ts, counts, swiglu)
                y.backward(gy.to(dt))
                got.append([y.detach()] + [t.grad for t in ts if t is not None])
            for name, a, b in zip(("y", "rows", "w1", "w2", "w3"), *got):
                if a is None or a.shape != b.shape or a.dtype != dtype:
                    return math.inf, f"{name}: got {None if a is None else (tuple(a.shape), a.dtype)}"
                if not torch.isfinite(a).all():
                    return math.inf, f"{name} is not finite"
                if name.startswith("w"):
                    empty = [e for e, c in enumerate(counts) if c == 0]
                    if empty and a[empty].abs().max() != 0:  # exactly 0, as the EDP all-reduce needs
                        return math.inf, f"grad {name} of an expert without rows is not 0"
                if b.numel():
                    scale = float(b.abs().max()) or 1.0
                    worst = max(worst, float((a.double() - b).abs().max()) / (eps * scale))
    return worst, None


def grouped_ffn(rows: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: Optional[torch.Tensor],
                counts: list[int], swiglu: bool) -> torch.Tensor:
    """rows (sum(counts), d_in) grouped by expert; w1/w3 (E, d_in, f), w2 (E, f, d_in) -> (n, d_in)."""
    if len(counts) != w1.shape[0] or sum(counts) != rows.shape[0]:
        raise ValueError(f"counts {len(counts)} experts / {sum(counts)} rows do not match weights "
                         f"{tuple(w1.shape)} and rows {tuple(rows.shape)}")
    dev = rows.device.type
    rows, w1, w2, w3 = _cast_for_autocast(dev, rows, w1, w2, w3)
    with torch.autocast(dev, enabled=False):
        if GroupedFFN.use_grouped_mm(rows, w1):
            try:
                return _grouped_mm_ffn(rows, w1, w2, w3, counts, swiglu)
            except RuntimeError as err:  # unsupported arch/layout: remember and use the loop
                if GroupedFFN.policy == "always":
                    raise
                GroupedFFN.grouped_mm_failed = str(err).splitlines()[0]
        return _GroupedFFNFunction.apply(rows.contiguous(), w1, w2, w3, counts, swiglu)


class _GroupedFFNCombineFunction(torch.autograd.Function):
    """Gather, expert FFNs and gate-weighted combine of an EP=1 layer as one node:
    y = zeros(S, d).index_add(0, src, w[:, None] * FFN(x[src])) with FFN as in _GroupedFFNFunction.

    Against gather -> _GroupedFFNFunction -> combine it never builds an (n, d) tensor: each chunk's rows
    are gathered from x when used (forward and W1's gradient), its output is scaled and added into y
    while cache-hot, dL/dY is gathered per chunk from dL/dy and dL/dX of a chunk is added straight into
    dL/dx. That is 3 (n, d) buffers fewer at the backward's peak (the gathered rows, dL/dY, and dL/dX at
    (n, d) instead of (S, d)): SMoE at 4096 tokens (n = 2S rows) peaked at 123 MB, now 107 (E=32);
    186 -> 168 (E=64), 573 -> 556 (E=256). The unscaled expert outputs O are kept per chunk for dL/dw_r =
    <dL/dy[src_r], O_r> and freed in pass 1, before the peak (W1's and W2's gradients and all dL/dH);
    <dL/dY_r W2^T, A_r> instead (no O kept) cost 3-4 ms more per SMoE step (a dot over f, not d). The
    gate scaling of dL/dH is applied to the (n, d)-wide rows in pass 2 (gate * X for W1's gradient,
    gate * dL/dX), not to the (n, f) chunks."""

    @staticmethod
    def forward(ctx, x, w, w1, w2, w3, src, counts: list[int], swiglu: bool, num_rows: int):
        segs = _segments(counts)
        n, f = src.shape[0], w1.shape[2]
        chunks = _chunks(segs, n, f, x.device.type == "cpu")
        y = x.new_zeros(num_rows, w2.shape[2])  # (S, d)
        saved = []
        for chunk in chunks:
            c0, c1 = chunk[0][1], chunk[-1][2]
            xr = x.index_select(0, src[c0:c1])  # (rows of chunk, d)
            h, u, a = _hidden(xr, chunk, w1, w3, swiglu)  # (rows of chunk, f) each
            o = xr  # same shape: the gathered rows are dead once H (and U) exist
            for e, s, t in chunk:
                torch.mm(a[s - c0:t - c0], w2[e], out=o[s - c0:t - c0])
            y.index_add_(0, src[c0:c1], o * w[c0:c1].unsqueeze(1))
            del xr
            saved.append([h, u, a, o if ctx.needs_input_grad[1] else None])
        ctx.save_for_backward(x, w, w1, w2, w3, src)
        ctx.saved, ctx.chunks, ctx.segs, ctx.swiglu = saved, chunks, segs, swiglu
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w, w1, w2, w3, src = ctx.saved_tensors
        saved, chunks, segs, swiglu = ctx.saved, ctx.chunks, ctx.segs, ctx.swiglu
        del ctx.saved
        gy = gy.contiguous()
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gw = w.new_empty(w.shape) if need_w else None  # (n,)
        # Pass 1: dL/dw, W2's gradient and dL/dH per chunk; each chunk's A and H are freed once used.
        gw2, seen = _new_grad(w2, segs), set()
        grads_h = []
        for i, chunk in enumerate(chunks):
            h, u, a, o = saved[i]
            saved[i] = None
            c0, c1 = chunk[0][1], chunk[-1][2]
            g = gy.index_select(0, src[c0:c1])  # (rows of chunk, d): dL/dy of each row, before the gate
            if need_w:
                torch.linalg.vecdot(g, o, out=gw[c0:c1])
            del o
            ga = torch.empty_like(h)
            for e, s, t in chunk:
                torch.mm(g[s - c0:t - c0], w2[e].t(), out=ga[s - c0:t - c0])
            g.mul_(w[c0:c1].unsqueeze(1))
            for e, s, t in chunk:
                _weight_grad(gw2, e, a[s - c0:t - c0].t(), g[s - c0:t - c0], seen)
            del a, g
            # dL/dH (dL/dU) stay unscaled by the gate: pass 2 scales the (n, d)-wide rows instead.
            gh, gu = _activation_backward(ga, h, u, swiglu)
            del ga, h, u
            grads_h.append((gh, gu))
        # Pass 2: W1's (and W3's) gradient and dL/dx, freeing each chunk's dL/dH.
        gw1, seen1 = _new_grad(w1, segs), set()
        gw3, seen3 = (_new_grad(w3, segs), set()) if swiglu else (None, None)
        gx = torch.zeros_like(x) if need_x else None  # (S, d)
        for i, chunk in enumerate(chunks):
            gh, gu = grads_h[i]
            grads_h[i] = None
            c0, c1 = chunk[0][1], chunk[-1][2]
            wc = w[c0:c1].unsqueeze(1)
            xr = x.index_select(0, src[c0:c1]).mul_(wc)  # gate * X: W1's gradient of the scaled dL/dH
            for e, s, t in chunk:
                _weight_grad(gw1, e, xr[s - c0:t - c0].t(), gh[s - c0:t - c0], seen1)
                if gu is not None:
                    _weight_grad(gw3, e, xr[s - c0:t - c0].t(), gu[s - c0:t - c0], seen3)
            if gx is not None:
                gxr = xr  # reused: the rows are dead once the weight gradients have them
                for e, s, t in chunk:
                    torch.mm(gh[s - c0:t - c0], w1[e].t(), out=gxr[s - c0:t - c0])
                    if gu is not None:
                        gxr[s - c0:t - c0].addmm_(gu[s - c0:t - c0], w3[e].t())
                gx.index_add_(0, src[c0:c1], gxr.mul_(wc))
            del gh, gu, xr
        return gx, gw, gw1, gw2, gw3, None, None, None, None


COMBINE_MIN_WIDTH = 128
"""Narrowest rows (d_in) that take the fused node. At d_in=64 (MH-MoE h=4, 16384 sub-tokens, E=32, 1
thread) it measured ~8% slower than gather -> grouped FFN -> combine (382 vs 354 ms, one interleaved
comparison, not yet explained), while that shape's memory is already 7-17% under DeepSpeed's; at
d_in=256 (SMoE) it is on par in time and 16-18 MB lower in memory."""


def grouped_ffn_combine(x: torch.Tensor, src: torch.Tensor, w: torch.Tensor, w1: torch.Tensor,
                        w2: torch.Tensor, w3: Optional[torch.Tensor], counts: list[int], swiglu: bool,
                        num_rows: int) -> Optional[torch.Tensor]:
    """zeros(num_rows, d).index_add(0, src, w[:, None] * grouped_ffn(x[src], ...)) as one node (EP=1):
    src (n,) the row of x of each assignment, grouped by expert; w (n,) its gate weight. None where the
    separate path must be taken (torch._grouped_mm on CUDA half types, or an empty batch)."""
    if len(counts) != w1.shape[0] or sum(counts) != src.shape[0]:
        raise ValueError(f"counts {len(counts)} experts / {sum(counts)} rows do not match weights "
                         f"{tuple(w1.shape)} and {src.shape[0]} assignments")
    if src.shape[0] == 0 or x.shape[0] == 0 or x.shape[1] < COMBINE_MIN_WIDTH:
        return None
    dev = x.device.type
    x, w1, w2, w3 = _cast_for_autocast(dev, x, w1, w2, w3)
    if GroupedFFN.use_grouped_mm(x, w1):
        return None
    with torch.autocast(dev, enabled=False):
        return _GroupedFFNCombineFunction.apply(x.contiguous(), w.to(x.dtype), w1, w2, w3, src, counts,
                                                swiglu, num_rows)


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_mhmoe.moe.grouped_ffn")
    parser.add_argument("--self-test", action="store_true", required=True,
                        help="check torch._grouped_mm (forward, backward, empty experts) against the loop")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    args = parser.parse_args(argv)
    ok, report = grouped_mm_self_test(torch.device(args.device), _DTYPES[args.dtype])
    print(report)
    return 0 if ok else 1


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

if __name__ == "__main__":
    sys.exit(_main())
