"""Tests of megatron_mhmoe.moe.sizing: hand counts, the published sizes, matching, errors, CLI."""
import subprocess
import sys

import pytest

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.moe import sizing


def _tiny() -> ModelConfig:
    # d=8, V=10, L=2 (layer 1 is MoE), learned positions (4), tied, LayerNorm, GELU dense FFN f=16;
    # MoE: h=2, E=4, k=2, projections, xmoe gate_dim=3, GELU experts of width 6.
    return ModelConfig(vocab_size=10, hidden_size=8, num_layers=2, num_attention_heads=2, ffn_hidden_size=16,
                       max_seq_len=4, moe=MoEConfig(num_experts=4, top_k=2, num_heads=2, expert_hidden_size=6,
                                                    gate_dim=3, moe_every=2)).validate()


def _published_smoe() -> ModelConfig:
    dense = ModelConfig(vocab_size=50257, hidden_size=768, num_layers=12, num_attention_heads=12,
                        ffn_hidden_size=2048, max_seq_len=2048, activation="swiglu")
    return sizing.smoe_from_dense(dense, num_experts=8, top_k=1)


def test_params_hand_count():
    p = sizing.count_params(_tiny())
    embedding, position = 10 * 8, 4 * 8
    attention = 2 * (8 * 24 + 24 + 8 * 8 + 8)           # 2 x 288
    norms = 5 * 2 * 8                                  # 2 per block + final, weight + bias
    dense_ffn = 8 * 16 + 16 + 16 * 8 + 8               # 280
    proj = 2 * (8 * 8 + 8)                             # 144
    router = 4 * 3 + 4 * 3 + 1                         # Linear(4 -> 3) + 4 x 3 embeddings + temperature
    experts = 4 * 2 * 4 * 6                            # E * n * (d/h) * e = 192
    total = embedding + position + attention + norms + dense_ffn + proj + router + experts
    assert total == 1409
    assert p["total"] == total and p["expert"] == experts and p["non_expert"] == total - experts
    assert p["active_per_token"] == total                       # h*k = 4 = E: every expert reachable
    assert p["active_per_subtoken"] == total - experts + experts * 2 / 4


def test_params_variants():
    cfg = _tiny()
    untied = ModelConfig(**{**cfg.__dict__, "tie_embeddings": False, "position_embedding": "rope",
                            "norm": "rmsnorm"})
    p, q = sizing.count_params(cfg), sizing.count_params(untied)
    assert q["total"] - p["total"] == 10 * 8 - 4 * 8 - 5 * 8   # + LM head, - position table, - norm biases
    swiglu = ModelConfig(**{**cfg.__dict__, "activation": "swiglu", "moe": None})
    assert sizing.dense_ffn_params(swiglu) == 3 * 8 * 16
    soft = ModelConfig(**{**cfg.__dict__, "moe": MoEConfig(num_experts=4, top_k=1, num_heads=1,
                                                             head_projection=False, expert_hidden_size=6,
                                                             gate="softmax", expert_activation="swiglu")})
    assert sizing.moe_layer_params(soft) == {"projection": 0, "router": 8 * 4, "experts": 4 * 3 * 8 * 6,
                                             "shared": 0, "total": 32 + 576}


def test_flops_hand_count():
    f = sizing.flops_breakdown(_tiny(), seq_len=4)
    assert f == {"attention_proj": 2 * 2 * 4 * 64, "attention_scores": 2 * 2 * 2 * 4 * 8,
                 "dense_ffn": 2 * 2 * 8 * 16, "moe_proj": 2 * 2 * 64, "router": 2 * 2 * (4 * 3 + 4 * 3),
                 "experts": 2 * 2 * 2 * 2 * 4 * 6, "shared_experts": 0, "lm_head": 2 * 10 * 8, "total": 2688}
    assert sizing.flops_per_token(_tiny(), 4) == 2688


