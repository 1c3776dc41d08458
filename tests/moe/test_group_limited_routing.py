"""Token-level group-limited routing (MoEConfig.route_groups / route_group_limit) and the fan-out metric.

A token picks its M best of G expert groups from its h sub-tokens' combined scores; every sub-token then
takes its top-k inside those groups. Checked: a hand-built token, the vectorised masking against a loop
reference, the layer's fan-out (at most M groups per token, and more without the limit on the same
inputs), the fan-out histogram's mean and max, and the configuration errors."""
from __future__ import annotations

import itertools

import pytest
import torch

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.moe.layer import MHMoELayer
from megatron_mhmoe.moe.metrics import fanout_metrics, histogram_mean_max
from megatron_mhmoe.moe.router import choose, group_limited_reference, group_limited_scores
from megatron_mhmoe.parallel.context import ParallelContext

SP = ParallelContext.single_process()


def test_a_token_goes_to_the_group_its_sub_tokens_prefer_together():
    # E=4 in G=2 groups {0,1} {2,3}; one token of h=2 sub-tokens, k=1, M=1. Sub-token 0 prefers expert 3
    # alone (group 1: 0.5, group 0: 0.3); sub-token 1 prefers expert 0 strongly (group 0: 0.9, group 1: 0.1).
    # Together group 0 scores 1.2 > 0.6: sub-token 0 must take its best expert of group 0, expert 1.
    probs = torch.tensor([[0.1, 0.3, 0.1, 0.5], [0.9, 0.0, 0.05, 0.05]])
    moe = MoEConfig(num_experts=4, top_k=1, num_heads=2, gate="softmax", route_groups=2, route_group_limit=1)
    r = choose(torch.log(probs.clamp(min=1e-9)), moe)
    assert r.experts.tolist() == [[1], [0]]
    torch.testing.assert_close(r.gates, probs.gather(1, r.experts), rtol=1e-5, atol=1e-7)  # k=1: the probability
    # Per sub-token the groups would differ: the same scores without the limit reach both groups.
    free = choose(torch.log(probs.clamp(min=1e-9)), MoEConfig(num_experts=4, top_k=1, num_heads=2, gate="softmax"))
    assert free.experts.tolist() == [[3], [0]]


@pytest.mark.parametrize("E,G,M,h,k", [(8, 4, 1, 4, 2), (8, 4, 2, 2, 2), (16, 4, 3, 4, 3), (8, 2, 1, 1, 1),
                                       (6, 3, 2, 3, 4), (8, 8, 2, 4, 1)])
def test_masking_matches_the_loop_reference(E, G, M, h, k):
    g = torch.Generator().manual_seed(E * 100 + G * 10 + M)
    select = torch.rand(5 * h, E, generator=g)
    fast = group_limited_scores(select, G, M, h, k).topk(k, dim=-1).indices
    ref = group_limited_reference(select, G, M, h, k)
    assert torch.equal(fast.sort(dim=1).values, ref.sort(dim=1).values)
    groups = (fast // (E // G)).view(5, h * k)
    assert max(len(set(row.tolist())) for row in groups) <= M


def layer_of(M: int, gate="xmoe", E=16, G=4, h=4, k=2, bias=0.0) -> MHMoELayer:
    cfg = ModelConfig(hidden_size=32, num_attention_heads=4, moe=MoEConfig(
        num_experts=E, top_k=k, num_heads=h, expert_hidden_size=16, gate=gate, route_groups=G, route_group_limit=M,
        bias_update_rate=bias))
    torch.manual_seed(0)
    return MHMoELayer(cfg, SP)


@pytest.mark.parametrize("gate", ["xmoe", "sigmoid"])
def test_layer_fanout_is_bounded_by_the_limit(gate):
    x = torch.randn(8, 2, 32)
    for M in (1, 2):
        limited, free = layer_of(M, gate), layer_of(0, gate)
        free.load_state_dict(limited.state_dict())
        st_l, st_f = limited(x)[1], free(x)[1]
        mean_l, max_l = histogram_mean_max(st_l.fanout_groups)
        mean_f, max_f = histogram_mean_max(st_f.fanout_groups)
        assert max_l == M and max_f > M, (M, st_l.fanout_groups.tolist(), st_f.fanout_groups.tolist())
        assert mean_l < mean_f
        assert int(st_l.fanout_groups.sum()) == 16  # one entry per token
        # at EP=1 every token reaches one rank
        assert histogram_mean_max(st_l.fanout_ranks) == (1.0, 1)


def test_layer_with_groups_matches_its_loop_reference():
    from tests.moe.test_layer import assert_layer_matches_reference
    assert_layer_matches_reference(layer_of(2, bias=0.01))


def test_fanout_histogram_mean_and_max_by_hand():
    hist = torch.tensor([0, 3, 0, 1, 0])  # 3 tokens reach 1 group, 1 token reaches 3
    assert histogram_mean_max(hist) == (1.5, 3)
    assert histogram_mean_max(torch.zeros(5)) == (0.0, 0)
    m = fanout_metrics(torch.stack([hist, torch.tensor([0, 0, 2, 0, 0])]), torch.tensor([[0, 4, 0, 0, 0]] * 2))
    assert m == {"fanout_groups_mean": (3 + 3 + 4) / 6, "fanout_groups_max": 3, "fanout_ranks_mean": 1.0,
                 "fanout_ranks_max": 1}


@pytest.mark.parametrize("kw,msg", [
    (dict(route_groups=3), "route_groups=3 must be >= 1 and divide num_experts=8"),
    (dict(route_groups=4, route_group_limit=5), "route_group_limit=5 must be in \\[0, route_groups=4\\]"),
    (dict(route_groups=8, route_group_limit=1, top_k=2), "fewer than top_k=2"),
    (dict(route_groups=2, route_group_limit=1, debug_routing="skew"), "both choose the experts"),
    (dict(bias_update_rate=-1.0), "bias_update_rate=-1.0 must be a finite number >= 0"),
])
def test_bad_settings_name_the_problem(kw, msg):
    cfg = ModelConfig(hidden_size=32, num_attention_heads=4, moe=MoEConfig(num_experts=8, **kw))
    with pytest.raises(ValueError, match=msg):
        cfg.validate()


def test_fanout_over_ranks_and_groups_in_the_summary():
    from megatron_mhmoe.moe.metrics import summarize
    layer = layer_of(1)
    st = layer(torch.randn(4, 2, 32))[1]
    out = summarize([st, st], threshold=0.5)
    assert out["moe/fanout_groups_max"] == 1 and out["moe/fanout_groups_mean"] == 1.0
    assert set(itertools.chain(["moe/fanout_ranks_mean", "moe/fanout_ranks_max"])) <= set(out)
