"""Megatron-core (the `megatron-core` pip package; `make env` installs it with --no-deps from
requirements-nodeps.txt) as an oracle for the routing and balancing maths. The same logits go to its `moe_utils` functions and to ours; skipped when the
package is absent.

At h = 1 (a sub-token is the token) for every option it has: gates softmax (its default at k > 1, its
`moe_router_pre_softmax` at k = 1, which are ours) and sigmoid, `moe_router_topk_scaling_factor`, the
expert bias (sigmoid), group limits (`moe_router_num_groups` / `moe_router_group_topk`; for softmax its
pre-softmax form, which groups on probabilities as ours do), the micro-batch, sequence-wise and global-batch
balance losses, the z-loss, and the bias update. At h > 1 without a group limit each sub-token is routed as
Megatron-core routes a token; with a group limit each sub-token's choice is Megatron-core's group-limited
top-k restricted to its TOKEN's groups (the token-level rule of moe/router.py: group_limited_scores).
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.moe.bias_balancing import bias_update
from megatron_mhmoe.moe.layer import MHMoELayer
from megatron_mhmoe.moe.router import choose, group_score_size
from megatron_mhmoe.parallel.context import ParallelContext

with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": not needed on CPU
    warnings.simplefilter("ignore")
    mu = pytest.importorskip("megatron.core.transformer.moe.moe_utils")

SP = ParallelContext.single_process()
E = 16


def dense(experts: torch.Tensor, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, k) ids and gates -> Megatron-core's (S, E) routing map and routing probabilities."""
    m = torch.zeros(experts.shape[0], E, dtype=torch.bool).scatter(1, experts, True)
    return m, torch.zeros(experts.shape[0], E).scatter(1, experts, gates)


# (gate, k, scaling, bias, groups G, limit M)
CASES = [("softmax", 1, 1.0, False, 1, 0), ("softmax", 2, 1.0, False, 1, 0), ("softmax", 3, 2.0, False, 1, 0),
         ("softmax", 4, 1.0, False, 4, 2), ("softmax", 1, 1.0, False, 4, 1),
         ("sigmoid", 1, 2.5, False, 1, 0), ("sigmoid", 2, 1.0, False, 1, 0), ("sigmoid", 1, 1.0, True, 1, 0),
         ("sigmoid", 4, 2.5, True, 1, 0), ("sigmoid", 4, 1.0, False, 4, 2), ("sigmoid", 8, 2.5, True, 8, 4),
         ("sigmoid", 2, 1.0, True, 4, 1)]


@pytest.mark.parametrize("gate,k,scaling,bias,G,M", CASES)
def test_choice_and_gates_equal_megatron_core(gate, k, scaling, bias, G, M):
    g = torch.Generator().manual_seed(k * 100 + G * 10 + M)
    logits = torch.randn(64, E, generator=g) * 2
    b = 0.3 * torch.randn(E, generator=g) if bias else None
    moe = MoEConfig(num_experts=E, top_k=k, num_heads=1, gate=gate, gate_scaling=scaling, route_groups=G,
                    route_group_limit=M)
    ours = choose(logits, moe, bias=b)
    pre = gate == "softmax" and (k == 1 or M > 0)  # its pre-softmax form groups on probabilities, as ours
    probs, rmap = mu.topk_routing_with_score_function(
        logits, k, use_pre_softmax=pre, num_groups=G if M else None, group_topk=M or None,
        scaling_factor=scaling if scaling != 1.0 else None, score_function=gate, expert_bias=b)
    our_map, our_probs = dense(ours.experts, ours.gates)
    assert torch.equal(our_map, rmap)
    if pre and k > 1:  # its pre-softmax form keeps the chosen probabilities; ours renormalise (its default)
        probs = probs / probs.sum(-1, keepdim=True) * scaling
    torch.testing.assert_close(our_probs, probs, rtol=1e-5, atol=1e-6)


def layer_of(gate: str, k: int, h: int = 1, **moe) -> MHMoELayer:
    cfg = ModelConfig(hidden_size=32, num_attention_heads=4, moe=MoEConfig(
        num_experts=E, top_k=k, num_heads=h, head_projection=h > 1, expert_hidden_size=8, gate=gate,
        seq_aux_loss_coef=1.0, global_aux_loss_coef=1.0, **moe))
    torch.manual_seed(1)
    layer = MHMoELayer(cfg, SP)
    with torch.no_grad():
        for p in layer.router.parameters():
            p.add_(torch.randn_like(p) * 3)  # uneven routing: the losses are far from 1
    return layer


def sub_token_logits(layer: MHMoELayer, x: torch.Tensor) -> torch.Tensor:
    t = x.reshape(-1, x.shape[-1])
    t = layer.head(t) if layer.head is not None else t
    return layer.router(t.reshape(-1, layer.d_sub))  # (s*b*h, E), s-major tokens, token-major sub-tokens


def megatron_losses(logits: torch.Tensor, k: int, score: str, s: int, b: int) -> tuple:
    """Micro-batch, sequence-wise (its _apply_seq_aux_loss: (s, b*E) views) and z losses, coefficient 1."""
    rmap, scores = mu.compute_routing_scores_for_aux_loss(logits, k, score)
    T = logits.shape[0]
    aux = mu.switch_load_balancing_loss_func(scores, rmap.sum(0), T, k, E, 1.0)
    rs, ss = rmap.reshape(s, -1), scores.reshape(s, -1)
    seq = mu.switch_load_balancing_loss_func(ss, rs.sum(0), s, k, E, 1.0) / b
    return aux, seq, mu.z_loss_func(logits, 1.0), rmap.sum(0)


