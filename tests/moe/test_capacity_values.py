"""Capacity against hand-written cases: the capacity number and the keep mask are written out here, not
taken from the code under test (the queue-walk comparison in test_layer.py checks two implementations
against each other; these pin the rule itself: first choices before second choices, then token order)."""
from __future__ import annotations

import torch

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.moe import capacity as cap
from megatron_mhmoe.moe.layer import MHMoELayer
from megatron_mhmoe.parallel.context import ParallelContext

# S=4 sub-tokens, k=2, E=3, capacity factor 1: capacity = ceil(1 * 2 * 4 / 3) = ceil(2.67) = 3.
# Queue: first choices 0,0,0,1 -> expert 0 holds tokens 0,1,2 (3, full), expert 1 holds token 3.
# Second choices 1,1,1,0 -> expert 1 takes tokens 0 and 1 (now 3, full) and drops token 2's;
# token 3's second choice (expert 0) finds it full and is dropped.
EXPERTS = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
KEEP = torch.tensor([[True, True], [True, True], [True, False], [True, False]])  # (S, k)


def test_capacity_numbers_by_hand():
    assert cap.expert_capacity(1.0, 2, 4, 3) == 3
    assert cap.expert_capacity(1.0, 1, 8, 4) == 2
    assert cap.expert_capacity(1.25, 2, 10, 4) == 7  # ceil(6.25)
    assert cap.expert_capacity(2.0, 1, 6, 4) == 3
    assert cap.expert_capacity(0.0, 2, 4, 3) == 0  # dropless


def test_keep_mask_by_hand():
    counts = cap.local_choice_counts(EXPERTS, 3)
    assert counts.tolist() == [[3, 1, 0], [1, 3, 0]]
    got = cap.capacity_keep(EXPERTS, counts[None], 0, 3).view(2, 4).t()
    assert got.tolist() == KEEP.tolist()
    assert cap.capacity_keep_reference(EXPERTS, 3, 3).tolist() == KEEP.tolist()


def test_keep_mask_by_hand_split_over_two_tp_ranks():
    """Rank 0 holds tokens 0-1, rank 1 tokens 2-3: each gets its rows of the same hand-written mask."""
    shards = EXPERTS.chunk(2)
    counts_all = torch.stack([cap.local_choice_counts(s, 3) for s in shards])
    for r in range(2):
        got = cap.capacity_keep(shards[r], counts_all, r, 3).view(2, 2).t()
        assert got.tolist() == KEEP[2 * r:2 * r + 2].tolist(), f"rank {r}"


def test_keep_mask_by_hand_tp_rank_order_within_a_choice():
    """E=2, k=1, 4 sub-tokens all on expert 1, capacity 2 (given): on 2 TP ranks the lower rank's tokens
    come first, so rank 0 keeps both of its tokens and rank 1 drops both."""
    experts = torch.tensor([[1], [1], [1], [1]])
    shards = experts.chunk(2)
    counts_all = torch.stack([cap.local_choice_counts(s, 2) for s in shards])
    assert cap.capacity_keep(shards[0], counts_all, 0, 2).tolist() == [True, True]
    assert cap.capacity_keep(shards[1], counts_all, 1, 2).tolist() == [False, False]


def test_layer_drops_exactly_the_hand_computed_tokens():
    """8 tokens, E=4, k=1, h=1, every token routed to expert 2: capacity ceil(8/4) = 2, so tokens 0 and 1
    are processed and tokens 2..7 output exactly zero."""
    cfg = ModelConfig(hidden_size=32, num_attention_heads=4, moe=MoEConfig(
        num_experts=4, top_k=1, num_heads=1, head_projection=False, expert_hidden_size=16,
        capacity_factor=1.0, gate="softmax"))
    layer = MHMoELayer(cfg, ParallelContext.single_process())
    with torch.no_grad():
        layer.router.proj.weight.zero_()
        layer.router.proj.weight[2, 0] = 50.0
    x = torch.rand(8, 1, 32) + 0.5
    y, st = layer(x)
    assert st.kept.tolist() == [0, 0, 2, 0]
    assert st.dropped == 6
    assert (y[:2].abs().sum(-1) > 0).all()
    assert (y[2:] == 0).all()


def test_layer_k2_keep_mask_by_hand():
    """The layer with h=1, k=2, E=3, routing forced to EXPERTS: the tokens whose second choice the hand
    mask drops (tokens 2 and 3) lose exactly that expert's contribution (their output is gate 1's expert
    output times its renormalised gate)."""
    cfg = ModelConfig(hidden_size=8, num_attention_heads=2, moe=MoEConfig(
        num_experts=3, top_k=2, num_heads=1, head_projection=False, expert_hidden_size=8,
        capacity_factor=1.0, gate="softmax"))
    torch.manual_seed(0)
    layer = MHMoELayer(cfg, ParallelContext.single_process())
    x = torch.zeros(4, 1, 8)
    for i, (a, b) in enumerate(EXPERTS.tolist()):
        x[i, 0, a] = 3.0  # logit 3 for the first choice,
        x[i, 0, b] = 1.0  # 1 for the second, 0 for the third
        x[i, 0, 3 + i] = 1.0  # a distinct input per token outside the router's view
    with torch.no_grad():
        layer.router.proj.weight.zero_()
        layer.router.proj.weight[:, :3] = torch.eye(3)
    y, st = layer(x)
    assert st.kept.tolist() == [3, 3, 0]  # expert 0: 3 first choices; expert 1: 1 first + 2 second
    assert st.dropped == 2
    ex = layer.experts
    probs = torch.softmax(torch.tensor([3.0, 1.0]), 0)  # renormalised gates over the two chosen experts
    for i, (a, b) in enumerate(EXPERTS.tolist()):
        xi = x[i, 0]
        out = [ex.forward_reference(xi[None], torch.tensor([[e]]), torch.ones(1, 1))[0] for e in (a, b)]
        want = sum(probs[j] * out[j] for j in range(2) if KEEP[i, j])
        torch.testing.assert_close(y[i, 0], want, atol=1e-6, rtol=1e-5)
