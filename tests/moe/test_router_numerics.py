"""Router and layer numerics at the edges: exactly-zero sub-tokens in the X-MoE gate, and a layer call
with no tokens at all."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.moe.layer import MHMoELayer
from megatron_mhmoe.moe.router import NORMALIZE_EPS, XMoEGate
from megatron_mhmoe.parallel.context import ParallelContext

SP = ParallelContext.single_process()
DTYPES = [torch.float32, torch.bfloat16]


def cfg_of(gate="xmoe", cf=0.0, h=4, proj=True) -> ModelConfig:
    return ModelConfig(hidden_size=32, num_attention_heads=4, moe=MoEConfig(
        num_experts=8, top_k=2, num_heads=h, head_projection=proj, expert_hidden_size=16,
        capacity_factor=cf, gate=gate))


def _jacobian_bound(gate: XMoEGate) -> float:
    """|dL/dx_s| <= |W|_2 |M_hat|_2 |dL/dlogits_s| / (tau * eps) for a sub-token with |W x_s| < eps:
    the chain rule through logits = z_hat M_hat^T / tau, z_hat = z / max(|z|, eps) (Jacobian 1/eps
    there) and z = W x."""
    w = gate.proj.weight.detach().float()
    m_hat = F.normalize(gate.expert_embeddings.detach().float(), dim=-1)
    tau = gate.temperature.detach().float().clamp(min=1e-2).item()
    return (torch.linalg.matrix_norm(w, 2) * torch.linalg.matrix_norm(m_hat, 2)).item() / (tau * NORMALIZE_EPS)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_sub_tokens_get_finite_bounded_router_gradients(dtype):
    """Zero tokens through the zero-initialised head bias make every sub-token exactly zero. The balance
    and z-loss gradients stay finite and within the Jacobian bound above; for this layer that means a
    head-bias gradient of norm below 1e4 (1.6e3 here; torch's default eps 1e-12 gives 1.6e11)."""
    torch.manual_seed(0)
    layer = MHMoELayer(cfg_of(), SP).to(dtype)
    seen = {}

    def keep(module, inputs, output):
        inputs[0].retain_grad()
        output.retain_grad()
        seen["x_sub"], seen["logits"] = inputs[0], output

    layer.router.register_forward_hook(keep)
    _, st = layer(torch.zeros(4, 2, 32, dtype=dtype))
    x_sub = seen["x_sub"]
    assert not x_sub.any(), "the sub-tokens should be exactly zero"
    (st.aux_loss + st.z_loss).backward()

    for name, p in layer.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    g_x = x_sub.grad.float().norm(dim=-1)  # (S,)
    g_l = seen["logits"].grad.float().norm(dim=-1)  # (S,)
    assert g_l.min() > 0, "the losses should reach every sub-token's logits"
    slack = 1.0 + (2 ** -7 if dtype == torch.bfloat16 else 1e-5)
    assert (g_x <= _jacobian_bound(layer.router) * g_l * slack).all(), (g_x / g_l).max()
    assert layer.head.bias.grad.float().norm() < 1e4, layer.head.bias.grad.float().norm()


@pytest.mark.parametrize("dtype", DTYPES)
def test_gate_scores_of_real_sub_tokens_are_exact_cosines(dtype):
    """The eps never reaches a sub-token of ordinary scale: its scores are z / |z| against the unit
    expert embeddings, divided by tau, and a zero sub-token next to them scores 0 for every expert."""
    torch.manual_seed(0)
    gate = MHMoELayer(cfg_of(), SP).router.to(dtype)
    x = torch.randn(16, 8).to(dtype)
    x[3] = 0
    logits = gate(x)
    z = x.float() @ gate.proj.weight.float().t()
    assert z[torch.arange(16) != 3].norm(dim=-1).min() > 100 * NORMALIZE_EPS
    m = gate.expert_embeddings.float()
    tau = gate.temperature.float()
    expect = (z / z.norm(dim=-1, keepdim=True)) @ (m / m.norm(dim=-1, keepdim=True)).t() / tau
    expect[3] = 0
    torch.testing.assert_close(logits, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gate,cf,dtype", list(itertools.product(["xmoe", "softmax"], [0.0, 1.0], DTYPES)))
def test_layer_with_no_tokens_returns_zero_losses_and_counts(gate, cf, dtype):
    """The documented choice in moe/layer.py: no tokens is not an error; the output is empty, the aux
    and z losses are exactly 0 (not 0/0) and backpropagate zeros, and the statistics are finite zeros."""
    torch.manual_seed(0)
    layer = MHMoELayer(cfg_of(gate=gate, cf=cf), SP).to(dtype)
    x = torch.zeros(0, 2, 32, dtype=dtype, requires_grad=True)
    y, st = layer(x)
    assert y.shape == (0, 2, 32) and y.dtype == dtype
    assert st.aux_loss.item() == 0.0 and st.z_loss.item() == 0.0
    assert st.num_tokens == 0 and st.num_sub_tokens == 0
    for counts in (st.selections, st.kept, st.divergence):
        assert int(counts.sum()) == 0
    assert st.dropped == 0 and st.dropped_fraction == 0.0
    (y.float().sum() + st.aux_loss + st.z_loss).backward()
    for name, p in layer.named_parameters():
        assert p.grad is None or not p.grad.any(), name