@pytest.mark.parametrize("gate,k,h,bias,M", [("softmax", 2, 1, 0.0, 0), ("sigmoid", 1, 1, 0.01, 0),
                                             ("sigmoid", 4, 1, 0.01, 2), ("xmoe", 2, 1, 0.0, 0),
                                             ("sigmoid", 2, 4, 0.01, 0), ("softmax", 1, 4, 0.0, 0)])
def test_losses_equal_megatron_core(gate, k, h, bias, M):
    """The layer's micro-batch, sequence-wise, global-batch (two micro-batches: its running counts over
    ga_steps) and z losses equal Megatron-core's on the same (sub-token) logits. X-MoE's cosine logits
    feed its softmax; at h > 1 its tokens are our sub-tokens (the sequence of a sub-token is its token's)."""
    layer = layer_of(gate, k, h, bias_update_rate=bias, route_groups=4 if M else 1, route_group_limit=M)
    if layer.expert_bias is not None:
        layer.expert_bias.value.copy_(0.2 * torch.randn(E, generator=torch.Generator().manual_seed(3)))
    score = "sigmoid" if gate == "sigmoid" else "softmax"
    s, b = 6, 3
    xs = [torch.randn(s, b, 32, generator=torch.Generator().manual_seed(i)) for i in (5, 6)]
    counts = []
    for i, x in enumerate(xs):
        _, st = layer(x)
        with torch.no_grad():
            logits = sub_token_logits(layer, x)
        # Megatron-core's sequence view needs (s, b*h*E): our sub-tokens of a token are adjacent rows.
        aux, seq, z, c = megatron_losses(logits, k, score, s, b * h)
        counts.append(c)
        torch.testing.assert_close(st.aux_loss.detach(), aux, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(st.z_loss.detach(), z, rtol=1e-5, atol=1e-6)
        if h == 1:  # ours averages over the b sequences of s*h sub-tokens; its over b*h "sequences" of s
            torch.testing.assert_close(st.seq_aux_loss.detach(), seq, rtol=1e-5, atol=1e-7)
        # Global: its running counts / ga_steps over this micro-batch's tokens; P from this micro-batch.
        rmap, scores = mu.compute_routing_scores_for_aux_loss(logits, k, score)
        glob = mu.switch_load_balancing_loss_func(scores, sum(counts) / len(counts), logits.shape[0], k, E, 1.0)
        torch.testing.assert_close(st.global_aux_loss.detach(), glob, rtol=1e-5, atol=1e-7)
        layer.balance.add_global_counts(st)
    c = counts[-1].double()
    assert c.max() > 1.5 * c.mean(), c  # uneven counts: the counting rule matters to the comparison


def test_bias_update_equals_megatron_core(monkeypatch):
    """Its get_updated_expert_bias all-reduces the counts first; on one process that is the identity."""
    monkeypatch.setattr(mu.torch.distributed, "all_reduce", lambda t, group=None: None)
    monkeypatch.setattr(mu.parallel_state, "get_tensor_and_data_parallel_group", lambda **kw: None)
    counts = torch.tensor([5.0, 3.0, 1.0, 3.0, 9.0, 0.0, 3.0, 0.0])
    b = torch.linspace(-0.1, 0.1, 8)
    torch.testing.assert_close(bias_update(b, counts, 1e-3), mu.get_updated_expert_bias(counts.clone(), b, 1e-3),
                               rtol=0, atol=0)


@pytest.mark.parametrize("gate,k,M", [("sigmoid", 2, 0), ("softmax", 1, 0), ("sigmoid", 2, 2), ("sigmoid", 4, 2)])
def test_sub_tokens_follow_their_token_routing(gate, k, M):
    """h = 4. Without a group limit a sub-token is routed as Megatron-core routes a token. With one, the
    token's groups are the M best by sum over its h sub-tokens of each one's best max(1, k // M) scores in
    the group, and each sub-token's choice is Megatron-core's group-limited top-k of its own scores with
    every other group removed."""
    h, G = 4, 4
    layer = layer_of(gate, k, h, route_groups=G, route_group_limit=M, bias_update_rate=0.01)
    bias = 0.1 * torch.randn(E, generator=torch.Generator().manual_seed(9))
    layer.expert_bias.value.copy_(bias)
    x = torch.randn(5, 2, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = sub_token_logits(layer, x)  # (n*h, E)
        ours = choose(logits, layer.moe, bias=bias)
    scores = torch.sigmoid(logits) if gate == "sigmoid" else torch.softmax(logits, -1)
    select = scores + bias
    if M:
        n, per = logits.shape[0] // h, E // G
        token_group = select.view(n, h, G, per).topk(group_score_size(k, M), -1).values.sum((-1, 1))  # (n, G)
        allowed = torch.zeros(n, G, dtype=torch.bool).scatter(1, token_group.topk(M, -1).indices, True)
        select = select.masked_fill(~allowed.repeat_interleave(h, 0).repeat_interleave(per, 1), -math.inf)
        _, want = mu.group_limited_topk(select, k, select.shape[0], E, G, M)
    else:
        want = select.topk(k, -1).indices
    assert torch.equal(ours.experts.sort(-1).values, want.sort(-1).values)