def test_published_follow_up_sizes():
    # 2*768^2 + 3*768*d'*k' = 3*768*2048*1  ->  d'k' = 1536
    assert (3 * 768 * 2048 - 2 * 768 ** 2) / (3 * 768) == 1536
    smoe = _published_smoe()
    cfg2, r2 = sizing.flops_and_params_matched(smoe, 2)
    cfg3, r3 = sizing.flops_and_params_matched(smoe, 3)
    assert (r2["d_prime"], r2["k_prime"], r2["E_prime"]) == (768, 2, 40)
    assert (r3["d_prime"], r3["k_prime"], r3["E_prime"]) == (512, 3, 96)
    assert r2["E_prime_exact"] == pytest.approx(36569088 / 884736) == pytest.approx(41.333, abs=1e-3)
    assert r3["E_prime_exact"] == pytest.approx(93.0)
    assert (cfg2.moe.num_heads, cfg2.moe.top_k, cfg2.moe.expert_hidden_size, cfg2.moe.num_experts) == \
        (2, 2, 768, 40)
    assert cfg3.moe.head_projection and cfg3.moe.expert_activation == "swiglu"
    # the multiple-of-8 rounding misses an exact parameter match by exactly 2d^2 per MoE layer
    d2 = 2 * 768 ** 2
    assert r2["layer_params_ref"] - r2["layer_params"] == pytest.approx(d2, rel=1e-2)
    assert r3["layer_params"] - r3["layer_params_ref"] == pytest.approx(d2, rel=1e-2)
    for r in (r2, r3):
        assert r["layer_flops_ratio"] == pytest.approx(1.0, rel=1e-2)


@pytest.mark.parametrize("activation,d_ff,h", [("swiglu", 2048, 2), ("swiglu", 2048, 3), ("swiglu", 2048, 4),
                                                ("gelu", 3072, 2), ("gelu", 3072, 4), ("gelu", 3072, 8)])
def test_matched_configs_match(activation, d_ff, h):
    dense = ModelConfig(vocab_size=50257, hidden_size=768, num_layers=12, num_attention_heads=12,
                        ffn_hidden_size=d_ff, max_seq_len=2048, activation=activation)
    smoe = sizing.smoe_from_dense(dense, num_experts=8, top_k=1)
    seq = 2048

    def close(a, b):
        return abs(a / b - 1) < 0.01

    new, rep = sizing.flops_and_params_matched(smoe, h, expert_multiple=1)
    assert close(sizing.count_params(new)["total"], sizing.count_params(smoe)["total"])
    assert close(rep["layer_params"], rep["layer_params_ref"])
    assert close(sizing.flops_per_token(new, seq), sizing.flops_per_token(smoe, seq))
    macs, macs_ref = sizing.moe_layer_macs(new), sizing.moe_layer_macs(smoe)
    assert close(macs["projection"] + macs["experts"], macs_ref["experts"])     # the equation's terms
    if h <= 4:  # the xmoe router scores h * E' sub-token/expert pairs: 1.8% of the layer at h=8, E'=661
        assert close(rep["layer_macs"], rep["layer_macs_ref"])

    new, rep = sizing.param_matched(smoe, h)
    assert close(sizing.count_params(new)["total"], sizing.count_params(smoe)["total"])
    assert close(rep["layer_params"], rep["layer_params_ref"])
    assert rep["E_prime"] == 8 and rep["k_prime"] == 1 and rep["d_prime"] % 8 == 0
    assert rep["layer_flops_ratio"] > 1.5          # parameter matching makes experts ~h x wider


def test_dense_reference_is_one_expert_smoe():
    dense = ModelConfig(vocab_size=100, hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=256)
    _, rep = sizing.flops_and_params_matched(dense, 2, expert_multiple=1)
    assert (rep["k_prime"], rep["E_prime"], rep["d_prime"]) == (2, 4, 96)   # E' = h k'; d'k' = 256 - 64
    _, rep = sizing.param_matched(dense, 2)
    assert rep["E_prime"] == 1 and rep["d_prime"] == 384                   # (2*64*256 - 2*64^2)/(2*32)


