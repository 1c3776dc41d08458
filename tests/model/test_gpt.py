"""Single-process GPT: outputs, losses, parameter counts, the FFN slot contract (with a stub MoE layer),
activation checkpointing and input validation. No processes are spawned here."""
from __future__ import annotations

import dataclasses
import sys
import types
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.model import GPTModel, GPTOutput
from megatron_mhmoe.model.mlp import ParallelMLP
from megatron_mhmoe.parallel import init as pinit
from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.parallel.params import mark_expert, mark_tp_partial

CFG = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=128,
                  max_seq_len=32)
SINGLE = ParallelContext.single_process()


def batch(cfg=CFG, b=2, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, cfg.vocab_size, (b, s), generator=g),
            torch.randint(0, cfg.vocab_size, (b, s), generator=g))


def test_logits_and_loss_match_torch_cross_entropy():
    model = GPTModel(CFG, SINGLE)
    tokens, labels = batch()
    out = model(tokens, labels=labels, return_logits=True)
    assert isinstance(out, GPTOutput)
    assert out.logits.shape == (2, 16, CFG.padded_vocab_size(1))  # 384: padded vocab
    ref = F.cross_entropy(out.logits[..., :CFG.vocab_size].reshape(-1, CFG.vocab_size), labels.reshape(-1))
    torch.testing.assert_close(out.lm_loss, ref)
    assert out.loss is out.lm_loss  # dense: no auxiliary terms
    assert out.aux_loss.shape == () and float(out.aux_loss) == 0.0 and float(out.z_loss) == 0.0
    assert out.moe_stats == []


def test_logits_only_without_labels_and_dropped_with_labels():
    model = GPTModel(CFG, SINGLE)
    tokens, labels = batch()
    out = model(tokens)
    assert out.loss is None and out.lm_loss is None and out.logits.shape == (2, 16, 384)
    assert model(tokens, labels=labels).logits is None


def test_loss_mask_weighting():
    model = GPTModel(CFG, SINGLE)
    tokens, labels = batch()
    mask = torch.zeros(2, 16)
    mask[0, 3:9] = 1.0
    mask[1, 0] = 2.0  # weights, not just booleans
    out = model(tokens, labels=labels, loss_mask=mask, return_logits=True)
    per_token = F.cross_entropy(out.logits[..., :300].reshape(-1, 300), labels.reshape(-1), reduction="none")
    ref = (per_token * mask.reshape(-1)).sum() / mask.sum()
    torch.testing.assert_close(out.lm_loss, ref)
    zero = model(tokens, labels=labels, loss_mask=torch.zeros(2, 16))
    assert float(zero.lm_loss.detach()) == 0.0  # not NaN


def test_causal():
    """Changing a later token does not change earlier logits."""
    model = GPTModel(dataclasses.replace(CFG, position_embedding="rope"), SINGLE)
    tokens, _ = batch()
    other = tokens.clone()
    other[:, 10] = (other[:, 10] + 1) % CFG.vocab_size
    a, b = model(tokens).logits, model(other).logits
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_padded_vocab_does_not_change_the_loss():
    """Same weights, vocabulary padded to 384 or to 1024: same loss and same logits on real ids."""
    tokens, labels = batch()
    small = GPTModel(CFG, SINGLE, seed=3)
    big = GPTModel(dataclasses.replace(CFG, make_vocab_divisible_by=1024), SINGLE, seed=3)
    a = small(tokens, labels=labels, return_logits=True)
    b = big(tokens, labels=labels, return_logits=True)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.logits[..., :300], b.logits[..., :300])


def test_num_params_dense_by_hand():
    d, f, v, L, s = 64, 128, 300, 2, 32
    ln = 2 * d
    block = 2 * ln + (3 * d * d + 3 * d) + (d * d + d) + (f * d + f) + (d * f + d)
    tied = v * d + s * d + L * block + ln
    counts = GPTModel(CFG, SINGLE).num_params()
    assert counts == {"total": tied, "expert": 0, "non_expert": tied, "active_per_token": tied}
    # untied, RMSNorm, RoPE, SwiGLU (no biases)
    cfg = dataclasses.replace(CFG, tie_embeddings=False, norm="rmsnorm", position_embedding="rope",
                              activation="swiglu")
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 3 * f * d
    assert GPTModel(cfg, SINGLE).num_params()["total"] == v * d + L * block + d + v * d


