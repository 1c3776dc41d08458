"""Shared experts (moe/shared_experts.py): always-on experts on every sub-token, gate weight 1.

- the layer's fast path equals its loop reference (output and every gradient) with shared experts;
- the shared part of the output is, by hand, the FFN of each sub-token (summed over the shared experts),
  added to the routed output before the merge projection;
- the parameters are non-expert (replicated on EP ranks, TP-partial grads like the router's) and their
  count is the sizing module's;
- the config refuses negative values.
"""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.moe import sizing
from megatron_mhmoe.moe.layer import MHMoELayer
from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.parallel.params import is_expert
from tests.moe.test_layer import assert_layer_matches_reference

SP = ParallelContext.single_process()


def cfg_of(n_s=1, e_s=0, k=2, h=4, proj=True, cf=0.0, act="gelu", gate="xmoe", E=8) -> ModelConfig:
    return ModelConfig(hidden_size=32, num_attention_heads=4, moe=MoEConfig(
        num_experts=E, top_k=k, num_heads=h, head_projection=proj, expert_hidden_size=16, capacity_factor=cf,
        expert_activation=act, gate=gate, num_shared_experts=n_s, shared_expert_hidden_size=e_s)).validate()


@pytest.mark.parametrize("n_s,e_s,h,cf,act", list(itertools.product([1, 2], [0, 24], [1, 4], [0.0, 1.0],
                                                                      ["gelu", "swiglu"])))
def test_layer_with_shared_experts_equals_loop_reference(n_s, e_s, h, cf, act):
    torch.manual_seed(0)
    assert_layer_matches_reference(MHMoELayer(cfg_of(n_s=n_s, e_s=e_s, h=h, proj=h > 1, cf=cf, act=act), SP))


def _layer_pair(cfg: ModelConfig) -> tuple[MHMoELayer, MHMoELayer]:
    """The layer with shared experts and the same layer without them (same routed weights)."""
    torch.manual_seed(0)
    with_shared = MHMoELayer(cfg, SP)
    without = MHMoELayer(dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, num_shared_experts=0)), SP)
    missing, unexpected = without.load_state_dict(with_shared.state_dict(), strict=False)
    assert not missing and all(k.startswith("shared_experts.") for k in unexpected)
    return with_shared, without


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_shared_output_is_the_ffn_of_every_sub_token_by_hand(act):
    """No projections (h=4): y = routed(x) + sum_j FFN_j(each d/h block of x), with FFN_j expert j's slice of
    the fused weights; capacity 1.0 drops sub-tokens from the routed experts, never from the shared ones."""
    n_s, e_s, h, d = 2, 5, 4, 32
    layer, routed_only = _layer_pair(cfg_of(n_s=n_s, e_s=e_s, h=h, proj=False, cf=1.0, act=act))
    x = torch.randn(6, 2, d)
    y, st = layer(x)
    y_routed, st_routed = routed_only(x)
    assert st.dropped > 0 and st.dropped == st_routed.dropped  # routing and drops are the routed layer's
    torch.testing.assert_close(st.kept, st_routed.kept, rtol=0, atol=0)
    se = layer.shared_experts
    assert se.w1.shape == (d // h, n_s * e_s) and se.w2.shape == (n_s * e_s, d // h)
    expected = torch.zeros_like(x)
    for t in itertools.product(range(6), range(2)):
        for j in range(h):
            sub = x[t][j * 8:(j + 1) * 8]
            for s in range(n_s):
                w1, w2 = se.w1[:, s * e_s:(s + 1) * e_s], se.w2[s * e_s:(s + 1) * e_s]
                if act == "swiglu":
                    hid = F.silu(sub @ w1) * (sub @ se.w3[:, s * e_s:(s + 1) * e_s])
                else:
                    hid = F.gelu(sub @ w1)
                expected[t][j * 8:(j + 1) * 8] += hid @ w2
    torch.testing.assert_close(y - y_routed, expected, atol=1e-6, rtol=1e-5)


def test_shared_output_joins_before_the_merge_projection():
    """With projections: y = merge(routed_sub + shared(head(x) sub-tokens)), the merge applied once to the sum."""
    layer, routed_only = _layer_pair(cfg_of(n_s=1, h=4, proj=True))
    x = torch.randn(5, 3, 32)
    y, _ = layer(x)
    y_routed, _ = routed_only(x)
    x_sub = layer.head(x.reshape(-1, 32)).reshape(-1, 8)
    shared = (F.gelu(x_sub @ layer.shared_experts.w1) @ layer.shared_experts.w2).reshape(-1, 32)
    # merge is affine: merge(a + b) = merge(a) + W_merge b
    torch.testing.assert_close(y - y_routed, (shared @ layer.merge.weight.T).reshape(x.shape), atol=1e-6, rtol=1e-5)


def test_shared_experts_are_non_expert_tp_partial_parameters_counted_by_sizing():
    cfg = cfg_of(n_s=2, e_s=12, act="swiglu")
    layer = MHMoELayer(cfg, SP)
    params = dict(layer.named_parameters())
    shared = {n: p for n, p in params.items() if n.startswith("shared_experts.")}
    assert sorted(shared) == ["shared_experts.w1", "shared_experts.w2", "shared_experts.w3"]
    assert all(not is_expert(p) and getattr(p, "tp_partial_grad", False) for p in shared.values())
    full = dataclasses.replace(cfg, num_layers=2, moe=dataclasses.replace(cfg.moe, moe_every=2))
    lp = sizing.moe_layer_params(full)
    assert lp["shared"] == sum(p.numel() for p in shared.values()) == 2 * 3 * 8 * 12
    assert lp["total"] == sum(p.numel() for p in params.values())


def test_gradients_reach_the_shared_experts_and_dropped_sub_tokens_still_get_them():
    layer = MHMoELayer(cfg_of(n_s=1, h=4, proj=False, cf=0.25), SP)
    x = torch.randn(8, 2, 32)
    y, st = layer(x)
    assert st.dropped > 0
    y.sum().backward()
    assert layer.shared_experts.w1.grad.abs().sum() > 0 and layer.shared_experts.w2.grad.abs().sum() > 0


@pytest.mark.parametrize("field,value", [("num_shared_experts", -1), ("shared_expert_hidden_size", -2)])
def test_config_refuses_negative_shared_settings(field, value):
    moe = dataclasses.replace(cfg_of().moe, **{field: value})
    with pytest.raises(ValueError, match=field):
        ModelConfig(hidden_size=32, num_attention_heads=4, moe=moe).validate()


def test_no_shared_experts_by_default():
    layer = MHMoELayer(cfg_of(n_s=0), SP)
    assert layer.shared_experts is None
    assert not any(n.startswith("shared_experts.") for n, _ in layer.named_parameters())


def test_model_counts_its_shared_experts_as_sizing_does():
    from megatron_mhmoe.model.gpt import GPTModel
    cfg = dataclasses.replace(cfg_of(n_s=2, e_s=12), vocab_size=64, num_layers=2, max_seq_len=8)
    counts, p = GPTModel(cfg, SP).num_params(), sizing.count_params(cfg)
    assert counts["total"] == p["total"] and counts["expert"] == p["expert"]
    assert counts["active_per_token"] == p["active_per_token"]
    no_shared = sizing.count_params(dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, num_shared_experts=0)))
    # h=4 sub-tokens each read the 2 x (8 x 12 + 12 x 8) shared weights of the one MoE layer
    assert p["active_per_token"] - no_shared["active_per_token"] == 4 * 2 * 2 * 8 * 12
