"""Quantile balancing's bias through the reshard and export tools (the sign rule's runs: test_reshard, test_export).

One 2-rank run (TP=2 x EP=2, ZeRO-1) with moe.quantile_balancing on, stopped at step 3 of 5 and continued:
- the step-3 checkpoint resharded to one process (ZeRO-0) continues with the same losses (rel 2e-5, fp32) and,
  after steps 4-5 (two micro-batches a step there), has exactly the 2-rank run's bias: the histograms are
  integer counts summed over the same sub-tokens, so the bias is bit-identical;
- the step-5 checkpoint exported (our format and Hugging Face) gives the trained model's logits within 1e-5,
  and those logits change when the bias is zeroed (the export carries it).
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from megatron_mhmoe.checkpoint.reshard import reshard
from megatron_mhmoe.evaluation.generate import load_model
from megatron_mhmoe.export.huggingface import export_hf
from megatron_mhmoe.export.native import export
from tests.distributed import run_workers
from tests.reliability.test_export import TOKENS, _trained_logits
from tests.reliability.test_reshard import assert_same_bias_everywhere, rank_biases, rel, run_args
from tests.runtime.test_train_launch import byte_data, finish, losses, torchrun  # noqa: F401 (fixture)

QUANTILE = ["--model.moe.bias_update_rate=0", "--model.moe.quantile_balancing=true", "--train.lr=3e-2"]


@pytest.fixture(scope="module")
def quantile_run(byte_data, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("quantile")
    run = str(d / "a")
    out = finish(torchrun(2, run_args(byte_data, run, 2, 2, 1, QUANTILE + ["--train.exit_interval=3"])))
    assert "exit_interval 3 reached at step 3" in out
    step3 = str(d / "step3")
    shutil.copytree(os.path.join(run, "checkpoints", "step_00000003"), step3)
    finish(torchrun(2, run_args(byte_data, run, 2, 2, 1, QUANTILE)))
    return {"dir": d, "data": byte_data, "step3": step3, "want": losses(run),
            "step5": os.path.join(run, "checkpoints", "step_00000005")}


def test_resharded_quantile_run_continues_with_the_same_losses_and_bias(quantile_run):
    q = quantile_run
    run = str(q["dir"] / "w1")
    save_dir = os.path.join(run, "checkpoints")
    reshard(q["step3"], save_dir, 1, 1, 1, 0, log=lambda m: None)
    finish(torchrun(1, run_args(q["data"], run, 1, 1, 0, QUANTILE)))
    got = losses(run)
    assert sorted(got) == [4, 5]
    assert max(rel(got[s], q["want"][s]) for s in (4, 5)) < 2e-5, (got, q["want"])
    want_bias = rank_biases(q["step5"])
    assert_same_bias_everywhere(want_bias, want_bias[0], "2-rank run, step 5")
    assert_same_bias_everywhere(rank_biases(os.path.join(save_dir, "step_00000005")), want_bias[0],
                                "resharded to one process, after steps 4-5")
    step3_bias = rank_biases(q["step3"])[0]
    assert any(not torch.equal(step3_bias[k], want_bias[0][k]) for k in step3_bias)  # it is set every step


def test_exported_quantile_model_carries_the_bias(quantile_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    q = quantile_run
    want = run_workers(_trained_logits, 2, q["step5"])[0]
    ours_dir, hf_dir = str(tmp_path / "ours"), str(tmp_path / "hf")
    export(q["step5"], ours_dir, log=lambda m: None)
    ours, _ = load_model(ours_dir)
    with torch.no_grad():
        got = ours(TOKENS).logits[..., :want.shape[-1]]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    export_hf(q["step5"], hf_dir, log=lambda m: None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(TOKENS).logits, want, atol=1e-5, rtol=1e-5)
        biases = [b for name, b in hf.named_buffers() if name.endswith("expert_bias.value")]
        assert biases and any(b.abs().sum() > 0 for b in biases)
        for b in biases:
            b.zero_()
        assert not torch.allclose(hf(TOKENS).logits, want, atol=1e-4)  # the bias changes the routing here