@torch.no_grad()
def test_init_rules():
    """Norms ones, biases zeros, residual-output projections scaled by 1/sqrt(2L), padded rows zero."""
    cfg = dataclasses.replace(CFG, num_layers=8, hidden_size=256, ffn_hidden_size=1024, init_std=0.02)
    model = GPTModel(cfg, SINGLE)
    blk = model.layers[0]
    assert torch.equal(blk.norm1.weight, torch.ones(256)) and torch.equal(blk.norm1.bias, torch.zeros(256))
    assert torch.equal(blk.attn.qkv.bias, torch.zeros(768))
    assert abs(float(blk.attn.qkv.weight.std()) - 0.02) < 0.001
    assert abs(float(blk.ffn.fc2.weight.std()) - 0.02 / 4.0) < 0.0005  # sqrt(2 * 8) = 4
    assert abs(float(blk.attn.proj.weight.std()) - 0.005) < 0.0005
    emb = model.embedding.word_embeddings.weight
    assert torch.equal(emb[300:], torch.zeros(84, 256))
    # deterministic by seed; different seeds differ
    assert torch.equal(GPTModel(CFG, SINGLE, seed=5).layers[1].attn.qkv.weight,
                       GPTModel(CFG, SINGLE, seed=5).layers[1].attn.qkv.weight)
    assert not torch.equal(GPTModel(CFG, SINGLE, seed=5).layers[1].attn.qkv.weight,
                           GPTModel(CFG, SINGLE, seed=6).layers[1].attn.qkv.weight)


def test_activation_checkpointing_same_grads():
    tokens, labels = batch()
    grads = []
    for ckpt in (False, True):
        model = GPTModel(dataclasses.replace(CFG, activation="swiglu"), SINGLE)
        model.activation_checkpointing = ckpt
        model(tokens, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=0, atol=0, msg=n)


