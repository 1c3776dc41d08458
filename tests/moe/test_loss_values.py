"""The router losses of the MH-MoE layer against their formulas, recomputed here from the router's own
probabilities (E > 1, k > 1, h > 1 sub-tokens, routing made uneven on purpose).

Balance loss over sub-tokens: aux = E * sum_e f_e * P_e, with P_e the mean router probability of e and, by
default (DeepSeek-V3 Eq. 18, Megatron-core), f_e = sub-tokens with e among their top-k / (k S), all k choices
counted; with balance_counting='first_choice' (GShard/Switch) f_e = the share whose FIRST choice is e.
z-loss (ST-MoE): mean over sub-tokens of logsumexp(logits)^2. Each check also asserts that the plausible
wrong formula (the other counting, or the logsumexp not squared) lands far outside the tolerance, so the
comparison can fail.
"""
from __future__ import annotations

import pytest
import torch

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.moe.layer import MHMoELayer
from megatron_mhmoe.moe.losses import load_balance_loss
from megatron_mhmoe.parallel.context import ParallelContext

SP = ParallelContext.single_process()
E, K, H, D = 6, 2, 4, 32


def uneven_layer(gate: str, counting: str = "topk") -> MHMoELayer:
    cfg = ModelConfig(hidden_size=D, num_attention_heads=4, moe=MoEConfig(
        num_experts=E, top_k=K, num_heads=H, head_projection=True, expert_hidden_size=16,
        capacity_factor=1.0, gate=gate, balance_counting=counting))
    torch.manual_seed(3)
    layer = MHMoELayer(cfg, SP)
    with torch.no_grad():
        w = layer.router.proj.weight
        if gate == "softmax":  # (E, d/h): large, skewed logits so that experts 0 and 1 take most first choices
            w.normal_(0.0, 1.0)
            w[0] += 0.8
            w[1] += 0.4
        else:  # X-MoE: low temperature sharpens the cosine scores
            layer.router.temperature.fill_(0.05)
            layer.router.expert_embeddings.normal_()
    return layer


def router_by_hand(layer: MHMoELayer, x: torch.Tensor):
    """The router's logits and probabilities for x (s, b, d), as the layer's docstring defines them."""
    tokens = x.reshape(-1, D)
    x_sub = layer.head(tokens).reshape(-1, D // H)  # token-major sub-tokens
    logits = layer.router(x_sub).double()
    return logits, torch.softmax(logits, -1)


@pytest.mark.parametrize("gate,counting", [("softmax", "topk"), ("xmoe", "topk"), ("softmax", "first_choice")])
def test_balance_and_z_loss_equal_their_formulas(gate, counting):
    layer = uneven_layer(gate, counting)
    x = torch.randn(24, 2, D, generator=torch.Generator().manual_seed(7)) + 0.3
    with torch.no_grad():
        _, st = layer(x)
        logits, probs = router_by_hand(layer, x)
    S = logits.shape[0]
    assert S == 24 * 2 * H and st.num_sub_tokens == S

    first = probs.argmax(-1)
    second = probs.scatter(1, first[:, None], -1.0).argmax(-1)
    f_first = torch.tensor([(first == e).sum().item() for e in range(E)], dtype=torch.float64) / S
    f_all_k = (f_first + torch.tensor([(second == e).sum().item() for e in range(E)], dtype=torch.float64) / S) / K
    P = probs.sum(0) / S
    aux_first = E * float((f_first * P).sum())
    aux_all_k = E * float((f_all_k * P).sum())
    aux_want, aux_other = (aux_all_k, aux_first) if counting == "topk" else (aux_first, aux_all_k)
    assert f_first.max() > 1.5 / E, "the routing must be uneven (else the loss is ~1 whatever the counts)"
    assert float(st.aux_loss) == pytest.approx(aux_want, rel=1e-5)
    assert abs(aux_other - aux_want) > 0.02 * aux_want

    lse = torch.log(torch.exp(logits).sum(-1))
    z_want = float((lse ** 2).mean())
    z_unsquared = float(lse.mean())
    assert float(st.z_loss) == pytest.approx(z_want, rel=1e-5)
    assert abs(z_unsquared - z_want) > 0.1 * abs(z_want)


def test_loss_gradients_equal_the_formulas_gradients():
    """d(aux + z)/d(router weight) from the layer equals autograd of the hand formulas (counts detached)."""
    layer = uneven_layer("softmax")
    x = torch.randn(16, 2, D, generator=torch.Generator().manual_seed(11))
    _, st = layer(x)
    w = layer.router.proj.weight
    g_layer, = torch.autograd.grad(st.aux_loss + 0.5 * st.z_loss, w)
    logits, probs = router_by_hand(layer, x)
    S = logits.shape[0]
    f = torch.bincount(probs.topk(K, -1).indices.reshape(-1), minlength=E).double() / (K * S)
    aux = E * (f * probs.mean(0)).sum()
    z = torch.logsumexp(logits, -1).square().mean()
    g_hand, = torch.autograd.grad(aux + 0.5 * z, w)
    torch.testing.assert_close(g_layer.double(), g_hand.double(), rtol=1e-4, atol=1e-7)


def test_load_balance_loss_hand_numbers():
    """E=3, S=4 sub-tokens: first choices (2, 1, 1) over experts, probability sums (1.5, 1.5, 1.0).
    aux = 3 * (2/4 * 1.5/4 + 1/4 * 1.5/4 + 1/4 * 1.0/4) = 3 * 5.5/16 = 1.03125."""
    got = load_balance_loss(torch.tensor([1.5, 1.5, 1.0]), torch.tensor([2, 1, 1]), 4)
    assert float(got) == pytest.approx(1.03125, rel=1e-7)
