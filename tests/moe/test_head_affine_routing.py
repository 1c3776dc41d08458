"""Head-affine routing (model.moe.head_groups, moe/head_affine.py), one process.

1. G = 0 and G = 1 are the shared pool: the layer's outputs and gradients are bit-identical (torch.equal).
2. Every choice of head j lies in group j mod G (softmax, X-MoE and sigmoid gates, with and without a
   routing bias), the choices equal a reference by loops, and gates, probabilities and logsumexp equal a
   reference computed by masking the logits outside the group (the router over the group alone).
3. Debug routing draws inside each head's group ('skew': each group's first expert).
4. The layer with G > 1: forward equals the slow loop reference (capacity on and off), the statistics
   (per-head counts) show head j only in its group, the losses are finite.
5. Validation: the arithmetic in the messages; 'nodes' resolves to the layout's node count; conflicts.
"""
from __future__ import annotations

import pytest
import torch

from megatron_mhmoe.config import ModelConfig, MoEConfig, model_config_from_dict
from megatron_mhmoe.moe import head_affine
from megatron_mhmoe.moe.layer import MHMoELayer
from megatron_mhmoe.moe.router import choose, top_k, top_k_sigmoid
from megatron_mhmoe.moe.two_level import NodeLayout
from megatron_mhmoe.parallel.context import ParallelContext


def layer_for(G, h=4, E=8, k=2, cf=0.0, gate="softmax", **kw):
    cfg = ModelConfig(hidden_size=32, num_attention_heads=4, moe=MoEConfig(
        num_experts=E, top_k=k, num_heads=h, expert_hidden_size=16, capacity_factor=cf, gate=gate,
        head_groups=G, **kw))
    torch.manual_seed(0)
    return MHMoELayer(cfg, ParallelContext.single_process())


def run(layer, x):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y, st = layer(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y) + st.aux_loss).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}, st


@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
def test_one_group_is_the_shared_pool_bit_for_bit(gate):
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(1))
    y0, gx0, g0, st0 = run(layer_for(0, gate=gate, cf=1.0), x)
    y1, gx1, g1, st1 = run(layer_for(1, gate=gate, cf=1.0), x)
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[n], g1[n]) for n in g0)
    assert torch.equal(st0.kept, st1.kept) and torch.equal(st0.aux_loss, st1.aux_loss)
    # ...and the router takes today's path itself at G = 0 and 1: the plain top-k functions, bit for bit.
    logits = torch.randn(16, 8, generator=torch.Generator().manual_seed(4))
    plain = top_k(logits, 2) if gate == "softmax" else top_k_sigmoid(logits, 2)
    for G in (0, 1):
        r = choose(logits, MoEConfig(num_experts=8, top_k=2, num_heads=4, gate=gate, head_groups=G))
        assert r.unbiased_experts is None and all(torch.equal(getattr(r, f), getattr(plain, f))
                                                  for f in ("probs", "experts", "gates", "lse"))
    # ...and G = 2 is not (the test can tell routings apart).
    y2, _, _, _ = run(layer_for(2, gate=gate, cf=1.0), x)
    assert not torch.equal(y0, y2)


def masked_reference(logits, h, G, k, gate, bias=None):
    """Logits masked outside the head's group by loops, scored as usual (softmax inside the group); choose
    by the (biased) scores inside the group, weigh by the unbiased ones, renormalised over the k."""
    S, E = logits.shape
    per = E // G
    outside = torch.zeros(S, E, dtype=torch.bool)
    for i in range(S):
        for e in range(E):
            outside[i, e] = e // per != (i % h) % G
    masked = logits.masked_fill(outside, float("-inf"))
    scores = torch.sigmoid(masked) if gate == "sigmoid" else torch.softmax(masked, -1)
    sel = (scores + (bias if bias is not None else 0)).masked_fill(outside, float("-inf"))
    ids = head_affine.affine_reference(sel, h, G, k)
    top = scores.gather(1, ids)
    probs = scores / scores.sum(1, keepdim=True)
    return ids, top / top.sum(1, keepdim=True), probs, torch.logsumexp(masked, -1)


