"""The torch._grouped_mm path of the expert FFN, run on CPU (torch has the kernel there too): experts
without rows (first, middle, last, all), both activations, every dtype the kernel takes, against the
per-expert loop node and the slow reference of GroupedExperts; the policy switch and the self-test."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from megatron_mhmoe.moe import grouped_ffn as gf
from megatron_mhmoe.moe.experts import GroupedExperts
from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.parallel.init import normal

pytestmark = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm")

D, F_HIDDEN = 16, 32  # widths multiples of 8: rows of 16 bytes in half types
TOL_EPS = gf.SELF_TEST_TOL_EPS
COUNTS = [[0, 5, 8, 3], [5, 0, 8, 3], [5, 0, 0, 3], [5, 8, 3, 0], [0, 6, 0, 0], [0, 0, 0, 0], [4, 4, 4, 4]]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def kernel_calls(monkeypatch):
    """Records (number of groups, offsets) of every torch._grouped_mm call."""
    real, calls = torch._grouped_mm, []

    def spy(a, b, *args, offs=None, **kw):
        calls.append((b.shape[0], offs.tolist()))
        return real(a, b, *args, offs=offs, **kw)

    monkeypatch.setattr(torch, "_grouped_mm", spy)
    return calls


def make_inputs(E: int, n: int, dtype, swiglu: bool, seed: int = 0):
    """Unit-size rows and weights scaled by 1/sqrt(fan-in), rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(E, D, F_HIDDEN, generator=g) * D ** -0.5, torch.randn(E, F_HIDDEN, D, generator=g) * F_HIDDEN ** -0.5,
         torch.randn(E, D, F_HIDDEN, generator=g) * D ** -0.5 if swiglu else None]
    rows, gy = torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)
    return [t.to(dtype) if t is not None else None for t in (rows, *w)], gy.to(dtype)


def run(fn, inputs, counts, swiglu, gy=None):
    """fn(rows, w1, w2, w3, counts, swiglu) forward and backward (gy, or y.sum() when None) on fresh
    leaves: [y, dL/drows, dL/dw1, dL/dw2(, dL/dw3)]."""
    ts = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    y = fn(*ts, counts, swiglu)
    y.backward(gy) if gy is not None else y.sum().backward()
    return [y.detach()] + [t.grad for t in ts if t is not None]


def run_reference(inputs, counts, swiglu, gy=None):
    """GroupedExperts.forward_reference (row by row, the FFN of its expert by autograd over the indexed
    stacked weights), with each row's one expert at gate 1: the same outputs and gradients as run()."""
    rows, w1, w2, w3 = inputs
    ex = GroupedExperts(w1.shape[0], D, F_HIDDEN, "swiglu" if swiglu else "gelu",
                        ParallelContext.single_process(), normal(1.0), normal(1.0)).to(rows.dtype)
    with torch.no_grad():
        for p, w in ((ex.w1, w1), (ex.w2, w2), (ex.w3, w3)):
            if p is not None:
                p.copy_(w)
    x = rows.detach().clone().requires_grad_()
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    y = ex.forward_reference(x, expert_of_row.unsqueeze(1), torch.ones(len(expert_of_row), 1))
    if y.requires_grad:  # with no rows at all, forward_reference returns zeros outside any graph
        y.backward(gy) if gy is not None else y.sum().backward()
    # An expert without rows never enters forward_reference's graph: its gradient is None, read as 0.
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in (ex.w1, ex.w2, ex.w3) if p is not None]
    return [y.detach(), x.grad if x.grad is not None else torch.zeros_like(x)] + grads


def assert_close_eps(got, want, dtype, what: str):
    """|got - want| <= TOL_EPS * eps(dtype) * max|want| per tensor: both sides round to dtype at every
    stage, each within ~2 eps of max of the exact values (see grouped_ffn.SELF_TEST_TOL_EPS)."""
    names = ["y", "rows", "w1", "w2", "w3"]
    assert len(got) == len(want)
    for name, a, b in zip(names, got, want):
        assert a is not None and a.shape == b.shape and a.dtype == dtype, f"{what}: {name}"
        assert torch.isfinite(a).all(), f"{what}: {name} not finite"
        if b.numel():
            err = float((a.double() - b.double()).abs().max())
            tol = TOL_EPS * torch.finfo(dtype).eps * (float(b.abs().max()) or 1.0)
            assert err <= tol, f"{what}: {name} error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("act", ["gelu", "swiglu"])
