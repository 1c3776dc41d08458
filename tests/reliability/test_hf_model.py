"""The exported transformers model (megatron_mhmoe/hf/modeling_mhmoe.py) behaves like a Hub model.

- Two implementations, one function: the folder's plain-torch forward equals GPTModel's within 1e-5 (fp32) on
  every model option (gates xmoe / softmax / sigmoid, k, gate scaling, balancing bias, group-limited routing,
  shared experts, heads, capacity, dense SwiGLU / RMSNorm / RoPE / untied), unpadded and left-padded with an
  attention mask, and (dropless options) token by token through the cache; and an exported folder loads and
  gives those logits in a process where megatron_mhmoe cannot be imported.
- Padding: a left-padded batch (transformers' tokenizer, padding_side='left') generates, greedily, the tokens
  of each prompt alone, with step logits within 1e-4, with and without the cache; so does tools/generate.py's
  generate_batch; generate() refuses right padding with a message that says to pad left, forward() takes it.
- Beam search with the cache (reordered) equals beam search without it.
- Past max_seq_len: every new token is the greedy choice of the model on the last max_seq_len tokens alone
  (positions 0 .. max_seq_len - 1), in generate() with and without the cache and in tools/generate.py, for a
  sequence longer than twice max_seq_len.
- output_hidden_states, return_dict=False and inputs_embeds work; output_attentions is refused.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_mhmoe.config import ModelConfig, MoEConfig, to_dict
from megatron_mhmoe.evaluation import generate as gen
from megatron_mhmoe.export.huggingface import export_hf
from megatron_mhmoe.model.gpt import GPTModel
from megatron_mhmoe.parallel.context import ParallelContext

transformers = pytest.importorskip("transformers")

VOCAB = 257  # the byte tokenizer's


def _cfg(moe: MoEConfig | None = None, **kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                max_seq_len=32, init_std=0.1)
    base.update(kw)
    return ModelConfig(moe=moe, **base)


def _moe(**kw) -> MoEConfig:
    base = dict(num_experts=4, top_k=2, num_heads=4, expert_hidden_size=16, moe_every=2)
    base.update(kw)
    return MoEConfig(**base)


# Every option of the single-device forward (layer 1 is MoE, layer 0 dense, unless moe_every=1).
OPTIONS = {
    "xmoe_h4_k2": _cfg(_moe()),
    "smoe_h1_k1_no_projection": _cfg(_moe(num_heads=1, head_projection=False, top_k=1)),
    "softmax_k1_scaled": _cfg(_moe(gate="softmax", top_k=1, num_heads=2, gate_scaling=2.5)),
    "softmax_k2_bias": _cfg(_moe(gate="softmax", num_heads=2, bias_update_rate=0.01)),
    "softmax_k2_quantile": _cfg(_moe(gate="softmax", num_heads=2, quantile_balancing=True, aux_loss_coef=0.0)),
    "sigmoid_k1_scaled": _cfg(_moe(gate="sigmoid", top_k=1, num_heads=2, gate_scaling=1.5)),
    "sigmoid_k3_bias_groups": _cfg(_moe(gate="sigmoid", num_experts=12, top_k=3, num_heads=2, route_groups=3,
                                        route_group_limit=2, bias_update_rate=0.01, gate_scaling=2.0)),
    "softmax_groups_h4": _cfg(_moe(gate="softmax", num_experts=8, route_groups=2, route_group_limit=1)),
    "shared_swiglu": _cfg(_moe(num_heads=2, num_shared_experts=2, shared_expert_hidden_size=8,
                               expert_activation="swiglu")),
    "capacity_drops": _cfg(_moe(num_heads=2, capacity_factor=0.5)),
    "dense_rope_rmsnorm_swiglu_untied": _cfg(None, position_embedding="rope", norm="rmsnorm", activation="swiglu",
                                             tie_embeddings=False),
    "moe_every_layer_rope": _cfg(_moe(num_heads=2, moe_every=1, capacity_factor=1.0), position_embedding="rope",
                                 norm="rmsnorm"),
}
IDS = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
PAD_MASK = torch.tensor([[0] * 4 + [1] * 8, [1] * 12, [0] * 9 + [1] * 3])  # rows 0 and 2 left-padded


def _ours(cfg: ModelConfig, seed: int = 3) -> GPTModel:
    model = GPTModel(cfg, ParallelContext.single_process(), seed=seed).eval()
    for layer in model.layers:  # a trained balancing bias is non-zero: give it values that change the choice
        bias = getattr(layer.ffn, "expert_bias", None)
        if bias is not None:
            bias.value.copy_(torch.randn(bias.value.shape, generator=torch.Generator().manual_seed(seed)) * 0.3)
    return model


def _hf_from(model: GPTModel):
    from megatron_mhmoe.hf.configuration_mhmoe import MHMoEGPTConfig
    from megatron_mhmoe.hf.modeling_mhmoe import MHMoEGPTForCausalLM
    hf = MHMoEGPTForCausalLM(MHMoEGPTConfig(mhmoe_model=to_dict(model.config), eos_token_id=256,
                                            pad_token_id=256)).eval()
    hf.model.load_state_dict(model.state_dict())
    return hf


def _logits(model: GPTModel, ids, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits[..., :model.config.vocab_size]


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_plain_torch_forward_equals_gptmodel_on_every_option(option):
    ours = _ours(OPTIONS[option])
    hf = _hf_from(ours)
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, _logits(ours, IDS), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hf(IDS, attention_mask=PAD_MASK).logits, _logits(ours, IDS, PAD_MASK),
                                   atol=1e-5, rtol=1e-5)
        if OPTIONS[option].moe is None or OPTIONS[option].moe.capacity_factor <= 0:  # a capacity sees one step
            out = hf(IDS[:, :8], attention_mask=PAD_MASK[:, :8], use_cache=True)  # prompt, then one token a step
            steps = [out.logits]
            for t in range(8, 12):
                out = hf(IDS[:, t:t + 1], attention_mask=PAD_MASK[:, :t + 1], use_cache=True,
                         **{"cache": out.cache} if hasattr(out, "cache") else {"past_key_values": out.past_key_values})
                steps.append(out.logits)
            torch.testing.assert_close(torch.cat(steps, 1), _logits(ours, IDS, PAD_MASK), atol=1e-5, rtol=1e-5)


def _export(model: GPTModel, folder: str) -> str:
    """model -> tools/export_checkpoint.py's format -> tools/export_hf.py's folder."""
    from safetensors.torch import save_file
    src = folder + "-src"
    os.makedirs(src)
    V = model.config.vocab_size
    full = {k: (v[:V] if k.endswith(("word_embeddings.weight", "lm_head.weight")) else v).contiguous()
            for k, v in model.state_dict().items()}
    save_file(full, os.path.join(src, "model.safetensors"))
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump({"model": to_dict(model.config), "step": 0, "tokenizer": {"type": "byte"}}, f)
    export_hf(src, folder, log=lambda m: None)
    return folder


BLOCKED_RUN = textwrap.dedent("""
    import importlib.abc, json, sys, torch
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "megatron_mhmoe":
                raise ImportError(f"{name} is blocked in this test")
    sys.meta_path.insert(0, Block())
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folders, ids, mask, out = json.loads(sys.argv[1])
    ids, mask, got = torch.tensor(ids), torch.tensor(mask), {}
    for name, folder in folders.items():
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        assert tok("ab").input_ids == [97, 98] and tok.padding_side == "left"
        with torch.no_grad():
            got[name] = (model(ids).logits, model(ids, attention_mask=mask).logits)
    assert not [m for m in sys.modules if m.startswith("megatron_mhmoe")]
    torch.save(got, out)
