"""tools/export_checkpoint.py and tools/generate.py after a tiny 2-rank (TP=2, EP=2, ZeRO-1) run.

- the exported single-process model's logits equal the trained TP/EP model's logits gathered over TP
  (tolerance atol 1e-5, rel 1e-5; fp32, only the reduction order differs), with aux-loss-free balancing on:
  the trained bias (a buffer, not a parameter) is exported too;
- generate.py: greedy output is deterministic, a seeded sample is reproducible, the CLI runs;
- a planted pickle whose unpickling would create a file is refused by the export and reshard tools
  (weights_only loading), and the file is not created.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_mhmoe.checkpoint.consolidate import run_checkpoint_tool
from megatron_mhmoe.checkpoint.reshard import reshard
from megatron_mhmoe.evaluation import generate as gen
from megatron_mhmoe.export.native import export
from tests.distributed import run_workers
from tests.runtime.test_train_launch import ROOT, byte_data, common_args, finish, torchrun  # noqa: F401 (fixture)


def args(data: str, run_dir: str) -> list[str]:
    """The launch tests' tiny model at TP=2 x EP=2, 3 steps (later overrides win), aux-loss-free bias on (after an
    odd number of steps: on this tiny batch the sign rule flips back and forth, so after 2 it is 0 again)."""
    return common_args(data, run_dir) + [
        "--model.num_attention_heads=4", "--model.moe.expert_hidden_size=16", "--train.seq_len=16",
        "--train.train_steps=3", "--train.warmup_steps=1", "--train.eval_interval=100", "--train.eval_iters=1",
        "--parallel.tp=2", "--parallel.ep=2", "--train.lr=3e-2", "--model.moe.bias_update_rate=0.05"]


@pytest.fixture(scope="module")
def exported(byte_data, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("export")
    run = str(d / "run")
    finish(torchrun(2, args(byte_data, run)))
    ckpt = os.path.join(run, "checkpoints")
    out = str(d / "exported")
    export(ckpt, out, log=lambda m: None)
    return {"ckpt": ckpt, "out": out, "dir": d}


TOKENS = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))


def _trained_logits(rank: int, world: int, folder: str) -> torch.Tensor:
    from megatron_mhmoe.config import model_config_from_dict
    from megatron_mhmoe.model.gpt import GPTModel
    from megatron_mhmoe.parallel import comm
    from megatron_mhmoe.parallel.context import ParallelContext
    from megatron_mhmoe.runtime.engine import checkpoint_safe_globals
    with open(os.path.join(folder, "manifest.json")) as f:
        cfg = model_config_from_dict(json.load(f)["config"]["model"])
    ctx = ParallelContext.from_world(2, 2)
    model = GPTModel(cfg, ctx)
    with torch.serialization.safe_globals(checkpoint_safe_globals()):
        state = torch.load(os.path.join(folder, f"rank_{rank:05d}.pt"), weights_only=True)
    model.load_state_dict(state["model"])
    model.eval()
    with torch.no_grad():
        logits = model(TOKENS).logits  # [b, s, V_local]
    return comm.all_gather(logits, -1, ctx.tp_group)[..., :cfg.vocab_size]


def test_exported_logits_equal_trained_logits(exported):
    from megatron_mhmoe.checkpoint.consolidate import resolve_folder
    folder = resolve_folder(exported["ckpt"])
    want = run_workers(_trained_logits, 2, folder)[0]
    model, info = gen.load_model(exported["out"])
    assert info["tokenizer"] == {"type": "byte"} and info["step"] == 3
    with torch.no_grad():
        got = model(TOKENS).logits[..., :model.config.vocab_size]
    diff = float((got - want).abs().max())
    print(f"exported vs trained (TP=2, EP=2) logits: max abs difference {diff:.3g}")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    from safetensors.torch import load_file
    biases = {k: v for k, v in load_file(os.path.join(exported["out"], "model.safetensors")).items()
              if k.endswith("expert_bias.value")}
    assert biases and all(v.abs().max() > 0 for v in biases.values())  # the trained bias, not a fresh zero one
    with torch.no_grad():  # and it matters: without it the exported model routes (and predicts) otherwise
        for m in model.modules():
            if getattr(m, "expert_bias", None) is not None:
                m.expert_bias.value.zero_()
        unbiased = model(TOKENS).logits[..., :model.config.vocab_size]
    assert float((unbiased - want).abs().max()) > 1e-3


def _cli(*a: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    return subprocess.run([sys.executable, *a], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_generate_greedy_is_deterministic_and_cli_runs(exported):
    model, info = gen.load_model(exported["out"])
    a = gen.generate(model, [100, 101, 102], 12, greedy=True, seed=1)
    b = gen.generate(model, [100, 101, 102], 12, greedy=True, seed=2)
    assert a == b and len(a) == 12
    s1 = gen.generate(model, [100], 12, greedy=False, temperature=1.0, top_k=20, seed=7)
    s2 = gen.generate(model, [100], 12, greedy=False, temperature=1.0, top_k=20, seed=7)
    assert s1 == s2
    r1 = _cli("tools/generate.py", "--model", exported["out"], "--prompt", "def ", "--max-new-tokens", "8",
              "--greedy", "--ids")
    r2 = _cli("tools/generate.py", "--model", exported["out"], "--prompt", "def ", "--max-new-tokens", "8",
              "--greedy", "--ids")
    assert r1.returncode == 0, r1.stderr[-2000:]
    assert r1.stdout == r2.stdout and r1.stdout.startswith("def ") and "ids: [" in r1.stdout
    assert _cli("tools/generate.py", "--help").returncode == 0
    assert _cli("tools/export_checkpoint.py", "--help").returncode == 0


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickle_is_refused_by_tools(exported, tmp_path, capsys):
    marker = tmp_path / "pwned"
    folder = tmp_path / "ckpt" / "step_00000002"
    folder.mkdir(parents=True)
    rank_file = folder / "rank_00000.pt"
    torch.save({"model": _Evil(str(marker))}, rank_file)
    data = rank_file.read_bytes()
    manifest = {"format_version": 1, "step": 2, "time": 0.0,
                "layout": {"world_size": 1, "tp": 1, "ep": 1, "zero_stage": 0, "precision": "fp32"},
                "files": [{"file": "rank_00000.pt", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "ckpt" / "latest").write_text("step_00000002")
    quiet = lambda m: None  # noqa: E731
    exported_code = run_checkpoint_tool(lambda: export(str(tmp_path / "ckpt"), str(tmp_path / "out"), log=quiet),
                                        str(tmp_path / "ckpt"))
    reshard_code = run_checkpoint_tool(lambda: reshard(str(folder), str(tmp_path / "r"), 1, 1, 1, log=quiet),
                                       str(folder))
    err = capsys.readouterr().err
    assert exported_code == 3 and reshard_code == 3, err
    assert err.count("refusing to load") == 2
    assert not marker.exists()
    assert not (tmp_path / "out").exists() and not (tmp_path / "r").exists()


def test_export_shows_a_bar_on_a_terminal_and_lines_otherwise(exported, tmp_path):
    from tests.terminal import run_on_terminal
    cmd = [sys.executable, os.path.join(ROOT, "tools", "export_checkpoint.py"), "--input", exported["ckpt"],
           "--output", str(tmp_path / "tty"), "--force"]
    rc, shown = run_on_terminal(cmd, ROOT)
    assert rc == 0 and "reading step_" in shown and "2/2" in shown and "file" in shown, shown
    piped = _cli("tools/export_checkpoint.py", "--input", exported["ckpt"], "--output", str(tmp_path / "pipe"))
    assert piped.returncode == 0 and piped.stdout.count("sha256 ok") == 2 and "reading step_" not in piped.stderr