@pytest.mark.parametrize("counts", COUNTS, ids=lambda c: "-".join(map(str, c)))
def test_grouped_mm_ffn_equals_loop_and_reference(dtype, act, counts, kernel_calls):
    swiglu = act == "swiglu"
    inputs, gy = make_inputs(len(counts), sum(counts), dtype, swiglu)
    grouped = run(gf._grouped_mm_ffn, inputs, counts, swiglu, gy)
    assert_close_eps(grouped, run(gf._GroupedFFNFunction.apply, inputs, counts, swiglu, gy), dtype, "vs loop")
    assert_close_eps(grouped, run_reference(inputs, counts, swiglu, gy), dtype, "vs reference")
    # Every expert gets a gradient of its full shape; one without rows exactly 0 (the EDP all-reduce).
    empty = [e for e, c in enumerate(counts) if c == 0]
    for name, gw, w in zip(["w1", "w2", "w3"], grouped[2:], inputs[1:]):
        assert gw.shape == w.shape, name
        if empty:
            assert gw[empty].abs().max() == 0, f"grad {name} of an expert without rows"
    # The kernel ran, and never on an empty group: one group per expert with rows, offsets increasing.
    live = [c for c in counts if c]
    if live:
        assert len(kernel_calls) == (3 if swiglu else 2)
    else:
        assert kernel_calls == []  # no rows: the loop node, nothing for the kernel to compute
    for groups, offs in kernel_calls:
        assert groups == len(live) and offs == torch.tensor(live).cumsum(0).tolist()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_expanded_output_gradient(dtype, act):
    """y.sum() hands backward an expanded (stride 0) gradient, which torch._grouped_mm's backward rejects
    with "Invalid strides/sizes"; a failure inside backward could not fall back to the loop."""
    counts, swiglu = [0, 5, 0, 8, 3, 0], act == "swiglu"
    inputs, _ = make_inputs(len(counts), sum(counts), dtype, swiglu)
    assert_close_eps(run(gf._grouped_mm_ffn, inputs, counts, swiglu),
                     run(gf._GroupedFFNFunction.apply, inputs, counts, swiglu), dtype, "y.sum()")


def test_policy(monkeypatch):
    rows, w1 = torch.empty(3, D), torch.empty(2, D, F_HIDDEN)
    assert gf.GroupedFFN.policy == "auto"
    for dt in DTYPES:  # production default: CPU always takes the loop
        assert not gf.GroupedFFN.use_grouped_mm(rows.to(dt), w1.to(dt))
    monkeypatch.setattr(gf.GroupedFFN, "policy", "always")
    for dt in DTYPES:
        assert gf.GroupedFFN.use_grouped_mm(rows.to(dt), w1.to(dt))
    assert not gf.GroupedFFN.use_grouped_mm(rows.double(), w1.double())  # the kernel rejects float64
    assert not gf.GroupedFFN.use_grouped_mm(torch.empty(3, 12).bfloat16(), w1.bfloat16())  # 24-byte rows
    assert gf.GroupedFFN.use_grouped_mm(torch.empty(3, 12), torch.empty(2, 12, 4))  # 48, 16 bytes in fp32
    monkeypatch.setattr(gf.GroupedFFN, "policy", "never")
    assert not gf.GroupedFFN.use_grouped_mm(rows, w1)
    monkeypatch.setattr(gf.GroupedFFN, "policy", "sometimes")
    with pytest.raises(ValueError, match="policy"):
        gf.GroupedFFN.use_grouped_mm(rows, w1)


