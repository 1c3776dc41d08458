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


@pytest.mark.parametrize("mode,h", [("flops", 2), ("flops", 3), ("params", 2), ("params", 4)])
def test_shared_kinds_are_matched_like_the_plain_pair(mode, h):
    """'smoe+shared' = 'smoe' with one shared expert of the routed shape (d -> d_ff -> d); 'mhmoe+shared' is
    sized against it by the same matching with E + 1 and k + 1 (the shared expert is one more always-chosen
    expert on both sides): equal FLOPs (flops mode) and parameters, within the roundings."""
    dense, d, n, d_ff = _ff_dense(), 768, 3, 2048
    ref = matching.point("smoe+shared", dense, 8, top_k=1).model
    plain = matching.point("smoe", dense, 8, top_k=1).model
    assert ref.moe.num_shared_experts == 1 and plain.moe.num_shared_experts == 0
    assert sizing.count_params(ref)["total"] - sizing.count_params(plain)["total"] == 6 * n * d * d_ff  # 6 MoE layers
    model, rep = matching.point("mhmoe+shared", dense, 8, h=h, mode=mode, top_k=1, expert_multiple=1)
    m = model.moe
    assert m.num_shared_experts == 1 and m.shared_expert_hidden_size == 0 and m.num_heads == h
    if mode == "flops":
        # 2d^2 + n d d' (k' + 1) = n d d_ff (k + 1), k' = h
        assert rep["d_prime_exact"] == pytest.approx((n * d * d_ff * 2 - 2 * d * d) / (n * d * (h + 1)))
        e_exact = (9 * n * d * d_ff - 2 * d * d) / (n * (d // h) * m.expert_hidden_size) - 1
        assert rep["E_prime_exact"] == pytest.approx(e_exact)
        assert sizing.flops_per_token(model, SEQ) == pytest.approx(sizing.flops_per_token(ref, SEQ), rel=5e-3)
        assert sizing.count_params(model)["total"] == pytest.approx(sizing.count_params(ref)["total"], rel=0.01)
    else:
        assert m.num_experts == 8 and m.top_k == 1
        assert rep["d_prime_exact"] == pytest.approx((9 * n * d * d_ff - 2 * d * d) / (9 * n * (d // h)))
        assert sizing.count_params(model)["total"] == pytest.approx(sizing.count_params(ref)["total"], rel=1e-3)
    # the plain kinds keep no shared expert whatever num_shared_experts says
    plain_mh = matching.point("mhmoe", dense, 8, h=h, mode=mode, top_k=1, num_shared_experts=2).model
    assert plain_mh.moe.num_shared_experts == 0


def test_shared_kinds_need_a_shared_expert():
    with pytest.raises(ValueError, match="num_shared_experts"):
        matching.point("smoe+shared", _ff_dense(), 8, top_k=1, num_shared_experts=0)


def test_sweep_plans_the_shared_kinds():
    from megatron_mhmoe.scaling.plan import build_plan
    from megatron_mhmoe.scaling.spec import load_sweep
    spec, base = load_sweep("activation_probe", ["sweep.kinds=[smoe+shared, mhmoe+shared]", "sweep.seeds=[1]",
                                                 "sweep.modes=[params, flops]", "sweep.num_shared_experts=2",
                                                 "sweep.vary={}"])
    runs = {r.name: r for r in build_plan(spec, base)}
    assert sorted(runs) == ["mhmoe+shared-h4-flops-E64-s1", "mhmoe+shared-h4-params-E64-s1", "smoe+shared-E64-s1"]
    assert all(r.model.moe.num_shared_experts == 2 for r in runs.values())
    ref = runs["smoe+shared-E64-s1"].model
    for mode in ("params", "flops"):
        r = runs[f"mhmoe+shared-h4-{mode}-E64-s1"]
        assert r.kind == "mhmoe+shared" and "match-" + mode in r.tags
        assert r.model == matching.point("mhmoe+shared", matching.dense_reference(base["model"])[0], 64, h=4,
                                         mode=mode, top_k=spec.top_k, moe_every=spec.moe_every, gate=spec.gate,
                                         moe_defaults=base["model"].get("moe"), num_shared_experts=2).model
        assert sizing.count_params(r.model)["total"] == pytest.approx(sizing.count_params(ref)["total"], rel=0.05)
