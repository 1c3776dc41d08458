"""bf16 expert FFN values against fp32, not only dtypes: bf16 weights and rows, and fp32 weights under CPU
autocast, for the per-expert loop node and (where torch has it) torch._grouped_mm.

Tolerance: every output and gradient within TOL_EPS x eps(bf16) x max|exact| of the float64 result on
the same bf16-rounded inputs. bf16 keeps 8 significant bits (eps 2^-7); the products accumulate in fp32,
so what remains is the rounding of the (rows, f) hidden activations and of the outputs to bf16: at most a few
eps (0.8 measured here). A kernel that computes in the wrong precision or drops an expert misses by far more.
"""
from __future__ import annotations

import pytest
import torch

from megatron_mhmoe.moe import grouped_ffn as gf
from megatron_mhmoe.moe.experts import GroupedExperts
from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.parallel.init import normal

TOL_EPS = 8.0
EPS = torch.finfo(torch.bfloat16).eps
D, F_HIDDEN = 16, 32
COUNTS = [5, 0, 9, 2]
POLICIES = ["never"] + (["always"] if hasattr(torch, "_grouped_mm") else [])


def experts(act: str) -> GroupedExperts:
    torch.manual_seed(0)
    ex = GroupedExperts(len(COUNTS), D, F_HIDDEN, act, ParallelContext.single_process(), normal(0.02), normal(0.02))
    with torch.no_grad():  # O(1) activations, so that GELU/SiLU are far from linear
        for w, fan_in in ((ex.w1, D), (ex.w2, F_HIDDEN), (ex.w3, D)):
            if w is not None:
                w.normal_(0.0, fan_in ** -0.5).copy_(w.bfloat16().float())  # exactly representable in bf16
    return ex


def forward_backward(ex: GroupedExperts, rows: torch.Tensor, gy: torch.Tensor) -> list[torch.Tensor]:
    ex.zero_grad(set_to_none=True)
    rows = rows.detach().clone().requires_grad_()
    y = ex(rows, COUNTS)
    y.backward(gy.to(y.dtype))
    return [y.detach(), rows.grad] + [w.grad for w in (ex.w1, ex.w2, ex.w3) if w is not None]


def exact(ex: GroupedExperts, rows: torch.Tensor, gy: torch.Tensor) -> list[torch.Tensor]:
    """float64 autograd over the per-expert loop on the same (bf16-representable) values."""
    ex64 = experts(ex.activation).double()
    ex64.load_state_dict({k: v.double() for k, v in ex.state_dict().items()})
    rows = rows.detach().double().requires_grad_()
    y = ex64.forward_loop(rows, COUNTS)
    y.backward(gy.double())
    return [y.detach(), rows.grad] + [w.grad for w in (ex64.w1, ex64.w2, ex64.w3) if w is not None]


def inputs():
    g = torch.Generator().manual_seed(1)
    n = sum(COUNTS)
    return torch.randn(n, D, generator=g).bfloat16().float(), torch.randn(n, D, generator=g).bfloat16().float()


def assert_within(got: list, want: list, label: str) -> None:
    for i, (a, b) in enumerate(zip(got, want)):
        scale = float(b.abs().max())
        err = float((a.double() - b).abs().max())
        assert scale > 0, (label, i)
        assert err <= TOL_EPS * EPS * scale, f"{label} tensor {i}: error {err / (EPS * scale):.2f} eps of max|exact|"


@pytest.fixture(params=POLICIES)
def policy(request, monkeypatch):
    monkeypatch.setattr(gf.GroupedFFN, "policy", request.param)
    return request.param


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_bf16_weights_and_rows_match_fp32(act, policy):
    ex = experts(act)
    rows, gy = inputs()
    want = exact(ex, rows, gy)
    got = forward_backward(ex.to(torch.bfloat16), rows.bfloat16(), gy.bfloat16())
    assert all(t.dtype == torch.bfloat16 for t in got)
    assert_within(got, want, f"bf16 {act} {policy}")
    assert float(got[3][1].abs().max()) == 0.0  # expert 1 got no rows: exact zero gradient


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_autocast_bf16_matches_fp32(act, policy):
    ex = experts(act)
    rows, gy = inputs()
    want = exact(ex, rows, gy)
    ex.zero_grad(set_to_none=True)
    r = rows.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ex(r, COUNTS)
    assert y.dtype == torch.bfloat16
    y.backward(gy.bfloat16())
    got = [y.detach(), r.grad] + [w.grad for w in (ex.w1, ex.w2, ex.w3) if w is not None]
    assert ex.w1.grad.dtype == torch.float32  # the fp32 master weights get fp32 gradients
    assert_within(got, want, f"autocast {act} {policy}")
