"""Single-process properties of the MH-MoE layer: fast path vs slow reference, the sub-token layout,
capacity against a queue-walking reference, SMoE/dense special cases, statistics and errors."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.moe import capacity as cap
from megatron_mhmoe.moe.layer import MHMoELayer
from megatron_mhmoe.moe.metrics import (activation_ratio, divergence_histogram, effective_experts,
                                        expert_shares, mean_divergence)
from megatron_mhmoe.moe.dispatcher import MoEDispatcher
from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.parallel.layout import RankLayout

SP = ParallelContext.single_process()


def cfg_of(d=32, E=8, k=2, h=4, proj=True, cf=0.0, act="gelu", gate="xmoe", f=16) -> ModelConfig:
    return ModelConfig(hidden_size=d, num_attention_heads=4, moe=MoEConfig(
        num_experts=E, top_k=k, num_heads=h, head_projection=proj, expert_hidden_size=f,
        capacity_factor=cf, expert_activation=act, gate=gate))


@pytest.mark.parametrize("k,h,cf,act,gate", list(itertools.product(
    [1, 2], [1, 4], [0.0, 1.0], ["gelu", "swiglu"], ["xmoe", "softmax"])))
def test_grouped_experts_equal_loop_reference(k, h, cf, act, gate):
    torch.manual_seed(0)
    assert_layer_matches_reference(MHMoELayer(cfg_of(k=k, h=h, proj=h > 1, cf=cf, act=act, gate=gate), SP))


def assert_layer_matches_reference(layer: MHMoELayer) -> None:
    """The layer's fast path against its slow reference: output and every parameter gradient."""
    x = torch.randn(12, 2, 32)
    y, _ = layer(x)
    y.square().sum().backward()
    fast = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    y_ref = layer.forward_reference(x)
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5)
    for n, p in layer.named_parameters():
        torch.testing.assert_close(fast[n], p.grad, atol=1e-5, rtol=1e-4, msg=f"grad of {n}")


def test_one_expert_h1_equals_dense_ffn():
    """E=1, k=1, h=1, no projections: the gate value is softmax over one expert = 1, so y = FFN(x)."""
    layer = MHMoELayer(cfg_of(E=1, k=1, h=1, proj=False, f=24), SP)
    x = torch.randn(5, 3, 32)
    y, st = layer(x)
    w1, w2 = layer.experts.w1[0], layer.experts.w2[0]
    torch.testing.assert_close(y, F.gelu(x @ w1) @ w2, atol=1e-6, rtol=1e-5)
    assert st.aux_loss.item() == pytest.approx(1.0)  # E * f * P = 1 * 1 * 1


def test_subtokens_are_token_major():
    """Sub-token j of token t is columns [j*d/h, (j+1)*d/h) of token t, routed on its own.

    Without projections, y[t, block j] must be gate * FFN_e(x[t, block j]) with e the expert that block
    chose. A head-major reshape (x.view(h, n, d/h)) or a wrong merge would pair blocks with other tokens.
    The sub-tokens are built so that block j routes to expert j, which also fixes the divergence to h.
    """
    h, d, E = 4, 12, 4
    layer = MHMoELayer(cfg_of(d=d, E=E, k=1, h=h, proj=False, gate="softmax"), SP)
    n = 6
    x = torch.zeros(n, 1, d)
    for t in range(n):
        for j in range(h):
            x[t, 0, 3 * j:3 * j + 3] = torch.tensor([j + 1.0, 1.0, 0.1 * (t + 1)])
    with torch.no_grad():  # logit_e = 10(e+1)(j+1) - 5(e+1)^2 is largest at e = j
        for e in range(E):
            layer.router.proj.weight[e] = torch.tensor([10.0 * (e + 1), -5.0 * (e + 1) ** 2, 0.0])
    y, st = layer(x)
    for t in range(n):
        for j in range(h):
            xs = x[t, 0, 3 * j:3 * j + 3]
            probs = torch.softmax(layer.router(xs[None]), -1)[0]
            assert int(probs.argmax()) == j
            want = probs[j] * (F.gelu(xs @ layer.experts.w1[j]) @ layer.experts.w2[j])
            torch.testing.assert_close(y[t, 0, 3 * j:3 * j + 3], want, atol=1e-6, rtol=1e-5)
    assert st.divergence.tolist() == [0] * h + [n]  # every token spread over h distinct experts
    assert st.selections.tolist() == [n] * E


