"""The sigmoid gate (DeepSeek-V3): scores s = sigmoid(x W^T) per expert, top-k on s, gates s_top / sum(s_top)
x gate_scaling at k > 1 and s_top x gate_scaling at k = 1 (Megatron-core). Its balance loss uses P_e = mean of s_e / sum_e' s_e' and its z-loss logsumexp(logits)^2,
checked here on hand-built logits and through the layer, beside the layer against its loop reference."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.moe.layer import MHMoELayer
from megatron_mhmoe.moe.router import SigmoidGate, top_k_sigmoid
from megatron_mhmoe.parallel.context import ParallelContext
from tests.moe.test_layer import assert_layer_matches_reference

SP = ParallelContext.single_process()
LN3, LN9 = math.log(3.0), math.log(9.0)
# sigmoid of these: 0.5, 0.75, 0.25, 0.9 (row 0) and 0.25, 0.5, 0.9, 0.75 (row 1)
LOGITS = torch.tensor([[0.0, LN3, -LN3, LN9], [-LN3, 0.0, LN9, LN3]])


def test_scores_choice_and_gates_by_hand():
    r = top_k_sigmoid(LOGITS, 2, scaling=2.5)
    assert r.experts.tolist() == [[3, 1], [2, 3]]
    want = torch.tensor([[0.9, 0.75], [0.9, 0.75]]) / 1.65 * 2.5
    torch.testing.assert_close(r.gates, want, rtol=1e-6, atol=0)
    # Normalised scores for the balance loss: s / sum_e s, sum_e s = 2.4 in both rows.
    torch.testing.assert_close(r.probs, torch.tensor([[0.5, 0.75, 0.25, 0.9], [0.25, 0.5, 0.9, 0.75]]) / 2.4,
                               rtol=1e-6, atol=0)
    # k = 1 keeps the raw score (normalising one score would make every gate the constant 2.5).
    torch.testing.assert_close(top_k_sigmoid(LOGITS, 1, scaling=2.5).gates, torch.full((2, 1), 0.9 * 2.5))
    # z-loss input: logsumexp of the raw logits, e.g. row 0 = log(1 + 3 + 1/3 + 9).
    torch.testing.assert_close(r.lse, torch.tensor([math.log(1 + 3 + 1 / 3 + 9), math.log(1 / 3 + 1 + 9 + 3)]))


def layer_of(k=2, h=4, cf=0.0, scaling=1.0, proj=True) -> MHMoELayer:
    cfg = ModelConfig(hidden_size=32, num_attention_heads=4, moe=MoEConfig(
        num_experts=4, top_k=k, num_heads=h, head_projection=proj, expert_hidden_size=16, capacity_factor=cf,
        gate="sigmoid", gate_scaling=scaling))
    torch.manual_seed(0)
    return MHMoELayer(cfg, SP)


def test_layer_losses_by_hand():
    """One token, h = 2 sub-tokens whose router logits are LOGITS (the router weight is set so): the balance
    loss is E * sum_e f_e P_e with top-2 choices {3, 1} and {2, 3} (f = counts / (k S) = (0, 1, 1, 2) / 4)
    and P the mean normalised score, the z-loss the mean squared logsumexp."""
    layer = layer_of(k=2, h=2, proj=False)
    assert isinstance(layer.router, SigmoidGate)
    with torch.no_grad():
        layer.router.proj.weight.zero_()
        layer.router.proj.weight[:, :2] = LOGITS.t()  # sub-token i = unit vector e_i (columns 0..1)
    x = torch.zeros(1, 1, 32)
    x[0, 0, 0] = 1.0  # sub-token 0 = (1, 0, ...): logits row 0
    x[0, 0, 17] = 1.0  # sub-token 1 = (0, 1, ...): logits row 1
    _, st = layer(x)
    f = [0.0, 0.25, 0.25, 0.5]
    P = [(0.5 + 0.25) / 2 / 2.4, (0.75 + 0.5) / 2 / 2.4, (0.25 + 0.9) / 2 / 2.4, (0.9 + 0.75) / 2 / 2.4]
    aux = 4 * sum(fe * pe for fe, pe in zip(f, P))
    assert st.aux_loss.item() == pytest.approx(aux, rel=1e-6)
    lse = [math.log(1 + 3 + 1 / 3 + 9), math.log(1 / 3 + 1 + 9 + 3)]
    assert st.z_loss.item() == pytest.approx((lse[0] ** 2 + lse[1] ** 2) / 2, rel=1e-6)
    # The softmax of the same logits would give another balance loss: the check can tell them apart.
    P_soft = torch.softmax(LOGITS, -1).mean(0).tolist()
    assert abs(4 * sum(fe * pe for fe, pe in zip(f, P_soft)) - aux) > 1e-2


@pytest.mark.parametrize("k,h,cf", [(1, 1, 0.0), (2, 4, 0.0), (2, 4, 1.0), (1, 4, 1.0)])
def test_layer_equals_loop_reference(k, h, cf):
    assert_layer_matches_reference(layer_of(k=k, h=h, cf=cf, proj=h > 1))


def test_gate_scaling_scales_the_expert_output():
    """No projections: y is the gate-weighted sum of expert outputs, so it scales with gate_scaling."""
    x = torch.randn(6, 2, 32)
    y1, _ = layer_of(k=2, h=1, proj=False)(x)
    y3, _ = layer_of(k=2, h=1, proj=False, scaling=3.0)(x)
    torch.testing.assert_close(y3, 3.0 * y1, atol=1e-6, rtol=1e-5)


def test_router_runs_in_fp32_under_bf16():
    gate = SigmoidGate(8, 4, 0.02).to(torch.bfloat16)
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = gate(x)
    assert logits.dtype == torch.float32
    assert top_k_sigmoid(logits, 2).gates.dtype == torch.float32
