"""The two matching modes against the published examples, and the presets against the matching code."""
import pytest

from megatron_mhmoe.config import ModelConfig, model_config_from_dict
from megatron_mhmoe.moe import sizing
from megatron_mhmoe.runtime.run_config import RunConfig, load_config_file
from megatron_mhmoe.scaling import matching
from megatron_mhmoe.scaling.spec import resolve_preset

SEQ = 2048


def _ff_dense():
    return ModelConfig(vocab_size=100277, hidden_size=768, num_layers=12, num_attention_heads=12,
                       ffn_hidden_size=2048, max_seq_len=SEQ, activation="swiglu").validate()


def _paper_dense():
    return ModelConfig(vocab_size=100277, hidden_size=768, num_layers=12, num_attention_heads=12,
                       ffn_hidden_size=3072, max_seq_len=SEQ).validate()


def test_flops_matched_family_2411_16205():
    """SwiGLU d_ff=2048 top-1 8 experts -> fine-grained 16 x 1024 top-2; MH-MoE h=2: k'=2, d'=768, E'=40;
    h=3: k'=3, d'=512, E'=96 (E' = (n d d_ff E - 2d^2) / (n (d/h) d') = 41.33 / 93.00, rounded to 8)."""
    dense = _ff_dense()
    ref = matching.point("smoe", dense, 8, top_k=1).model
    fg = matching.point("finegrained", dense, 8, top_k=1, granularity=2).model
    assert (fg.moe.num_experts, fg.moe.top_k, fg.moe.expert_hidden_size) == (16, 2, 1024)
    expect = {2: (2, 768, 40, 41.33), 3: (3, 512, 96, 93.00)}
    f_ref, p_ref = sizing.flops_per_token(ref, SEQ), sizing.count_params(ref)["total"]
    for h, (k, dp, E, e_exact) in expect.items():
        model, rep = matching.point("mhmoe", dense, 8, h=h, mode="flops", top_k=1)
        m = model.moe
        assert (m.num_heads, m.top_k, m.expert_hidden_size, m.num_experts, m.head_projection) == (h, k, dp, E, True)
        assert rep["E_prime_exact"] == pytest.approx(e_exact, abs=0.01)
        d = 768
        assert 2 * d * d + 3 * d * dp * k == 3 * d * 2048 * 1      # the FLOPs equation holds exactly
        assert sizing.flops_per_token(model, SEQ) == pytest.approx(f_ref, rel=1e-3)
        assert sizing.count_params(model)["total"] == pytest.approx(p_ref, rel=0.05)
    assert sizing.flops_per_token(fg, SEQ) == pytest.approx(f_ref, rel=1e-3)
    assert sizing.count_params(fg)["total"] == pytest.approx(p_ref, rel=1e-3)


@pytest.mark.parametrize("E", [8, 32, 256])
def test_param_matched_2404_15045(E):
    """Same E and k, d' = (E n d d_ff - 2d^2) / (E n d/h): total parameters equal, expert FLOPs ~h x."""
    dense = _paper_dense()
    ref = matching.point("smoe", dense, E, top_k=1).model
    model, rep = matching.point("mhmoe", dense, E, h=4, mode="params", top_k=1)
    exact = (E * 2 * 768 * 3072 - 2 * 768 ** 2) / (E * 2 * 192)
    assert model.moe.num_experts == E and model.moe.top_k == 1 and model.moe.num_heads == 4
    assert abs(model.moe.expert_hidden_size - exact) <= 4 and model.moe.expert_hidden_size % 8 == 0
    assert sizing.count_params(model)["total"] == pytest.approx(sizing.count_params(ref)["total"], rel=1e-3)
    ratio = sizing.moe_layer_macs(model)["experts"] / sizing.moe_layer_macs(ref)["experts"]
    assert 3.8 < ratio < 4.0                                     # ~h x the expert FLOPs
    if E == 8:
        assert model.moe.expert_hidden_size == 11904             # (37748736 - 1179648) / 3072


PRESETS = {
    "paper_xmoe_8e.yaml": ("smoe", 8, 1, "params"), "paper_xmoe_32e.yaml": ("smoe", 32, 1, "params"),
    "paper_mhmoe_8e.yaml": ("mhmoe", 8, 4, "params"), "paper_mhmoe_32e.yaml": ("mhmoe", 32, 4, "params"),
    "flops_matched_smoe_8e.yaml": ("smoe", 8, 1, "flops"),
    "flops_matched_finegrained_16e.yaml": ("finegrained", 8, 1, "flops"),
    "flops_matched_mhmoe_h2.yaml": ("mhmoe", 8, 2, "flops"), "flops_matched_mhmoe_h3.yaml": ("mhmoe", 8, 3, "flops"),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_the_matched_models(name):
    kind, E, h, mode = PRESETS[name]
    d = load_config_file(resolve_preset(name))
    RunConfig.from_dict(d).validate(8)                           # one 8-GPU node, EP 8
    model = model_config_from_dict(d["model"]).validate()
    dense_dict = {k: v for k, v in d["model"].items() if k != "moe"}
    dense = model_config_from_dict(dense_dict)
    want = matching.point(kind, dense, E, h=h, mode=mode, top_k=1, moe_defaults=d["model"]["moe"]).model
    assert model == want
    t = d["train"]
    if name.startswith("paper_"):
        assert (model.num_layers, model.hidden_size, model.num_attention_heads, model.ffn_hidden_size) == \
            (12, 768, 12, 3072)
        assert model.moe.moe_every == 2 and model.moe.aux_loss_coef == 0.01 and model.moe.gate == "xmoe"
        assert (t["adam_beta1"], t["adam_beta2"], t["lr"], t["warmup_steps"]) == (0.9, 0.98, 5e-4, 10000)


def test_paper_presets_parameter_parity():
    """The paper compares X-MoE and MH-MoE at equal parameters: within 5% (here 0.01%) at 8 and 32 experts;
    Dense has no experts. Counted with sizing.py at the GPT-4 (cl100k) vocabulary of the preset."""
    counts = {}
    for f in ("paper_dense", "paper_xmoe_8e", "paper_mhmoe_8e", "paper_xmoe_32e", "paper_mhmoe_32e"):
        d = load_config_file(resolve_preset(f + ".yaml"))
        counts[f] = sizing.count_params(model_config_from_dict(d["model"]))["total"]
    for E in (8, 32):
        assert counts[f"paper_mhmoe_{E}e"] == pytest.approx(counts[f"paper_xmoe_{E}e"], rel=0.05)
    assert counts["paper_dense"] < counts["paper_xmoe_8e"] < counts["paper_xmoe_32e"]
    assert counts["paper_dense"] == pytest.approx(163.6e6, rel=0.01)   # 12 x 7.1M + 77M embedding (V=100277)
