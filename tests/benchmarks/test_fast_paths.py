"""The fast paths the benchmarks time equal their obvious versions (values and gradients)."""
from __future__ import annotations

import pytest
import torch

from megatron_mhmoe.moe import grouped_ffn as grouped_ffn_module
from megatron_mhmoe.moe.experts import GroupedExperts
from megatron_mhmoe.moe.router import top_k
from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.parallel.init import normal


def small_experts(act: str, chunk_rows, monkeypatch) -> GroupedExperts:
    """4 experts 8 -> 16 -> 8 with O(1) weights; chunk_rows makes grouped_ffn cut its row chunks that small."""
    if chunk_rows:
        monkeypatch.setattr(grouped_ffn_module, "CHUNK_ELEMS", chunk_rows * 16)
    torch.manual_seed(0)
    ex = GroupedExperts(4, 8, 16, act, ParallelContext.single_process(), normal(0.5), normal(0.5))
    for w in (ex.w1, ex.w2, ex.w3):
        if w is not None:
            torch.nn.init.normal_(w, std=0.5)
    return ex


@pytest.mark.parametrize("chunk_rows", [None, 3])
@pytest.mark.parametrize("act", ["gelu", "swiglu"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 7, 0], [2, 2, 2, 2]])
def test_grouped_ffn_equals_autograd_loop(act, counts, chunk_rows, monkeypatch):
    """chunk_rows=3: row chunks cut through experts, whose weight gradients then sum the pieces."""
    ex = small_experts(act, chunk_rows, monkeypatch)
    rows = torch.randn(sum(counts), 8, requires_grad=True)
    g = torch.randn(sum(counts), 8)
    grads = []
    for fn in (ex.forward, ex.forward_loop):
        ex.zero_grad(set_to_none=True)
        rows.grad = None
        y = fn(rows, counts)
        y.backward(g)
        grads.append((y.detach(), rows.grad.clone(), *[w.grad.clone() for w in (ex.w1, ex.w2, ex.w3) if w is not None]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for e, c in enumerate(counts):  # an expert without rows: exact zero gradient, never None
        if c == 0:
            assert ex.w1.grad[e].abs().max() == 0 and ex.w2.grad[e].abs().max() == 0


def test_grouped_ffn_bf16_and_autocast(monkeypatch):
    """dtype and values: bf16 results within 8 bf16 eps of the largest fp32 value (gradients: test_grouped_ffn_bf16)."""
    ex = small_experts("gelu", None, monkeypatch)
    rows = torch.randn(9, 8)
    ref = ex(rows, [2, 3, 0, 4]).detach()  # fp32
    tol = 8 * torch.finfo(torch.bfloat16).eps * float(ref.abs().max())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ex(rows, [2, 3, 0, 4]).detach()
    assert y.dtype == torch.bfloat16
    assert float((y.float() - ref).abs().max()) <= tol
    y16 = ex.to(torch.bfloat16)(rows.bfloat16(), [2, 3, 0, 4]).detach()
    assert y16.dtype == torch.bfloat16
    assert float((y16.float() - ref).abs().max()) <= 2 * tol  # weights rounded to bf16 too


@pytest.mark.parametrize("k", [1, 2])
def test_lse_from_top1_equals_logsumexp(k):
    logits = (3 * torch.randn(64, 16, dtype=torch.float32)).requires_grad_()
    g = torch.randn(64)
    lse = top_k(logits, k).lse
    lse.backward(g)
    fast = logits.grad.clone()
    logits.grad = None
    ref = torch.logsumexp(logits, -1)
    ref.backward(g)
    torch.testing.assert_close(lse, ref, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(fast, logits.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("chunk_rows", [None, 3])
@pytest.mark.parametrize("act", ["gelu", "swiglu"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 7, 0], [2, 2, 2, 2]])
def test_grouped_ffn_combine_equals_gather_ffn_combine(act, counts, chunk_rows, monkeypatch):
    """The EP=1 fused node (rows gathered per chunk, gate-weighted combine inside) against autograd over
    gather -> per-expert loop -> scale -> index_add: output and every gradient (x, gates, weights)."""
    monkeypatch.setattr(grouped_ffn_module, "COMBINE_MIN_WIDTH", 1)
    ex = small_experts(act, chunk_rows, monkeypatch)
    S, n = 6, sum(counts)
    x = torch.randn(S, 8, requires_grad=True)
    gates = torch.rand(n, requires_grad=True)
    src = torch.randint(0, S, (n,))
    g = torch.randn(S, 8)
    results = []
    for fused in (True, False):
        ex.zero_grad(set_to_none=True)
        x.grad = gates.grad = None
        if fused:
            y = ex.forward_combine(x, src, gates, counts, S)
        else:
            out = ex.forward_loop(x.index_select(0, src), counts) * gates.unsqueeze(1)
            y = torch.zeros(S, 8).index_add(0, src, out)
        y.backward(g)
        results.append((y.detach(), x.grad.clone(), gates.grad.clone(),
                        *[w.grad.clone() for w in (ex.w1, ex.w2, ex.w3) if w is not None]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("width", [1, 10 ** 9])
@pytest.mark.parametrize("k,h,cf,act", [(2, 1, 1.0, "gelu"), (1, 4, 0.0, "swiglu"), (2, 4, 1.0, "gelu")])
def test_layer_fused_combine_equals_reference(k, h, cf, act, width, monkeypatch):
    """The layer with (width=1) and without the fused gather/FFN/combine node against the loop reference."""
    from tests.moe.test_layer import SP, assert_layer_matches_reference, cfg_of
    from megatron_mhmoe.moe.layer import MHMoELayer
    monkeypatch.setattr(grouped_ffn_module, "COMBINE_MIN_WIDTH", width)
    torch.manual_seed(0)
    assert_layer_matches_reference(MHMoELayer(cfg_of(k=k, h=h, proj=h > 1, cf=cf, act=act, gate="softmax"), SP))
