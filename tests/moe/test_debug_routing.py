"""Debug routing (MoEConfig.debug_routing): the forced choices give exactly the stated counts, the router
still runs and weighs them, the split over TP does not change them, and training refuses the mode unless
train.allow_debug_routing=true."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.moe import capacity as cap
from megatron_mhmoe.moe.layer import MHMoELayer
from megatron_mhmoe.moe.router import debug_experts
from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.runtime.run_config import RunConfig

SP = ParallelContext.single_process()
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def counts(experts: torch.Tensor, E: int) -> list[int]:
    return torch.bincount(experts.reshape(-1), minlength=E).tolist()


@pytest.mark.parametrize("S,k,E", [(64, 2, 8), (30, 1, 6), (10, 3, 4)])
def test_balanced_is_i_k_plus_j_mod_E(S, k, E):
    ex = debug_experts(S, k, E, "balanced", 0.0, 0)
    assert ex.tolist() == [[(i * k + j) % E for j in range(k)] for i in range(S)]
    # S*k consecutive integers mod E: every expert gets floor or ceil of S*k/E, and exactly S*k/E when E divides it.
    c = counts(ex, E)
    assert sum(c) == S * k and max(c) - min(c) <= 1
    if S * k % E == 0:
        assert c == [S * k // E] * E


@pytest.mark.parametrize("S,k,E,f", [(64, 2, 8, 0.5), (64, 2, 8, 0.25), (48, 1, 4, 0.75), (40, 2, 8, 1.0),
                                     (40, 2, 8, 0.0)])
def test_skew_sends_the_fraction_to_expert_0_and_balances_the_rest(S, k, E, f):
    ex = debug_experts(S, k, E, "skew", f, 0)
    skewed = int(S * f)
    first = counts(ex[:, 0], E)
    rest = (S - skewed) * k // E  # (S - skewed) * k is a multiple of E in these cases
    assert (S - skewed) * k % E == 0
    want = [rest + skewed * (e < k) for e in range(E)]
    assert counts(ex, E) == want
    assert first[0] >= skewed
    # Choices of one sub-token stay distinct experts.
    assert all(len(set(row)) == k for row in ex.tolist())


@pytest.mark.parametrize("mode", ["balanced", "skew"])
def test_tp_shards_together_give_the_replica_choice(mode):
    whole = debug_experts(40, 2, 8, mode, 0.3, 0)
    parts = torch.cat([debug_experts(10, 2, 8, mode, 0.3, 10 * r) for r in range(4)])
    assert torch.equal(whole, parts)


def layer_of(mode: str, gate: str = "xmoe", cf: float = 0.0, f: float = 0.5) -> MHMoELayer:
    cfg = ModelConfig(hidden_size=32, num_attention_heads=4, moe=MoEConfig(
        num_experts=8, top_k=2, num_heads=4, expert_hidden_size=16, capacity_factor=cf, gate=gate,
        debug_routing=mode, debug_skew_fraction=f))
    torch.manual_seed(0)
    return MHMoELayer(cfg, SP)


@pytest.mark.parametrize("gate", ["xmoe", "softmax", "sigmoid"])
@pytest.mark.parametrize("mode", ["balanced", "skew"])
def test_layer_counts_and_router_still_trained(gate, mode):
    """32 tokens x h=4 = 128 sub-tokens, k=2, E=8: balanced 256 / 8 per expert; skew f=0.5: 64 skewed
    sub-tokens on experts (0, 1), the other 64 spread as 128 / 8 per expert."""
    S, k, E = 128, 2, 8
    if mode == "balanced":
        want = [S * k // E] * E
    else:
        want = [(S - S // 2) * k // E + (S // 2) * (e < k) for e in range(E)]
    layer = layer_of(mode, gate)
    x = torch.randn(16, 2, 32)
    y, st = layer(x)
    assert st.selections.tolist() == want and st.kept.tolist() == want
    (y.square().sum() + st.aux_loss).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.router.parameters())
    y_ref = layer.forward_reference(x)
    torch.testing.assert_close(y.detach(), y_ref.detach(), atol=1e-6, rtol=1e-5)


def test_capacity_applies_to_the_forced_choice():
    """skew with f = 1 puts every first choice on expert 0: with cf = 1 it keeps capacity of them."""
    layer = layer_of("skew", cf=1.0, f=1.0)
    _, st = layer(torch.randn(8, 2, 32))  # 64 sub-tokens, capacity ceil(1 * 2 * 64 / 8) = 16
    capacity = cap.expert_capacity(1.0, 2, 64, 8)
    assert st.selections.tolist() == [64, 64] + [0] * 6
    assert st.kept.tolist() == [capacity, capacity] + [0] * 6


def test_run_config_refuses_debug_routing_without_the_flag():
    cfg = RunConfig()
    cfg.parallel.ep = 1
    cfg.model.moe = MoEConfig(debug_routing="skew")
    with pytest.raises(ValueError, match="allow_debug_routing=true"):
        cfg.validate(1)
    cfg.train.allow_debug_routing = True
    cfg.validate(1)


def test_training_refuses_debug_routing_exit_2(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="disabled")
    p = subprocess.run([sys.executable, "-m", "megatron_mhmoe.train", "--parallel.ep=1",
                        f"--train.save_dir={tmp_path}/ckpt", "--model.moe.debug_routing=balanced"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "config error" in p.stderr and "train.allow_debug_routing=true" in p.stderr
    assert not os.path.exists(tmp_path / "ckpt")
