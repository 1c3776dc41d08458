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
import subprocess
import sys

import pytest
import torch

from megatron_mhmoe.evaluation import generate as gen
from megatron_mhmoe.export.huggingface import export_hf
from megatron_mhmoe.export.native import export
from tests.distributed import run_workers
from tests.reliability.test_export import TOKENS, _trained_logits, exported  # noqa: F401 (fixture)
from tests.runtime.test_train_launch import ROOT, byte_data, common_args, finish, torchrun  # noqa: F401 (fixture)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_folder(exported, tmp_path_factory):  # noqa: F811
    out = str(tmp_path_factory.mktemp("hf") / "mhmoe")
    export_hf(exported["ckpt"], out, log=lambda m: None)
    return out


def test_transformers_loads_the_export_and_its_logits_equal_the_trained_model(exported, hf_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_mhmoe.checkpoint.consolidate import resolve_folder
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
    export(ckpt, ours_dir, log=lambda m: None)
    export_hf(ours_dir, gpt2_dir, fmt="gpt2", log=lambda m: None)
    ours, _ = gen.load_model(ours_dir)
    gpt2 = GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    with torch.no_grad():
        want = ours(TOKENS).logits[..., :ours.config.vocab_size]
        got = gpt2(TOKENS).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_gpt2_format_refuses_models_it_cannot_represent(exported, tmp_path):
    """The command: tools/export_hf.py exits 2 with one error line naming why, and writes nothing."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "export_hf.py"), "--input", exported["out"],
                        "--output", str(tmp_path / "x"), "--format", "gpt2"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "does not map exactly onto GPT-2" in r.stderr and "MoE layers" in r.stderr
    assert os.listdir(tmp_path) == []  # no output folder, no temporary