@pytest.mark.parametrize("policy,uses_kernel", [("auto", False), ("always", True)])
def test_grouped_ffn_follows_policy(policy, uses_kernel, kernel_calls, monkeypatch):
    monkeypatch.setattr(gf.GroupedFFN, "policy", policy)
    counts = [0, 5, 0, 3]
    inputs, gy = make_inputs(4, 8, torch.bfloat16, False)
    got = run(gf.grouped_ffn, inputs, counts, False, gy)
    assert bool(kernel_calls) == uses_kernel
    assert_close_eps(got, run(gf._GroupedFFNFunction.apply, inputs, counts, False, gy), torch.bfloat16, policy)


def test_always_policy_raises_instead_of_falling_back(monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("no kernel for this layout")
    monkeypatch.setattr(torch, "_grouped_mm", broken)
    monkeypatch.setattr(gf.GroupedFFN, "policy", "always")
    inputs, _ = make_inputs(2, 4, torch.float32, False)
    with pytest.raises(RuntimeError, match="no kernel"):
        gf.grouped_ffn(*inputs, [1, 3], False)
    assert gf.GroupedFFN.grouped_mm_failed is None


@pytest.mark.parametrize("k,h,cf,act", [(2, 1, 1.0, "gelu"), (1, 4, 0.0, "swiglu"), (2, 4, 0.0, "gelu")])
def test_layer_on_grouped_mm_equals_reference(k, h, cf, act, kernel_calls, monkeypatch):
    """The whole layer with every expert FFN on torch._grouped_mm (the fused combine node steps aside)."""
    from megatron_mhmoe.moe.layer import MHMoELayer
    from tests.moe.test_layer import SP, assert_layer_matches_reference, cfg_of
    monkeypatch.setattr(gf.GroupedFFN, "policy", "always")
    torch.manual_seed(0)
    assert_layer_matches_reference(MHMoELayer(cfg_of(k=k, h=h, proj=h > 1, cf=cf, act=act, gate="softmax"), SP))
    assert kernel_calls


def max_err_eps(report: str) -> float:
    return float(re.search(r"max err (\S+) eps", report).group(1))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
def test_self_test_passes_on_cpu(dtype, kernel_calls):
    ok, report = gf.grouped_mm_self_test(torch.device("cpu"), dtype)
    assert ok, report
    assert report.startswith("grouped-gemm self-test: PASS") and "\n" not in report
    assert 0 <= max_err_eps(report) <= TOL_EPS
    assert kernel_calls, "the self-test must run the kernel"
    assert all(groups == 3 for groups, _ in kernel_calls)  # SELF_TEST_COUNTS: 3 experts of 6 have rows


@pytest.mark.parametrize("fault", ["shifted_offsets", "scaled_64_eps", "raises_in_backward"])
def test_self_test_catches_faulty_kernel(fault, monkeypatch):
    """A kernel that mixes up groups, is off by 64 eps (well inside the former 10%-of-max tolerance), or
    fails in backward must fail the self-test, which reports instead of raising."""
    real, dtype = torch._grouped_mm, torch.float32
    eps = torch.finfo(dtype).eps

    class _FailingBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return y.view_as(y)

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("Invalid strides/sizes")

    def faulty(a, b, *args, offs=None, **kw):
        if fault == "shifted_offsets":
            offs = offs.clone()
            offs[:-1] -= 1
        y = real(a, b, *args, offs=offs, **kw)
        if fault == "scaled_64_eps":
            return y * (1 + 64 * eps)
        return _FailingBackward.apply(y) if fault == "raises_in_backward" else y

    monkeypatch.setattr(torch, "_grouped_mm", faulty)
    ok, report = gf.grouped_mm_self_test(torch.device("cpu"), dtype)
    assert not ok and report.startswith("grouped-gemm self-test: FAIL"), report
    if fault == "raises_in_backward":
        assert "Invalid strides/sizes" in report
    else:
        assert max_err_eps(report) > TOL_EPS


def test_self_test_cli_prints_one_line():
    out = subprocess.run([sys.executable, "-m", "megatron_mhmoe.moe.grouped_ffn", "--self-test", "--device", "cpu",
                          "--dtype", "bf16"], capture_output=True, text=True, timeout=300)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and len(lines) == 1, (out.stdout, out.stderr)
    assert lines[0].startswith("grouped-gemm self-test: PASS") and "dtype=bfloat16" in lines[0]
    assert max_err_eps(lines[0]) <= TOL_EPS
