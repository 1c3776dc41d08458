"""The fused softmax/top-k/logsumexp node (moe/softmax_top_k.py) against the same ops under autograd
(router.top_k_reference): the same choices, and values and logit gradients equal within 1e-6 (fp32).

Every gradient shape the backward distinguishes: dL/dprobs dense, a broadcast row (the balance losses' sums)
or absent; with and without the top-k's and the logsumexp's gradients; the CPU small-E softmax (E < 64) and
torch's (E >= 64)."""
from __future__ import annotations

import pytest
import torch

from megatron_mhmoe.moe import softmax_top_k as stk
from megatron_mhmoe.moe.router import top_k, top_k_reference

ATOL = 1e-6


def _loss(choice, w_probs, w_gates, w_lse):
    """A loss that reaches probs through `w_probs` ('dense', 'row', None), the gates and lse when asked."""
    S, E = choice.probs.shape
    g = torch.Generator().manual_seed(1)
    loss = choice.gates.new_zeros(())
    if w_probs == "dense":
        loss = loss + (choice.probs * torch.randn(S, E, generator=g)).sum()
    elif w_probs == "row":  # what the balance losses do: a sum over the sub-tokens, then a weight per expert
        loss = loss + choice.probs.sum(0) @ torch.randn(E, generator=g)
    if w_gates:
        loss = loss + (choice.gates * torch.randn(choice.gates.shape, generator=g)).sum()
    if w_lse:
        loss = loss + choice.lse.square().mean()
    return loss


@pytest.mark.parametrize("S,E,k", [(64, 8, 2), (64, 8, 1), (48, 256, 2), (1, 8, 2), (40, 63, 3), (40, 64, 2)])
@pytest.mark.parametrize("w_probs", ["dense", "row", None])
@pytest.mark.parametrize("w_gates,w_lse", [(True, True), (True, False), (False, True)])
def test_fused_equals_autograd_over_the_ops(S, E, k, w_probs, w_gates, w_lse):
    logits = torch.randn(S, E, generator=torch.Generator().manual_seed(S * E + k)) * 3
    out = {}
    for name, fn in (("fused", top_k), ("reference", top_k_reference)):
        x = logits.clone().requires_grad_()
        choice = fn(x, k)
        _loss(choice, w_probs, w_gates, w_lse).backward()
        out[name] = (choice, x.grad)
    (a, ga), (b, gb) = out["fused"], out["reference"]
    assert torch.equal(a.experts, b.experts)
    for field in ("probs", "gates", "lse"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), atol=ATOL, rtol=0)
    torch.testing.assert_close(ga, gb, atol=ATOL, rtol=0)


def test_small_expert_count_softmax_is_the_softmax():
    x = torch.randn(300, stk.SMALL_E_CPU - 1) * 10
    torch.testing.assert_close(stk._softmax(x), torch.softmax(x, -1), atol=1e-7, rtol=1e-6)
    assert stk._softmax(torch.full((2, 4), -1e30)).isfinite().all()  # the max is subtracted first


def test_broadcast_row_is_detected_only_for_a_repeated_row():
    g = torch.randn(5)
    assert stk._is_broadcast_row(g.expand(4, 5))
    assert not stk._is_broadcast_row(torch.randn(4, 5))
    assert not stk._is_broadcast_row(g.expand(1, 5))  # one sub-token: the dense form is as cheap