def test_invalid_inputs():
    smoe = _published_smoe()
    with pytest.raises(ValueError, match=r"768 % 5 = 3"):
        sizing.flops_and_params_matched(smoe, 5)
    with pytest.raises(ValueError, match=r"768 % 5 = 3"):
        sizing.param_matched(smoe, 5)
    with pytest.raises(ValueError, match="k_prime=0"):
        sizing.flops_and_params_matched(smoe, 2, k_prime=0)
    # projections (2d^2 = 8192) outweigh tiny experts: E n d d_ff = 2*2*64*16 = 4096, k n d d_ff = 2048
    small = ModelConfig(vocab_size=100, hidden_size=64, num_layers=2, num_attention_heads=4,
                        moe=MoEConfig(num_experts=2, top_k=1, num_heads=1, head_projection=False,
                                      expert_hidden_size=16))
    with pytest.raises(ValueError, match=r"\(2048 - 2\*64\^2\)"):
        sizing.flops_and_params_matched(small, 2)
    with pytest.raises(ValueError, match=r"\(4096 - 2\*64\^2\)"):
        sizing.param_matched(small, 2)
    with pytest.raises(ValueError, match="seq_len"):
        sizing.flops_per_token(smoe, 0)


def test_cli():
    run = [sys.executable, "-m", "megatron_mhmoe.moe.sizing"]
    out = subprocess.run(run + ["--help"], capture_output=True, text=True, check=True).stdout
    assert "--mode" in out and "--heads" in out
    out = subprocess.run(run + ["--hidden-size", "768", "--num-layers", "12", "--vocab-size", "50257",
                                "--ffn-hidden-size", "2048", "--num-experts", "8", "--top-k", "1",
                                "--heads", "2", "3", "--activation", "swiglu", "--moe-every", "2",
                                "--mode", "flops", "--seq-len", "2048"],
                         capture_output=True, text=True, check=True).stdout
    for s in ("Dense", "SMoE", "MH-MoE h=2 [flops]", "k'=2 d'=768 E'=40", "k'=3 d'=512 E'=96"):
        assert s in out, out
    out = subprocess.run(run + ["--activation", "swiglu", "--heads", "2", "--mode", "flops", "--num-shared-experts",
                                "1", "--expert-multiple", "1"], capture_output=True, text=True, check=True).stdout
    # d' = (2*3*768*2048 - 2*768^2) / (3*768*3) = 1194.67 -> 1192, E' = 29.07 -> 29 (see the hand test below)
    assert "k=1 + 1 shared" in out and "k'=2 d'=1192 E'=29" in out, out


# ---------------------------------------------------------------------------- active parameters per token
# d=8, V=10, L=2, 2 attention heads, GELU dense FFN f=16, LayerNorm, 4 learned positions; layer 1 is MoE.
_BASE = dict(vocab_size=10, hidden_size=8, num_layers=2, num_attention_heads=2, ffn_hidden_size=16, max_seq_len=4)
# Non-expert parts shared by every variant below (tied): token table 10*8, positions 4*8, attention
# 2 x (8*24 + 24 + 8*8 + 8), norms 5 x (8 + 8).
_SHARED = 10 * 8 + 4 * 8 + 2 * 288 + 5 * 16        # 768
_DENSE_FFN = 8 * 16 + 16 + 16 * 8 + 8               # 280 per dense layer


def _variant(name: str) -> ModelConfig:
    if name in ("dense", "dense_untied"):
        return ModelConfig(**_BASE, tie_embeddings=name == "dense").validate()
    if name == "smoe":   # h=1, no projections, softmax gate, E=4 top-2 GELU experts of width 16
        moe = MoEConfig(num_experts=4, top_k=2, num_heads=1, head_projection=False, expert_hidden_size=16,
                        gate="softmax", moe_every=2)
    else:                # h=4 (sub-tokens of width 2), k=2, E=16 GELU experts of width 6, xmoe gate_dim 3
        moe = MoEConfig(num_experts=16, top_k=2, num_heads=4, expert_hidden_size=6, gate_dim=3, moe_every=2)
    return ModelConfig(**_BASE, tie_embeddings=not name.endswith("untied"), moe=moe).validate()