""")


@pytest.mark.slow
def test_export_folder_loads_where_megatron_mhmoe_cannot_be_imported(tmp_path):
    ours = {name: _ours(cfg) for name, cfg in OPTIONS.items()}
    folders = {name: _export(model, str(tmp_path / name)) for name, model in ours.items()}
    for folder in folders.values():
        for code in ("modeling_mhmoe.py", "configuration_mhmoe.py", "tokenization_mhmoe.py"):
            with open(os.path.join(folder, code)) as f:
                assert "import megatron_mhmoe" not in f.read() and "from megatron_mhmoe" not in f.read()
    out = str(tmp_path / "logits.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")  # the remote code is copied here, not to ~/.cache
    arg = json.dumps([folders, IDS.tolist(), PAD_MASK.tolist(), out])
    r = subprocess.run([sys.executable, "-c", BLOCKED_RUN, arg], cwd=str(tmp_path), env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(out)
    for name, model in ours.items():
        full, padded = got[name]
        torch.testing.assert_close(full, _logits(model, IDS), atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(padded, _logits(model, IDS, PAD_MASK), atol=1e-5, rtol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------ generation
# Learned positions: RoPE attention cannot tell a row whose positions are all shifted (left padding counted
# as positions) from the right one; a learned table can.
# max_seq_len 64: prompts + new tokens stay inside it (the cache is used) except where a test goes past it.
GEN_CFG = _cfg(_moe(num_heads=2), max_seq_len=64, init_std=0.3)
ROPE_CFG = _cfg(_moe(num_heads=2, gate="softmax"), max_seq_len=64, position_embedding="rope", init_std=0.3)


@pytest.fixture(scope="module")
def gen_model(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ours = _ours(GEN_CFG)
    folder = _export(ours, str(tmp_path_factory.mktemp("gen") / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    return ours, hf, AutoTokenizer.from_pretrained(folder, trust_remote_code=True)


PROMPTS = ["def f(", "import os, sys\n", "x"]


def _greedy(hf, use_cache, **enc):
    with torch.no_grad():
        out = hf.generate(**enc, max_new_tokens=8, do_sample=False, use_cache=use_cache, eos_token_id=None,
                          output_logits=True, return_dict_in_generate=True)
    new = out.sequences[:, enc["input_ids"].shape[1]:]
    return new, torch.stack(out.logits, dim=1)  # (b, 8), (b, 8, V)


@pytest.mark.slow
@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_generates_what_each_prompt_generates_alone(gen_model, use_cache):
    ours, hf, tok = gen_model
    assert tok.padding_side == "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    assert (enc["attention_mask"] == 0).any()
    batch_new, batch_logits = _greedy(hf, use_cache, **enc)
    ours_batch = gen.generate_batch(ours, [tok(p).input_ids for p in PROMPTS], 8, use_cache=use_cache)
    for i, prompt in enumerate(PROMPTS):
        alone_new, alone_logits = _greedy(hf, use_cache, **tok([prompt], return_tensors="pt"))
        assert batch_new[i].tolist() == alone_new[0].tolist()
        torch.testing.assert_close(batch_logits[i], alone_logits[0], atol=1e-4, rtol=0)
        assert ours_batch[i] == alone_new[0].tolist() == gen.generate(ours, tok(prompt).input_ids, 8)
    assert len(set(batch_new.flatten().tolist())) > 4  # the model's choices vary: equality says something


def test_right_padding_refused_by_generate_taken_by_forward(gen_model):
    ours, hf, tok = gen_model
    tok.padding_side = "right"
    try:
        enc = tok(PROMPTS, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "left"
    with pytest.raises(ValueError, match=r"generate\(\) needs left padding: set tokenizer.padding_side = 'left'"):
        hf.generate(**enc, max_new_tokens=2)
    with torch.no_grad():
        logits = hf(**enc).logits
        for i, prompt in enumerate(PROMPTS):
            n = len(tok(prompt).input_ids)
            alone = hf(**tok([prompt], return_tensors="pt")).logits[0]
            torch.testing.assert_close(logits[i, :n], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_beam_search_with_the_cache_equals_beam_search_without(gen_model):
    ours, hf, tok = gen_model
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    runs = {}
    for use_cache in (True, False):
        with torch.no_grad():
            runs[use_cache] = hf.generate(**enc, max_new_tokens=8, num_beams=3, num_return_sequences=2,
                                          do_sample=False, use_cache=use_cache, eos_token_id=None,
                                          output_scores=True, return_dict_in_generate=True)
    assert runs[True].sequences.tolist() == runs[False].sequences.tolist()
    torch.testing.assert_close(runs[True].sequences_scores, runs[False].sequences_scores, atol=1e-4, rtol=0)
    greedy = hf.generate(**enc, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert runs[True].sequences[::2].tolist() != greedy.tolist()  # beam search chose otherwise somewhere


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [GEN_CFG, ROPE_CFG], ids=["learned", "rope"])
def test_past_max_seq_len_each_token_is_the_models_choice_on_the_last_window(cfg):
    import dataclasses
    cfg = dataclasses.replace(cfg, max_seq_len=8)  # short: every step past it recomputes the window
    ours = _ours(cfg)
    hf = _hf_from(ours)
    L = cfg.max_seq_len
    prompt = torch.randint(0, VOCAB, (1, L + 4), generator=torch.Generator().manual_seed(1))  # longer than L
    n_new = L + 2  # prompt + new = 3L + 6 - L > 2L
    seqs = {}
    for use_cache in (True, False):
        with torch.no_grad():
            seqs[use_cache] = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new,
                                          do_sample=False, use_cache=use_cache, eos_token_id=None)[0].tolist()
    assert len(seqs[True]) > 2 * L and seqs[True] == seqs[False]
    # The rule itself: token t is the argmax of the model on tokens t-L .. t-1 at positions 0 .. L-1.
    seq = seqs[True]
    for t in range(prompt.shape[1], len(seq)):
        window = torch.tensor([seq[max(0, t - L):t]])
        assert int(_logits(ours, window)[0, -1].argmax()) == seq[t], t
    for use_cache in (True, False):
        assert gen.generate(ours, prompt[0].tolist(), n_new, use_cache=use_cache) == seq[prompt.shape[1]:]
    with pytest.raises(ValueError, match=f"{L + 4} > max_seq_len {L}: the model was trained on at most"):
        hf(prompt)


def test_hidden_states_tuples_and_inputs_embeds(gen_model):
    ours, hf, tok = gen_model
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = hf(**enc, output_hidden_states=True)
        hidden = out.hidden_states
        assert len(hidden) == ours.config.num_layers + 1
        positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        torch.testing.assert_close(hidden[0], hf.get_input_embeddings()(enc["input_ids"])
                                   + hf.model.embedding.position_embeddings[positions])
        weight = hf.get_input_embeddings().weight
        torch.testing.assert_close(hidden[-1] @ weight.t()[:, :VOCAB], out.logits, atol=1e-5, rtol=1e-5)
        as_tuple = hf(**enc, return_dict=False)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.logits)
        embeds = hf.get_input_embeddings()(enc["input_ids"])  # the positions are added by the model
        torch.testing.assert_close(hf(inputs_embeds=embeds, attention_mask=enc["attention_mask"]).logits,
                                   out.logits, atol=1e-6, rtol=1e-6)
        short = tok(PROMPTS[::2], return_tensors="pt", padding=True)
        by_ids = hf.generate(**short, max_new_tokens=6, do_sample=False, eos_token_id=None)
        short_embeds = hf.get_input_embeddings()(short["input_ids"])
        by_embeds = hf.generate(inputs_embeds=short_embeds, attention_mask=short["attention_mask"], max_new_tokens=6,
                                do_sample=False, eos_token_id=None)
        assert by_embeds.tolist() == by_ids[:, short["input_ids"].shape[1]:].tolist()
        long_embeds = hf.get_input_embeddings()(torch.randint(0, VOCAB, (1, 63)))  # max_seq_len 64 - 1
        with pytest.raises(ValueError, match="generate\\(inputs_embeds=...\\) cannot go past max_seq_len 64"):
            hf.generate(inputs_embeds=long_embeds, max_new_tokens=3, do_sample=False, eos_token_id=None)
    with pytest.raises(ValueError, match="output_attentions=True is not supported"):
        hf(**enc, output_attentions=True)


def test_pipeline_save_reload_bf16_device_map_and_labels(gen_model, tmp_path):
    from transformers import AutoModelForCausalLM, pipeline
    ours, hf, tok = gen_model
    enc = tok(["def f("], return_tensors="pt")
    with torch.no_grad():
        want = hf.generate(**enc, max_new_tokens=5, do_sample=False, eos_token_id=None)
        no_mask = hf.generate(enc["input_ids"], max_new_tokens=5, do_sample=False, eos_token_id=None,
                              output_logits=True, return_dict_in_generate=True)
        assert no_mask.sequences.tolist() == want.tolist()  # cached steps without a mask see the whole cache
        torch.testing.assert_close(torch.stack(no_mask.logits, 1)[0], hf(want[:, :-1]).logits[0, -5:],
                                   atol=1e-5, rtol=1e-5)
        text = pipeline("text-generation", model=hf, tokenizer=tok)("def f(", max_new_tokens=5, do_sample=False,
                                                                    eos_token_id=None)[0]["generated_text"]
        assert text == tok.decode(want[0])
        hf.save_pretrained(tmp_path / "saved")
        tok.save_pretrained(tmp_path / "saved")
        for kwargs in ({}, {"device_map": "auto"}):
            again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", trust_remote_code=True, **kwargs)
            assert torch.equal(again.eval()(**enc).logits, hf(**enc).logits)
        half = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", trust_remote_code=True,
                                                    dtype=torch.bfloat16).eval()
        logits16 = half(**enc).logits
        assert logits16.dtype == torch.bfloat16 and torch.isfinite(logits16).all()
        out = hf(**enc, labels=enc["input_ids"])
        manual = torch.nn.functional.cross_entropy(out.logits[0, :-1], enc["input_ids"][0, 1:])
        torch.testing.assert_close(out.loss, manual)