@pytest.mark.parametrize("k,E,tp", [(1, 4, 1), (2, 4, 1), (2, 8, 2), (1, 3, 4), (2, 16, 4)])
def test_capacity_matches_queue_walk(k, E, tp):
    """Vectorised capacity (with the TP offsets) == walking the replica's queue one assignment at a time."""
    g = torch.Generator().manual_seed(k * 100 + E)
    for trial in range(20):
        S_local = 4 * (trial % 5 + 1)
        experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(S_local * tp)])  # (S, k)
        # Skew the routing so that some experts overflow.
        experts[: S_local * tp // 2, 0] = 0
        capacity = cap.expert_capacity(1.0, k, S_local * tp, E)
        want = cap.capacity_keep_reference(experts, E, capacity)  # (S, k)
        shards = experts.chunk(tp, dim=0)
        counts_all = torch.stack([cap.local_choice_counts(s, E) for s in shards])
        for r, shard in enumerate(shards):
            got = cap.capacity_keep(shard, counts_all, r, capacity).view(k, -1).t()  # (S_local, k)
            assert torch.equal(got, want.chunk(tp, dim=0)[r]), f"trial {trial} rank {r}"
        assert not want.all(), "the skew must overflow an expert"


def test_capacity_drops_exactly_over_capacity_assignments():
    layer = MHMoELayer(cfg_of(E=4, k=1, h=1, proj=False, cf=1.0, gate="softmax"), SP)
    with torch.no_grad():
        layer.router.proj.weight.zero_()
        layer.router.proj.weight[2, 0] = 50.0  # every sub-token picks expert 2
    x = torch.rand(8, 1, 32) + 0.5
    y, st = layer(x)
    capacity = 2  # ceil(capacity_factor 1.0 * k 1 * 8 sub-tokens / 4 experts), by hand
    assert cap.expert_capacity(1.0, 1, 8, 4) == capacity
    assert st.kept.tolist() == [0, 0, capacity, 0]
    assert st.dropped == 8 - capacity
    # The first `capacity` tokens (queue order) are processed; dropped tokens output exactly zero.
    assert (y[:capacity].abs().sum(-1) > 0).all()
    assert (y[capacity:] == 0).all()


def test_dropless_never_drops():
    layer = MHMoELayer(cfg_of(cf=0.0), SP)
    _, st = layer(torch.randn(16, 2, 32))
    assert st.dropped == 0 and int(st.kept.sum()) == 16 * 2 * 4 * 2


def test_router_is_fp32_under_bf16():
    layer = MHMoELayer(cfg_of(), SP).to(torch.bfloat16)
    x = torch.randn(8, 2, 32, dtype=torch.bfloat16)
    assert layer.router(x.reshape(-1, 8)).dtype == torch.float32
    y, st = layer(x)
    assert y.dtype == torch.bfloat16
    assert torch.isfinite(st.aux_loss) and st.aux_loss.dtype == torch.float32


def test_metrics():
    uniform = expert_shares(torch.full((2, 8), 5))
    assert activation_ratio(uniform, 0.5) == 1.0
    torch.testing.assert_close(effective_experts(uniform), torch.full((2,), 8.0, dtype=torch.float64))
    collapsed = expert_shares(torch.tensor([[40, 0, 0, 0, 0, 0, 0, 0]]))
    assert activation_ratio(collapsed, 0.5) == pytest.approx(1 / 8)
    assert float(effective_experts(collapsed)) == pytest.approx(1.0)
    # token 0 -> experts {1}; token 1 -> {0, 2, 3}
    hist = divergence_histogram(torch.tensor([[1], [1], [1], [0], [2], [3]]), num_heads=3)
    assert hist.tolist() == [0, 1, 0, 1]
    assert mean_divergence(hist) == pytest.approx(2.0)


def test_errors_name_the_arithmetic():
    with pytest.raises(ValueError, match=r"32 % 5 = 2"):
        cfg_of(h=5).validate()
    with pytest.raises(ValueError, match=r"num_experts 6 is not divisible by expert-parallel size 4"):
        cfg_of(E=6).validate_for_parallel(1, 4)
    with pytest.raises(ValueError, match=r"top_k=3"):
        cfg_of(E=2, k=3).validate()
    two_ep = ParallelContext(coords=RankLayout(rank=0, world_size=2, tp_size=1, ep_size=2))
    with pytest.raises(ValueError, match=r"7 % 2 = 1"):
        MoEDispatcher(two_ep, 7)