# name: (total, expert, active) counted by hand
_ACTIVE_BY_HAND = {
    # every parameter is active in a dense model, the whole embedding table included
    "dense": (_SHARED + 2 * _DENSE_FFN, 0, _SHARED + 2 * _DENSE_FFN),
    # + an untied LM head 10*8, active in full (every token's logits use all of it)
    "dense_untied": (_SHARED + 2 * _DENSE_FFN + 80, 0, _SHARED + 2 * _DENSE_FFN + 80),
    # router Linear(8 -> 4) = 32; experts 4 x (8*16 + 16*8) = 1024; a token uses 2 of them: 2 x 256
    "smoe": (_SHARED + _DENSE_FFN + 32 + 1024, 1024, _SHARED + _DENSE_FFN + 32 + 2 * 256),
    # projections 2 x (64 + 8) = 144; router Linear(2 -> 3) + 16 x 3 embeddings + temperature = 55;
    # experts 16 x (2*6 + 6*2) = 384; a token's 4 sub-tokens x 2 experts = 8 slots of 24 weights = 192
    "mhmoe": (_SHARED + _DENSE_FFN + 144 + 55 + 384, 384, _SHARED + _DENSE_FFN + 144 + 55 + 8 * 24),
    "mhmoe_untied": (_SHARED + _DENSE_FFN + 144 + 55 + 384 + 80, 384, _SHARED + _DENSE_FFN + 144 + 55 + 192 + 80),
}


@pytest.mark.parametrize("name", sorted(_ACTIVE_BY_HAND))
def test_active_params_by_hand(name):
    total, expert, active = _ACTIVE_BY_HAND[name]
    cfg = _variant(name)
    p = sizing.count_params(cfg)
    assert (p["total"], p["expert"], p["active_per_token"]) == (total, expert, active)
    assert sizing.active_params_per_token(cfg) == active
    assert isinstance(p["active_per_token"], int)


