"""The layer routes through one RoutingRecord per forward. The record must change nothing: output,
gradients, drop counts and statistics equal, bit for bit (CPU fp32), those of the forward as it was
before the record (frozen below, built from the same capacity/dispatcher functions it called), and the
output and gradients equal the slow loop reference within the usual fp32 tolerance."""
from __future__ import annotations

import itertools

import pytest
import torch

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.moe import capacity as cap
from megatron_mhmoe.moe.layer import MHMoELayer
from megatron_mhmoe.moe.losses import load_balance_loss
from megatron_mhmoe.moe.metrics import MoEStats, divergence_histogram
from megatron_mhmoe.moe.router import top_k
from megatron_mhmoe.moe.routing import build_record, choice_major, dispatch_record
from megatron_mhmoe.parallel.context import ParallelContext

SP = ParallelContext.single_process()


def frozen_forward(layer: MHMoELayer, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
    """MHMoELayer.forward before the routing record (one process: TP = 1), kept as it was."""
    moe, disp = layer.moe, layer.dispatcher
    shape = x.shape
    d, h, k, E = shape[-1], moe.num_heads, moe.top_k, moe.num_experts
    tokens = disp.split_tokens(x.reshape(-1, d))
    n = tokens.shape[0]
    x_hat = layer.head(tokens) if layer.head is not None else tokens
    x_sub = x_hat.reshape(n * h, layer.d_sub)
    logits = layer.router(x_sub)
    choice = top_k(logits, k)
    local_counts = cap.local_choice_counts(choice.experts, E)
    counts_all = disp.replica_counts(local_counts)
    tp_shards = counts_all.shape[0]
    S = n * h * tp_shards
    capacity = cap.expert_capacity(moe.capacity_factor, k, S, E)
    order = torch.argsort(choice.experts.t().reshape(-1), stable=True)
    keep = cap.capacity_keep(choice.experts, counts_all, 0, capacity, order) if capacity > 0 else None
    y_sub = disp.dispatch(x_sub, dispatch_record(choice.experts, choice.gates, keep, order), layer.experts)
    y = y_sub.reshape(n, d)
    if layer.merge is not None:
        y = layer.merge(y)
    y = disp.gather_tokens(y).reshape(shape)
    per = max(S, 1)
    # Balance counts: all k choices / k (issue 22's default; the frozen forward counted first choices then).
    aux = load_balance_loss(disp.replica_sum(choice.probs.sum(0)), counts_all.sum((0, 1)), per, k)
    z = disp.replica_sum(choice.lse.square().sum()) / per
    with torch.no_grad():
        e_flat = choice.experts.t().reshape(-1)
        kept_local = torch.bincount(e_flat[keep] if keep is not None else e_flat, minlength=E)
        div_local = divergence_histogram(choice.experts, moe.num_heads)
        both = disp.replica_sum_stats(torch.cat([kept_local, div_local]))
    return y, MoEStats(aux_loss=aux, z_loss=z, selections=counts_all.sum((0, 1)), kept=both[:E],
                       divergence=both[E:], num_tokens=n * tp_shards, num_sub_tokens=S)


def make_layer(k: int, h: int, cf: float, gate: str) -> MHMoELayer:
    cfg = ModelConfig(hidden_size=32, num_attention_heads=4, moe=MoEConfig(
        num_experts=8, top_k=k, num_heads=h, head_projection=h > 1, expert_hidden_size=16,
        capacity_factor=cf, gate=gate))
    torch.manual_seed(11)
    layer = MHMoELayer(cfg, SP)
    with torch.no_grad():  # uneven routing, so that a capacity of 1.0 really drops assignments
        for p in layer.router.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return layer


def run(layer: MHMoELayer, x: torch.Tensor, fwd, losses: bool = True) -> dict:
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    y, st = fwd(x)
    (y.square().sum() + (st.aux_loss + st.z_loss if losses else 0.0)).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return dict(y=y.detach(), x_grad=x.grad, grads=grads, aux=st.aux_loss.detach(), z=st.z_loss.detach(),
                selections=st.selections, kept=st.kept, divergence=st.divergence, dropped=st.dropped,
                tokens=st.num_tokens, sub_tokens=st.num_sub_tokens)


CASES = list(itertools.product([1, 2], [1, 4], [0.0, 1.0], ["xmoe", "softmax"]))


@pytest.mark.parametrize("k,h,cf,gate", CASES)
def test_record_forward_equals_the_frozen_forward_bit_for_bit(k, h, cf, gate):
    layer = make_layer(k, h, cf, gate)
    x = torch.randn(12, 2, 32, generator=torch.Generator().manual_seed(5))
    got = run(layer, x, layer)
    want = run(layer, x, lambda t: frozen_forward(layer, t))
    for key in ("y", "x_grad", "aux", "z", "selections", "kept", "divergence"):
        assert torch.equal(got[key], want[key]), key
    for name in want["grads"]:
        assert torch.equal(got["grads"][name], want["grads"][name]), f"grad of {name}"
    assert (got["dropped"], got["tokens"], got["sub_tokens"]) == (want["dropped"], want["tokens"], want["sub_tokens"])
    if cf > 0 and k == 2:
        assert got["dropped"] > 0, "the case must exercise the keep mask"
    # And both are the layer's maths: the loop reference gives the same output and gradients.
    fast = run(layer, x, layer, losses=False)
    layer.zero_grad()
    xr = x.clone().requires_grad_(True)
    y_ref = layer.forward_reference(xr)
    y_ref.square().sum().backward()
    torch.testing.assert_close(fast["y"], y_ref.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fast["x_grad"], xr.grad, atol=1e-5, rtol=1e-4)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(fast["grads"][name], p.grad, atol=1e-5, rtol=1e-4, msg=f"grad of {name}")


def test_record_holds_the_derived_routing_once():
    """The record's fields are the quantities capacity and the dispatcher used to re-derive."""
    layer = make_layer(2, 4, 1.0, "xmoe")
    x_sub = torch.randn(40, layer.d_sub, generator=torch.Generator().manual_seed(2))
    choice = top_k(layer.router(x_sub), 2)
    capacity = cap.expert_capacity(1.0, 2, 40, 8)
    rec = build_record(choice, 8, capacity, layer.dispatcher, 0)
    flat = choice.experts.t().reshape(-1)
    assert torch.equal(rec.flat_experts, flat) and torch.equal(choice_major(choice.experts), flat)
    assert torch.equal(rec.order, torch.argsort(flat, stable=True))
    assert torch.equal(rec.local_counts, cap.local_choice_counts(choice.experts, 8))
    assert torch.equal(rec.counts_all, rec.local_counts[None])
    assert rec.capacity == capacity
    want_keep = cap.capacity_keep_reference(choice.experts, 8, capacity)  # (S, k)
    assert torch.equal(rec.keep.view(2, 40).t(), want_keep)
