"""The routing and balancing defaults that follow DeepSeek-V3 (arXiv 2412.19437, section 2.1.2) and
Megatron-core, on hand-computed cases (issue 22):

- the balance losses' f counts the top-k of the UNBIASED scores over all experts, all k choices / k
  (Eq. 18), in the micro-batch, sequence-wise and global-batch losses; 'first_choice' keeps GShard/Switch's
  routed first choice;
- the sigmoid gate at k = 1 is the raw score x gate_scaling, so the LM loss reaches the router;
- a group's score is the sum of its best k/M scores (DeepSeek-V3's "highest K_r/M affinity scores");
- softmax with a group limit at k > 1 renormalises the gates over the k.
"""
from __future__ import annotations

import math

import pytest
import torch

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.moe.layer import MHMoELayer
from megatron_mhmoe.moe.router import choose, group_limited_reference
from megatron_mhmoe.parallel.context import ParallelContext

SP = ParallelContext.single_process()


def plain_layer(E: int, k: int, gate="sigmoid", counting="topk", bias=0.0, scaling=1.0, **moe) -> MHMoELayer:
    """h = 1, no projections, d = 8: a token IS its sub-token, and the router's column 0 gives its logits."""
    cfg = ModelConfig(hidden_size=8, num_attention_heads=4, moe=MoEConfig(
        num_experts=E, top_k=k, num_heads=1, head_projection=False, expert_hidden_size=4, gate=gate,
        balance_counting=counting, bias_update_rate=bias, gate_scaling=scaling, seq_aux_loss_coef=1.0,
        global_aux_loss_coef=1.0, **moe))
    torch.manual_seed(0)
    return MHMoELayer(cfg, SP)


def route_logits(layer: MHMoELayer, logits: list[float], tokens: int) -> torch.Tensor:
    """Every token (one sequence of `tokens`) gets the router logits `logits`; returns the input (s, 1, d)."""
    with torch.no_grad():
        layer.router.proj.weight.zero_()
        layer.router.proj.weight[:, 0] = torch.tensor(logits)
    x = torch.zeros(tokens, 1, 8)
    x[..., 0] = 1.0
    return x


def losses(st) -> list[float]:
    return [float(st.aux_loss.detach()), float(st.seq_aux_loss.detach()), float(st.global_aux_loss.detach())]


@pytest.mark.parametrize("counting,want", [("topk", 1.2), ("first_choice", 0.8)])
def test_biased_k1_example_counts_the_unbiased_choice(counting, want):
    """E=2, k=1, sigmoid; two tokens with scores (0.6, 0.4), bias (0, 0.3). The bias routes both to expert 1
    (0.6 < 0.4 + 0.3), but their unbiased top-1 is expert 0: f = (1, 0), P = (0.6, 0.4) -> 2 x 0.6 = 1.2
    (DeepSeek-V3 Eq. 18, Megatron-core). Counting the routed first choice: f = (0, 1) -> 2 x 0.4 = 0.8."""
    layer = plain_layer(2, 1, counting=counting, bias=0.01)
    layer.expert_bias.value.copy_(torch.tensor([0.0, 0.3]))
    x = route_logits(layer, [math.log(0.6 / 0.4), math.log(0.4 / 0.6)], tokens=2)
    _, st = layer(x)
    assert st.selections.tolist() == [0, 2]  # routed by the bias
    assert losses(st) == pytest.approx([want] * 3, rel=1e-5)  # micro-batch, sequence (one), global (first micro)


@pytest.mark.parametrize("counting,want", [("topk", 1.0), ("first_choice", 1.96)])
def test_all_k_choices_count_divided_by_k(counting, want):
    """E = k = 2, sigmoid scores (0.98, 0.02): every token uses both experts, so the load is balanced by
    construction and Eq. 18 gives f = (1/2, 1/2), loss 2 x (0.98 + 0.02) / 2 = 1.0. First-choice counting
    (GShard): f = (1, 0), 2 x 0.98 = 1.96."""
    layer = plain_layer(2, 2, counting=counting)
    x = route_logits(layer, [math.log(0.98 / 0.02), math.log(0.02 / 0.98)], tokens=3)
    _, st = layer(x)
    assert losses(st) == pytest.approx([want] * 3, rel=1e-5)


def test_sigmoid_k1_gate_is_the_raw_score_and_the_lm_loss_reaches_the_router():
    # The gate: the raw score x scaling (also on the biased path, which weighs experts chosen by scores + b).
    moe = MoEConfig(num_experts=4, top_k=1, num_heads=1, gate="sigmoid", gate_scaling=2.0)
    s = torch.tensor([[0.9, 0.8, 0.3, 0.2]])
    assert choose(torch.logit(s), moe).gates.item() == pytest.approx(1.8)
    r = choose(torch.logit(s), moe, bias=torch.tensor([0.0, 0.0, 0.0, 0.75]))  # 0.2 + 0.75 wins
    assert r.experts.tolist() == [[3]] and r.gates.item() == pytest.approx(0.4)
    # A loss on the layer's output alone (no balance or z loss) has a real gradient on the router weight.
    cfg = ModelConfig(hidden_size=32, num_attention_heads=4, moe=MoEConfig(
        num_experts=4, top_k=1, num_heads=4, expert_hidden_size=16, gate="sigmoid", gate_scaling=2.5))
    torch.manual_seed(0)
    layer = MHMoELayer(cfg, SP)
    y, _ = layer(torch.randn(8, 2, 32))
    g, = torch.autograd.grad(y.square().sum(), layer.router.proj.weight)
    # measured 2e-4 (|W| 0.12); normalising the one score (the old rule) gives 4e-11
    w = layer.router.proj.weight.detach()
    assert float(g.norm()) > 1e-5 * float(w.norm()), float(g.norm())


def deepseek_scores() -> torch.Tensor:
    """(1, 256): groups 0-3 hold eight experts at 0.3 each, groups 4-7 two at 0.9 each; the rest 0.01.
    Best-2 sums: 0.6 (groups 0-3) < 1.8 (groups 4-7); best-8 sums: 2.4 > 1.86."""
    s = torch.full((1, 256), 0.01)
    for g in range(4):
        s[0, g * 32:g * 32 + 8] = 0.3
    for g in range(4, 8):
        s[0, g * 32 + 5] = s[0, g * 32 + 20] = 0.9
    return s


def test_deepseek_v3_shape_picks_groups_by_their_best_k_over_m_scores():
    """E=256, G=8, M=4, k=8 (DeepSeek-V3): a group scores the sum of its best 8/4 = 2, so groups 4-7 win
    and the eight 0.9 experts are chosen; summing the best min(k, E/G) = 8 would pick groups 0-3."""
    moe = MoEConfig(num_experts=256, top_k=8, num_heads=1, gate="sigmoid", route_groups=8, route_group_limit=4)
    s = deepseek_scores()
    want = sorted(g * 32 + j for g in range(4, 8) for j in (5, 20))
    got = choose(torch.logit(s), moe, bias=torch.zeros(256))
    assert sorted(got.experts[0].tolist()) == want
    assert sorted(group_limited_reference(s, 8, 4, 1, 8)[0].tolist()) == want


def test_softmax_with_a_group_limit_renormalises_over_the_k():
    moe = MoEConfig(num_experts=8, top_k=2, num_heads=1, gate="softmax", route_groups=4, route_group_limit=2,
                    gate_scaling=1.5)
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    r = choose(logits, moe)
    p = torch.softmax(logits, -1).gather(1, r.experts)
    torch.testing.assert_close(r.gates, p / p.sum(-1, keepdim=True) * 1.5)
