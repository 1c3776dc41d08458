"""What docs/training-and-launch.md says the program reports, checked against the program: every value its
"Each metrics row has" paragraph names is a key of metrics.jsonl after a short run (a value the page adds
without a key here fails); the console of that run is the page's "What the console shows" (a 7-line summary,
step lines within 120 columns ending in the ETA, the full config in <run_dir>/config.json, and one line for a
relaunch with nothing to train); and a data_path that is a folder holding a dataset gets a message naming the
dataset and the value to pass.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

from tests.runtime.test_train_launch import ROOT, byte_data, common_args  # noqa: F401

DOC = os.path.join("docs", "training-and-launch.md")
EXPERTS, LAYERS, MOE_EVERY = 4, 2, 2  # common_args' model; moe_every 2: one MoE layer
# docs name -> (metrics.jsonl keys, None or why a CPU fp32 run does not log it).
NAMES = {
    "loss": (["loss"], None),
    "lm/aux/z loss": (["lm_loss", "aux_loss", "z_loss"], None),
    "lr": (["lr"], None),
    "grad norm": (["grad_norm"], None),
    "loss scale": (["loss_scale"], "fp16 only"),
    "tokens/s": (["tokens_per_s"], None),
    "step time": (["step_time_s"], None),
    "time in the all-to-all": (["all_to_all_s"], None),
    "TFLOP/s": (["tflops"], None),
    "MFU on known GPUs": (["mfu"], "known GPUs only"),
    "expert activation ratio": (["moe/activation_ratio"], None),
    "divergence": (["moe/divergence"], None),
    "dropped fraction": (["moe/dropped_fraction"], None),
    "per-layer tokens per expert": ([f"routing/layer{i}/tokens_per_expert" for i in range(LAYERS // MOE_EVERY)], None),
    "Validation perplexity": (["val/ppl"], None),
    "sequence-wise/global-batch balance losses": (["seq_aux_loss", "global_aux_loss"], None),
    "MaxVio": (["moe/maxvio_micro", "moe/maxvio_global"], None),
    "per-layer MaxVio": ([f"moe/layer{i}/maxvio" for i in range(LAYERS // MOE_EVERY)], None),
    "per-head activation ratio": (["moe/head_activation_ratio"], None),
    "per-head effective experts": (["moe/head_effective_experts"], None),
    "head-expert mutual information": (["moe/mi_head_expert_bits"], None),
    "token fan-out": (["moe/fanout_groups_mean", "moe/fanout_groups_max", "moe/fanout_ranks_mean",
                       "moe/fanout_ranks_max"], None),
    "the largest aux-loss-free bias": (["moe/expert_bias_absmax"], None),  # the run below turns it on
}


def _split_top(text: str) -> list[str]:
    """Items of a list in prose ("a, b (c), d and e"), not splitting inside parentheses."""
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    out = []
    for item in items:
        out.extend(p for p in re.split(r"^\s*and\s+|\s+and\s+(?![^(]*\))", item.strip()) if p.strip())
    return out


def readme_names() -> list[str]:
    text = open(os.path.join(ROOT, DOC)).read()
    m = re.search(r"^Each metrics row has (.*?)(?:\n\s*\n)", text, re.S | re.M)
    assert m, f"{DOC} has no paragraph starting 'Each metrics row has'"
    para = " ".join(m.group(1).split())
    per_line, _, rest = para.partition(";")
    names = []
    for item in _split_top(per_line):
        name = re.sub(r"\s*\(.*?\)", "", item).strip()
        names.append(name)
        for extra in re.findall(r"\(and ([^)]*)\)", item):  # "(and MFU on known GPUs)"
            names.append(extra.strip())
    including = re.search(r"including (.*?)\.", rest)
    if including:
        names.extend(n.strip() for n in _split_top(including.group(1)))
    for sentence in re.findall(r"(?:^|\. )([A-Z][^.]*?) every `", rest):  # "Validation perplexity every `...`"
        names.append(sentence.strip())
    return names


def check_console(out: str, run_dir: str) -> None:
    """The page's console claims on a real run's stdout (a pipe here, as under the launchers)."""
    doc = " ".join(open(os.path.join(ROOT, DOC)).read().split())
    n = int(re.search(r"prints a run summary of (\d+) lines", doc).group(1))
    lines = out.splitlines()
    first_step = next(i for i, line in enumerate(lines) if line.startswith("step "))
    assert first_step == n, lines[:first_step]
    assert lines[0].endswith(f"full config: {os.path.join(run_dir, 'config.json')}"), lines[0]
    saved = json.load(open(os.path.join(run_dir, "config.json")))
    assert saved["train"]["train_steps"] == 2 and saved["run_dir"] == run_dir
    steps = [line for line in lines if re.match(r"step +\d+/", line)]
    assert steps and all(len(line) <= 120 and re.search(r" \| eta \d+:\d\d:\d\d$", line) for line in steps), steps
    assert "\r" not in out and '"model": {' not in out  # no bar, no config dump through a pipe


def test_every_value_the_docs_name_is_in_metrics_jsonl(byte_data, tmp_path):
    names = readme_names()
    assert len(names) >= 14, names
    unknown = [n for n in names if n not in NAMES]
    assert not unknown, f"{DOC} names {unknown}: log them to metrics.jsonl and add them to NAMES here"
    run_dir = str(tmp_path / "run")
    args = [a for a in common_args(byte_data, run_dir) if not a.startswith(("--train.train_steps",
                                                                            "--train.eval_interval"))]
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MHMOE_FAULT"):
        env.pop(k, None)
    command = [sys.executable, "-m", "megatron_mhmoe.train", *args, "--parallel.ep=1", "--train.train_steps=2",
               "--train.eval_interval=2", "--model.moe.bias_update_rate=0.01"]
    r = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    check_console(r.stdout, run_dir)
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.startswith("nothing to train: "), again.stdout[-3000:]
    assert again.stdout.count("\n") == 1, again.stdout  # one line, not the summary and the final report
    keys = set()
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    for row in rows:
        keys.update(row)
    missing = [(n, k) for n in names for k in NAMES[n][0] if NAMES[n][1] is None and k not in keys]
    assert not missing, f"{DOC} says these are logged, metrics.jsonl lacks them: {missing}"
    for row in rows:
        if "routing/layer0/tokens_per_expert" in row:
            vec = row["routing/layer0/tokens_per_expert"]
            assert len(vec) == EXPERTS and all(isinstance(n, int) and n >= 0 for n in vec), vec
            assert max(vec) == row["moe/layer0/tokens_per_expert_max"]
            assert min(vec) == row["moe/layer0/tokens_per_expert_min"]


def test_data_path_folder_names_the_datasets_inside(byte_data, tmp_path, capsys, monkeypatch):
    from megatron_mhmoe import train
    folder = tmp_path / "data"
    folder.mkdir()
    for ext in (".bin", ".idx", ".meta.json"):
        shutil.copy(byte_data + ext, folder / ("corpus_text_document" + ext))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(key, value)
    for given in (str(folder), str(folder) + "/"):
        code = train.main([f"--data.data_path=[{given}]", "--parallel.ep=1", "--wandb.mode=disabled"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"data error: data.data_path '{given}' is a folder, not a dataset prefix."), err
        prefix = str(folder / "corpus_text_document")
        assert f"holding 1 dataset(s) (.bin + .idx): {prefix}." in err, err
        assert f"pass --data.data_path=[{prefix}]" in err and "No .idx files" not in err, err
    (folder / "corpus_text_document.bin").unlink()
    code = train.main([f"--data.data_path=[{folder}]", "--parallel.ep=1", "--wandb.mode=disabled"])
    err = capsys.readouterr().err
    assert code == 2 and "corpus_text_document.idx without the matching .bin" in err, err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == {k: v for k, v in before.items() if k[-4:] != ".bin"}