@pytest.mark.parametrize("gate", ["softmax", "xmoe", "sigmoid"])
@pytest.mark.parametrize("G", [2, 4])
@pytest.mark.parametrize("biased", [False, True])
def test_choices_stay_in_the_head_group_and_gates_match_masked_scores(gate, G, biased):
    h, E, k = 4, 8, 2
    g = torch.Generator().manual_seed(G)
    logits = torch.randn(5 * h, E, generator=g) * 3
    bias = torch.randn(E, generator=g) * 0.2 if biased else None
    moe = MoEConfig(num_experts=E, top_k=k, num_heads=h, gate=gate, head_groups=G)
    r = choose(logits, moe, bias=bias)
    head = torch.arange(5 * h) % h
    assert ((r.experts // (E // G)) == (head % G)[:, None]).all()
    ids, gates, probs, lse = masked_reference(logits, h, G, k, gate, bias)
    assert torch.equal(r.experts, ids)
    torch.testing.assert_close(r.gates, gates, rtol=0, atol=1e-6)
    # P of the balance losses and the z-loss's logsumexp: inside the group (0 outside)
    torch.testing.assert_close(r.probs, probs, rtol=0, atol=1e-6)
    torch.testing.assert_close(r.lse, lse, rtol=0, atol=1e-5)
    # The balance losses count the unbiased top-k inside the group.
    assert ((r.unbiased_experts // (E // G)) == (head % G)[:, None]).all()


def test_hand_checkable_case():
    # h = 2, G = 2, E = 4, k = 1: head 0 picks among experts {0, 1}, head 1 among {2, 3}.
    p = torch.tensor([[0.1, 0.2, 0.6, 0.1],    # token 0, head 0: best overall is 2, in its group 1
                      [0.5, 0.1, 0.1, 0.3],    # token 0, head 1: best overall is 0, in its group 3
                      [0.3, 0.1, 0.2, 0.4],    # token 1, head 0: 0
                      [0.1, 0.1, 0.1, 0.7]])   # token 1, head 1: 3
    moe = MoEConfig(num_experts=4, top_k=1, num_heads=2, gate="softmax", head_groups=2)
    r = choose(torch.log(p), moe)
    assert r.experts.view(-1).tolist() == [1, 3, 0, 3]
    # k = 1: the probability inside the group, 0.2 / (0.1 + 0.2), 0.3 / (0.1 + 0.3), 0.3 / 0.4, 0.7 / 0.8
    torch.testing.assert_close(r.gates.view(-1), torch.tensor([2 / 3, 3 / 4, 3 / 4, 7 / 8]))


def test_debug_routing_inside_groups():
    moe = MoEConfig(num_experts=8, top_k=2, num_heads=4, gate="softmax", head_groups=2, debug_routing="skew",
                    debug_skew_fraction=1.0)
    r = choose(torch.zeros(8, 8), moe)
    # every sub-token skewed: its j-th choice is expert j of its group (groups {0..3}, {4..7})
    assert r.experts.tolist() == [[0, 1], [4, 5]] * 4
    moe.debug_routing, moe.debug_skew_fraction = "balanced", 0.0
    r = choose(torch.zeros(8, 8), moe)
    head = torch.arange(8) % 4
    assert ((r.experts // 4) == (head % 2)[:, None]).all()


@pytest.mark.parametrize("cf", [0.0, 1.0])
def test_layer_matches_loop_reference_and_stats_per_head(cf):
    G, h, E = 2, 4, 8
    layer = layer_for(G, h=h, E=E, cf=cf, aux_loss_coef=0.01)
    x = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y, st = layer(x)
        ref = layer.forward_reference(x)
    torch.testing.assert_close(y, ref, atol=2e-5, rtol=1e-4)
    hc = st.head_counts.view(h, E)  # (h, E): head j's assignments to expert e
    for j in range(h):
        outside = [e for e in range(E) if e // (E // G) != j % G]
        assert hc[j, outside].sum() == 0 and hc[j].sum() == 12 * 2
    assert torch.isfinite(st.aux_loss) and torch.isfinite(st.z_loss)


def test_validation_messages():
    def bad(match, **kw):
        with pytest.raises(ValueError, match=match):
            ModelConfig(hidden_size=32, num_attention_heads=4, moe=MoEConfig(**kw)).validate()
    bad(r"head_groups=3 head groups do not divide num_heads=4 \(4 % 3 = 1\)", num_heads=4, num_experts=12, head_groups=3)
    bad(r"do not divide num_experts=6 \(6 % 4 = 2\)", num_heads=4, num_experts=6, head_groups=4)
    bad(r"E/G = 8/4 = 2 experts, fewer than top_k=3", num_heads=4, num_experts=8, top_k=3, head_groups=4)
    bad(r"route_group_limit=1.*turn one off", num_heads=4, num_experts=8, head_groups=2, route_groups=2,
        route_group_limit=1)
    bad(r"quantile_balancing", num_heads=4, num_experts=8, head_groups=2, quantile_balancing=True,
        aux_loss_coef=0.0)
    bad(r"'node' must be an integer >= 0 or 'nodes'", head_groups="node")
    bad(r"head_groups=-1 must be >= 0", head_groups=-1)
    cfg = model_config_from_dict({"hidden_size": 32, "num_attention_heads": 4,
                                  "moe": {"num_experts": 8, "num_heads": 4, "head_groups": "nodes"}})
    assert cfg.validate().moe.head_groups == "nodes"
    with pytest.raises(ValueError, match="head_groups must be int or str, got float 1.5"):
        model_config_from_dict({"moe": {"head_groups": 1.5}})


def test_placement_and_nodes():
    two_by_two, four_by_one = NodeLayout(4, 2), NodeLayout(4, 1)
    assert head_affine.resolve("nodes", two_by_two) == 2 and head_affine.resolve("nodes", None) == 1
    assert head_affine.resolve(0, two_by_two) == 1 and head_affine.resolve(4, None) == 4
    head_affine.check_placement(2, two_by_two, 8)
    head_affine.check_placement(4, two_by_two, 8)  # two groups per node
    assert head_affine.node_of_group(4, 2) == [0, 0, 1, 1]
    with pytest.raises(ValueError, match=r"needs G a multiple of the nodes \(2 % 4 = 2\).*'nodes' \(4\)"):
        head_affine.check_placement(2, four_by_one, 8)
    # 'nodes' on one process (EP fits one node): G = 1, the shared pool.
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(3))
    assert torch.equal(run(layer_for("nodes"), x)[0], run(layer_for(0), x)[0])


def test_ep_cost_prices_the_head_affine_path():
    from megatron_mhmoe.moe import ep_cost
    plan = NodeLayout(32, 8)  # the E=256 plan: 4 nodes x 8
    fast, slow = ep_cost.Link(400.0, 3600.0, 30.0), ep_cost.Link(0.1, 3600.0, 30.0)
    args = dict(E=256, d_sub=512, itemsize=2, layout=plan, chunks=1)
    assert ep_cost.choose("two_level", 4096, 8, link=fast, head_groups=4, **args) == "head_affine"
    assert ep_cost.choose("flat", 4096, 8, link=slow, head_groups=4, **args) == "flat"
    assert ep_cost.choose("auto", 4096, 8, link=slow, head_groups=4, **args) == "head_affine"
    assert ep_cost.choose("auto", 8, 8, link=fast, head_groups=4, **args) == "flat"  # latency-bound
    assert ep_cost.choose("auto", 4096, 8, link=slow, **args) == "two_level"  # without head groups
    # NIC bytes: S (N-1)/N packets of 2 (d_sub + k + c) + 2 d_sub values, about 1/k of flat's 4 S k (N-1)/N d_sub
    ha = ep_cost.head_affine_cost(4096, 8, 256, 512, 2, plan, 1, fast)
    flat = ep_cost.flat_cost(4096, 8, 256, 512, 2, plan, fast)
    assert ha.nic_bytes == 4096 * 3 / 4 * (2 * (512 + 8 + 4) + 2 * 512) * 2 and ha.exchanges == 9
    assert flat.nic_bytes / 8 < ha.nic_bytes < flat.nic_bytes / 8 * 1.02


@pytest.mark.parametrize("gate", ["xmoe", "sigmoid"])
def test_hf_export_routes_the_same(gate):
    from megatron_mhmoe.hf.modeling_mhmoe import route
    moe = MoEConfig(num_experts=8, top_k=2, num_heads=4, gate=gate, head_groups=2)
    logits = torch.randn(12, 8, generator=torch.Generator().manual_seed(5))
    bias = torch.randn(8, generator=torch.Generator().manual_seed(6)) * 0.1
    ours = choose(logits, moe, bias=bias)
    experts, gates = route(logits, {"top_k": 2, "num_heads": 4, "gate": gate, "head_groups": 2}, bias)
    assert torch.equal(experts, ours.experts)
    torch.testing.assert_close(gates, ours.gates)
    with pytest.raises(ValueError, match="set it to the integer G"):
        route(logits, {"head_groups": "nodes"}, None)
