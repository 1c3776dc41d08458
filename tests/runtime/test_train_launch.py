"""The training entry point end to end, launched as users launch it (torchrun, several processes).

- an interrupted run (stopped by exit_interval after a checkpoint) resumes with exactly the losses of an
  uninterrupted run (CPU fp32: bit-identical floats in metrics.jsonl), aux-loss-free bias balancing on;
- a 2-"node" launch (two torchrun invocations on loopback, --nnodes 2) trains.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_mhmoe.data.corpus import build_corpus
from megatron_mhmoe.data.preprocess import PreprocessConfig, output_prefix_for, preprocess
from tests.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("data")
    corpus = str(d / "corpus.jsonl")
    build_corpus(corpus, max_mb=0.3)
    preprocess(PreprocessConfig(inputs=[corpus], output_prefix=str(d / "c"), tokenizer_type="byte", append_eod=True),
               log=lambda m: None)
    return output_prefix_for(str(d / "c"), "text")


def common_args(data: str, run_dir: str) -> list[str]:
    return [f"--run_dir={run_dir}", f"--data.data_path=[{data}]", "--model.vocab_size=300",
            "--model.hidden_size=32", "--model.num_layers=2", "--model.ffn_hidden_size=64", "--model.max_seq_len=32",
            "--model.moe.num_experts=4", "--model.moe.expert_hidden_size=32", "--model.moe.num_heads=2",
            "--train.seq_len=32", "--train.micro_batch_size=2", "--train.train_steps=8", "--train.warmup_steps=2",
            "--train.log_interval=1", "--train.eval_interval=4", "--train.eval_iters=2", "--train.save_interval=100",
            "--train.zero_stage=1", "--wandb.mode=disabled", "--data.split=90,10,0"]


def torchrun(nproc: int, args: list[str], extra: list[str] | None = None, timeout: int = 300):
    # Under the host-tensor guard: a batch or collective tensor that skips the engine's device fails here as
    # it would on a GPU (parallel/host_tensor.py), through training, evaluation, save and resume.
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled", MHMOE_DEVICE_GUARD="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    launcher += extra or ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return subprocess.Popen(launcher + ["-m", "megatron_mhmoe.train"] + args, cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout: int = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def losses(run_dir: str) -> dict[int, float]:
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec:
                out[rec["step"]] = rec["loss"]
    return out


def test_interrupted_run_resumes_exactly(byte_data, tmp_path):
    full, parts = str(tmp_path / "full"), str(tmp_path / "parts")
    # With the aux-loss-free bias on: it changes the routing every step, so a bias lost or reset on resume
    # changes the later losses.
    on = ["--parallel.ep=2", "--model.moe.bias_update_rate=0.02"]
    finish(torchrun(2, common_args(byte_data, full) + on))
    out1 = finish(torchrun(2, common_args(byte_data, parts) + on + ["--train.exit_interval=3"]))
    assert "exit_interval 3 reached at step 3" in out1
    out2 = finish(torchrun(2, common_args(byte_data, parts) + on))
    assert "resumed from" in out2 and "at step 3" in out2
    want, got = losses(full), losses(parts)
    assert sorted(want) == list(range(1, 9)) and sorted(got) == list(range(1, 9))
    assert [got[s] for s in range(4, 9)] == [want[s] for s in range(4, 9)]  # exact, not approximate
    assert want[8] < want[1]
    assert os.path.exists(os.path.join(parts, "checkpoints", "latest"))


def test_two_node_launch_on_loopback(byte_data, tmp_path):
    run_dir = str(tmp_path / "twonode")
    port = str(free_port())
    args = common_args(byte_data, run_dir) + ["--parallel.ep=2", "--train.train_steps=3"]
    nodes = [torchrun(1, args, ["--nnodes", "2", "--node_rank", str(r), "--master_addr", "127.0.0.1",
                                "--master_port", port]) for r in (0, 1)]
    outs = [finish(p) for p in nodes]
    assert "layout: world 2 = TP 1 x DP 2, MoE EP 2 x EDP 1" in outs[0]  # the run summary
    assert sorted(losses(run_dir)) == [1, 2, 3]
