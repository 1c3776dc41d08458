"""tools/export_hf.py: trained checkpoints where transformers (and so lm-eval-harness) can load them, offline.

- mhmoe format, from the TP=2 x EP=2 run of test_export: `AutoModelForCausalLM.from_pretrained(folder,
  trust_remote_code=True)` loads it and its logits equal the trained model's gathered over TP within atol/rtol
  1e-5 (fp32; only the reduction order differs); AutoTokenizer gives the run's ids; `generate` (greedy) gives
  tools/generate.py's tokens and feeds one token per step after the prompt (the KV cache is used);
- gpt2 format, from a dense model trained at TP=2: a plain GPT2LMHeadModel (no remote code) whose logits
  equal ours within atol/rtol 1e-5; a model that does not map onto GPT-2 is refused with the reasons.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.distributed import run_workers
from tests.reliability.test_export import TOKENS, _trained_logits, exported  # noqa: F401 (fixture)
from tests.reliability.test_reshard import load_tool
from tests.runtime.test_train_launch import byte_data, common_args, finish, torchrun  # noqa: F401 (fixture)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_folder(exported, tmp_path_factory):  # noqa: F811
    out = str(tmp_path_factory.mktemp("hf") / "mhmoe")
    assert load_tool("export_hf").main(["--input", exported["ckpt"], "--output", out, "--quiet"]) == 0
    return out


def test_transformers_loads_the_export_and_its_logits_equal_the_trained_model(exported, hf_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_mhmoe.runtime.consolidate import resolve_folder
    want = run_workers(_trained_logits, 2, resolve_folder(exported["ckpt"]))[0]
    model = AutoModelForCausalLM.from_pretrained(hf_folder, trust_remote_code=True).eval()
    with torch.no_grad():
        got = model(TOKENS).logits
    print(f"transformers vs trained (TP=2, EP=2) logits: max abs difference {float((got - want).abs().max()):.3g}")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    tok = AutoTokenizer.from_pretrained(hf_folder, trust_remote_code=True)
    text = "def f(x):\n    return x + 1  # é"
    assert tok(text).input_ids == list(text.encode("utf-8"))  # the run's byte tokenizer
    assert tok.decode(list(text.encode("utf-8"))) == text


def test_transformers_generate_uses_the_cache_and_matches_our_generator(exported, hf_folder):
    from transformers import AutoModelForCausalLM
    gen = load_tool("generate")
    ours, _ = gen.load_model(exported["out"])
    model = AutoModelForCausalLM.from_pretrained(hf_folder, trust_remote_code=True).eval()
    fed = []
    real = model.forward
    model.forward = lambda input_ids=None, **kw: (fed.append(input_ids.shape[1]), real(input_ids, **kw))[1]
    prompt = [100, 101, 102, 103]
    out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    assert out[0, len(prompt):].tolist() == gen.generate(ours, prompt, 8, greedy=True)
    assert fed[0] == len(prompt) and set(fed[1:]) == {1}, fed


def test_dense_model_exports_as_plain_gpt2(byte_data, tmp_path):  # noqa: F811
    from transformers import GPT2LMHeadModel
    run = str(tmp_path / "dense")
    finish(torchrun(2, common_args(byte_data, run) + [
        "--model.moe=null", "--parallel.tp=2", "--parallel.ep=1", "--train.train_steps=2", "--train.warmup_steps=1",
        "--train.eval_interval=100", "--train.eval_iters=1", "--train.lr=3e-2"]))
    ckpt = os.path.join(run, "checkpoints")
    ours_dir, gpt2_dir = str(tmp_path / "ours"), str(tmp_path / "gpt2")
    assert load_tool("export_checkpoint").main(["--input", ckpt, "--output", ours_dir, "--quiet"]) == 0
    assert load_tool("export_hf").main(["--input", ours_dir, "--output", gpt2_dir, "--format", "gpt2",
                                        "--quiet"]) == 0
    ours, _ = load_tool("generate").load_model(ours_dir)
    gpt2 = GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    with torch.no_grad():
        want = ours(TOKENS).logits[..., :ours.config.vocab_size]
        got = gpt2(TOKENS).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_gpt2_format_refuses_models_it_cannot_represent(exported, tmp_path, capsys):
    code = load_tool("export_hf").main(["--input", exported["out"], "--output", str(tmp_path / "x"),
                                        "--format", "gpt2"])
    err = capsys.readouterr().err
    assert code != 0 and "does not map exactly onto GPT-2" in err and "MoE layers" in err
    assert not os.path.exists(tmp_path / "x")