def test_forward_validation():
    model = GPTModel(CFG, SINGLE)
    with pytest.raises(ValueError, match="sequence length 33 > max_seq_len 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"num_attention_heads 4 is not divisible by tensor-parallel size 3"):
        GPTModel(CFG, ParallelContext(coords=dataclasses.replace(SINGLE.coords, world_size=3, tp_size=3)))
    # A TP=2 SP context without process groups: construction works, the length check fires before any comm.
    sp = ParallelContext(coords=dataclasses.replace(SINGLE.coords, world_size=2, tp_size=2), sequence_parallel=True)
    with pytest.raises(ValueError, match=r"length 15 is not divisible by tensor-parallel size 2 \(15 % 2 = 1\)"):
        GPTModel(CFG, sp)(torch.zeros(1, 15, dtype=torch.long))


# ---------------------------------------------------------------------- the FFN slot with a stub MoE layer
@dataclass
class StubStats:
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    layer: int


class StubMoE(nn.Module):
    """Honours the FFN contract: forward(x) -> (y, stats); experts stacked and marked as experts."""

    def __init__(self, config, ctx, layer_idx):
        super().__init__()
        moe, d = config.moe, config.hidden_size
        self.layer_idx = layer_idx
        self.head = nn.Parameter(torch.empty(d, d))
        mark_tp_partial(self.head)
        self.experts = nn.Parameter(torch.empty(moe.num_experts // ctx.ep_size, d, moe.expert_hidden_size))
        mark_expert(self.experts, ctx)
        pinit.set_init(self.experts, pinit.xavier_uniform())
        self.temperature = nn.Parameter(torch.full((), 0.3))  # 0-dim, no init_method: kept

    def forward(self, x):
        h = torch.einsum("sbd,ed->sbe", x, self.head)  # (s, b, d)
        y = torch.einsum("sbd,ndf->sbf", h, self.experts).mean(-1, keepdim=True) * h  # (s, b, d)
        stats = StubStats(aux_loss=(h ** 2).mean() * 0 + 1.5 + self.layer_idx, z_loss=h.abs().mean() * 0 + 0.25,
                          layer=self.layer_idx)
        return y / self.temperature, stats


@pytest.fixture
def stub_moe(monkeypatch):
    module = types.ModuleType("megatron_mhmoe.moe.layer")
    module.MHMoELayer = StubMoE
    monkeypatch.setitem(sys.modules, "megatron_mhmoe.moe.layer", module)
    return module


def test_ffn_slot_builds_moe_layers_and_collects_stats(stub_moe):
    moe = MoEConfig(num_experts=8, top_k=2, num_heads=4, expert_hidden_size=32, moe_every=2,
                    aux_loss_coef=0.01, z_loss_coef=0.1)
    cfg = dataclasses.replace(CFG, num_layers=4, moe=moe)
    model = GPTModel(cfg, SINGLE)
    kinds = [type(layer.ffn) for layer in model.layers]
    assert kinds == [ParallelMLP, StubMoE, ParallelMLP, StubMoE]  # layers 1 and 3 (moe_every=2)
    assert float(model.layers[1].ffn.temperature.detach()) == pytest.approx(0.3)  # 0-dim param without init kept
    tokens, labels = batch()
    out = model(tokens, labels=labels)
    assert [st.layer for st in out.moe_stats] == [1, 3]
    torch.testing.assert_close(out.aux_loss, torch.tensor(1.5 + 1 + 1.5 + 3))
    torch.testing.assert_close(out.z_loss, torch.tensor(0.5))
    torch.testing.assert_close(out.loss, out.lm_loss + 0.01 * out.aux_loss + 0.1 * out.z_loss)
    out.loss.backward()
    assert model.layers[1].ffn.experts.grad is not None

    counts = model.num_params()
    expert = 2 * 8 * 64 * 32
    assert counts["expert"] == expert
    assert counts["total"] == counts["non_expert"] + expert
    assert counts["active_per_token"] == counts["non_expert"] + expert * 4 * 2 // 8  # h*k slots of E


def _sizing_variants():
    import os

    from megatron_mhmoe.launch.cli import resolve_config
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    preset = os.path.join(root, "megatron_mhmoe", "presets", "quickstart.yaml")
    d = dict(vocab_size=10, hidden_size=8, num_layers=2, num_attention_heads=2, ffn_hidden_size=16, max_seq_len=4)
    smoe = MoEConfig(num_experts=4, top_k=2, num_heads=1, head_projection=False, expert_hidden_size=16,
                     gate="softmax", moe_every=2)
    mhmoe = MoEConfig(num_experts=16, top_k=2, num_heads=4, expert_hidden_size=6, gate_dim=3, moe_every=2)
    many_slots = MoEConfig(num_experts=4, top_k=2, num_heads=4, expert_hidden_size=6, expert_activation="swiglu",
                           moe_every=1)
    return {
        "quickstart": resolve_config(preset, []).model,
        "dense_tied": ModelConfig(**d), "dense_untied_rope": ModelConfig(**d, tie_embeddings=False,
                                                                         position_embedding="rope"),
        "smoe": ModelConfig(**d, moe=smoe), "mhmoe": ModelConfig(**d, moe=mhmoe),
        "mhmoe_untied_rmsnorm": ModelConfig(**d, moe=mhmoe, tie_embeddings=False, norm="rmsnorm"),
        "mhmoe_hk_over_E": ModelConfig(**d, moe=many_slots),
    }


@pytest.mark.parametrize("name", sorted(_sizing_variants()))
def test_num_params_is_the_sizing_count(name):
    """The live module's counts (what training prints) are the config arithmetic of moe/sizing.py."""
    from megatron_mhmoe.moe import sizing
    cfg = _sizing_variants()[name]
    counts = GPTModel(cfg, SINGLE).num_params()
    want = sizing.count_params(cfg)
    assert counts == {k: want[k] for k in ("total", "expert", "non_expert", "active_per_token")}
    assert counts["active_per_token"] == sizing.active_params_per_token(cfg)
    if name == "quickstart":
        assert counts["active_per_token"] == counts["total"] == 1006850  # h*k = 8 = E slots per token


def test_dense_model_does_not_import_moe(monkeypatch):
    # None in sys.modules makes any import of the module raise ImportError.
    monkeypatch.setitem(sys.modules, "megatron_mhmoe.moe.layer", None)
    GPTModel(CFG, SINGLE)