def test_active_params_count_every_routing_slot():
    """h*k slots per token even when h*k > E: twice the weights read is twice the active expert part, and
    2 x the active expert part is the experts' FLOPs term whatever h, k and E are."""
    for h, k, E in ((1, 1, 4), (1, 2, 4), (4, 2, 16), (4, 2, 8), (4, 2, 4), (2, 4, 4), (8, 1, 2)):
        moe = MoEConfig(num_experts=E, top_k=k, num_heads=h, expert_hidden_size=6, gate_dim=3, moe_every=1)
        cfg = ModelConfig(**_BASE, moe=moe).validate()
        p = sizing.count_params(cfg)
        active_expert = p["active_per_token"] - p["non_expert"]
        # 2 MoE layers x h*k slots x 2 GELU matrices of (d/h) x 6
        assert active_expert == 2 * h * k * 2 * (8 // h) * 6
        assert 2 * active_expert == sizing.flops_breakdown(cfg, 4)["experts"]
        if h == 1:
            assert p["active_per_token"] == p["active_per_subtoken"]


def test_active_params_quickstart_preset():
    import os

    from megatron_mhmoe.launch.cli import resolve_config
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    preset = os.path.join(root, "megatron_mhmoe", "presets", "quickstart.yaml")
    cfg = resolve_config(preset, []).model
    p = sizing.count_params(cfg)
    # 2 MoE layers x 8 experts x (32*128 + 128*32) = 131072 expert weights; h*k = 4*2 = 8 = E slots of
    # 8192 weights per layer: every expert weight once per token, so active = total here.
    assert p["expert"] == 131072 and p["total"] == 1006850
    assert p["active_per_token"] == p["total"] == 1006850
    assert p["active_per_subtoken"] == 1006850 - 131072 + 131072 * 2 // 8 == 908546


# ---------------------------------------------------------------------------- shared experts
def _tiny_shared(n_s=2, e_s=5) -> ModelConfig:
    """_tiny() with n_s shared experts of width e_s on each sub-token (d/h = 4, GELU: n = 2)."""
    cfg = _tiny()
    moe = MoEConfig(**{**cfg.moe.__dict__, "num_shared_experts": n_s, "shared_expert_hidden_size": e_s})
    return ModelConfig(**{**cfg.__dict__, "moe": moe}).validate()


def test_shared_expert_params_and_active_params_by_hand():
    p0, p = sizing.count_params(_tiny()), sizing.count_params(_tiny_shared())
    shared = 2 * 2 * 4 * 5                       # n_s * n * (d/h) * e_s = 80, one MoE layer
    assert sizing.moe_layer_params(_tiny_shared())["shared"] == shared
    assert p["total"] == 1409 + 80 and p["shared_expert"] == 80
    assert p["expert"] == p0["expert"] == 192 and p["non_expert"] == 1409 - 192 + 80  # shared = non-expert
    # each of the h=2 sub-tokens reads the shared experts: active gains h * 80 = 160 (routed part as before)
    assert p["active_per_token"] == p0["active_per_token"] + 2 * 80 == 1409 + 160
    assert p["active_per_subtoken"] == p0["active_per_subtoken"] + 80   # one sub-token reads them once
    # e_s = 0 means the routed width e = 6
    assert sizing.moe_layer_params(_tiny_shared(n_s=1, e_s=0))["shared"] == 1 * 2 * 4 * 6


def test_shared_expert_flops_by_hand():
    f = sizing.flops_breakdown(_tiny_shared(), seq_len=4)
    # MoE layers x 2 x h sub-tokens x n_s x n x (d/h) x e_s = 1 * 2 * 2 * 2 * 2 * 4 * 5 = 320
    assert f["shared_experts"] == 1 * 2 * 2 * 2 * 2 * 4 * 5 == 320
    assert f["total"] == 2688 + 320
    assert sizing.moe_layer_macs(_tiny_shared())["shared"] == 160
    # 2 x the active shared part is the FLOPs term, as for the routed experts
    p = sizing.count_params(_tiny_shared())
    assert 2 * (p["active_per_token"] - sizing.count_params(_tiny())["active_per_token"]) == f["shared_experts"]


def test_shared_expert_is_one_more_top_k_choice():
    """Shared experts of the routed width cost exactly what n_s more top-k choices cost, per token."""
    one = _tiny_shared(n_s=1, e_s=6)
    k3 = ModelConfig(**{**_tiny().__dict__, "moe": MoEConfig(**{**_tiny().moe.__dict__, "top_k": 3})})
    assert sizing.flops_breakdown(one, 4)["shared_experts"] + sizing.flops_breakdown(one, 4)["experts"] == \
        sizing.flops_breakdown(k3, 4)["experts"] == 2 * 2 * 3 * 2 * 4 * 6


def _with_shared(cfg: ModelConfig, n_s: int = 1) -> ModelConfig:
    return ModelConfig(**{**cfg.__dict__, "moe": MoEConfig(**{**cfg.moe.__dict__, "num_shared_experts": n_s})})


def test_matching_with_a_shared_expert_by_hand():
    """The published SMoE (d=768, SwiGLU d_ff=2048, E=8, top-1) with one shared expert of its shape."""
    smoe = _with_shared(_published_smoe())
    n, d, f = 3, 768, 2048
    assert sizing.moe_layer_params(smoe)["shared"] == n * d * f
    # flops: M_ref = (k + n_s) n d d_ff = 2*3*768*2048; d' = (M_ref - 2d^2) / (n d (k' + n_s))
    new, rep = sizing.flops_and_params_matched(smoe, 2)
    assert rep["d_prime_exact"] == pytest.approx((2 * n * d * f - 2 * d * d) / (n * d * 3))   # 1194.67
    assert rep["d_prime"] == 1192 and rep["k_prime"] == 2 and rep["num_shared_experts"] == 1
    # E' = (P_ref - 2d^2) / (n (d/h) d') - n_s, P_ref = (E + n_s) n d d_ff
    assert rep["E_prime_exact"] == pytest.approx((9 * n * d * f - 2 * d * d) / (n * 384 * 1192) - 1)
    assert new.moe.num_shared_experts == 1 and new.moe.shared_expert_hidden_size == 0   # routed width d'
    assert sizing.moe_layer_params(new)["shared"] == n * 384 * 1192
    assert rep["layer_flops_ratio"] == pytest.approx(1.0, rel=5e-3)
    new1, rep1 = sizing.flops_and_params_matched(smoe, 2, expert_multiple=1)
    assert rep1["layer_param_ratio"] == pytest.approx(1.0, rel=1e-2)
    # params: d' = (P_ref - 2d^2) / ((E + n_s) n d/h), same E and k
    new, rep = sizing.param_matched(smoe, 2)
    assert rep["d_prime_exact"] == pytest.approx((9 * n * d * f - 2 * d * d) / (9 * n * 384))    # 3982.2
    assert rep["d_prime"] == 3984 and rep["E_prime"] == 8
    assert rep["layer_param_ratio"] == pytest.approx(1.0, rel=1e-3)
