"""Bad-input matrix: config, data, launch and checkpoint mistakes, each through the real entry point.

Every row gives the entry point, its arguments, the exit code and a substring of the one clear message it must
print (no traceback, no hang). Around every row the good files (dataset, config, hostfile, checkpoints) are
hashed: nothing is ever written over good data.

Entry points: `megatron_mhmoe.train.main` in-process (validation runs before any process group forms; the
process-group init is patched to fail, so a row that slips through fails instead of waiting for peers),
`megatron_mhmoe.launch.launch_check.main` in-process, `tools/preprocess_data.py` (in-process and one
subprocess), and for checkpoints one real single-process training launch each (the layout and model checks
run when resuming, after the engine is built).
Data-file validation itself is unit-tested in tests/data/test_data_bad_input.py; the rows here check that
those errors reach the user from the training CLI before launch.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.launch import launch_check
from megatron_mhmoe.runtime.checkpoint import Checkpointer, CheckpointLayout, rng_state
from tests.runtime.test_train_launch import ROOT, byte_data  # noqa: F401

TINY = ["--model.vocab_size=300", "--model.hidden_size=32", "--model.num_layers=2", "--model.ffn_hidden_size=64",
        "--model.max_seq_len=32", "--model.moe.num_experts=4", "--model.moe.expert_hidden_size=32",
        "--model.moe.num_heads=2", "--train.seq_len=32", "--train.micro_batch_size=2", "--train.train_steps=4",
        "--train.zero_stage=1", "--wandb.mode=disabled", "--data.split=90,10,0"]


# ---------------------------------------------------------------------- the good files
@pytest.fixture(scope="module")
def good(byte_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("good")
    data = root / "data"
    data.mkdir()
    for ext in (".bin", ".idx", ".meta.json"):
        shutil.copy(byte_data + ext, data / ("c_text_document" + ext))
    (root / "run.yaml").write_text("train:\n  lr: 3e-4\nparallel:\n  ep: 2\n")
    (root / "hosts").write_text("node0 slots=1\nnode1 slots=1\n")
    (root / "ds.json").write_text('{"zero_optimization": {"stage": 1}}')
    g = {"root": str(root), "prefix": str(data / "c_text_document"), "yaml": str(root / "run.yaml"),
         "hosts": str(root / "hosts"), "ds": str(root / "ds.json")}
    g["ckpt_small"] = _model_checkpoint(str(root / "ckpt_small"), g["prefix"])
    g["ckpt_ep2"] = _ep2_checkpoint(str(root / "ckpt_ep2"))
    return g


def _model_checkpoint(save_dir: str, prefix: str) -> str:
    """A real checkpoint of the TINY model (world 1, EP 1, ZeRO-1, fp32), written by the Checkpointer."""
    from megatron_mhmoe.model.gpt import GPTModel
    from megatron_mhmoe.runtime.run_config import RunConfig, merged_dict, program_defaults
    cfg = RunConfig.from_dict(merged_dict(program_defaults(), None, TINY + ["--parallel.ep=1"]))
    model = GPTModel(cfg.model, ParallelContext.single_process(), seed=1)
    layout = CheckpointLayout(world_size=1, tp=1, ep=1, zero_stage=1, precision="fp32")
    Checkpointer(save_dir, ParallelContext.single_process(), layout, log=lambda m: None).save(
        2, {"model": model.state_dict(), "optimizer": {}, "scheduler": {}, "rng": rng_state(),
            "consumed_samples": 4, "step": 2}, {"config": cfg.to_dict()})
    return save_dir


def _ep2_checkpoint(save_dir: str) -> str:
    """A checkpoint whose manifest says world 2, EP 2 (only the layout is read before the refusal)."""
    layout = CheckpointLayout(world_size=2, tp=1, ep=2, zero_stage=1, precision="fp32")
    ck = Checkpointer(save_dir, ParallelContext.single_process(), layout, log=lambda m: None)
    ck.save(2, {"model": {"w": torch.zeros(2)}, "step": 2})
    return save_dir


def tree_hash(root: str) -> dict:
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


# ---------------------------------------------------------------------- damaged copies (never the good files)
def copy_data(good: dict, tmp_path) -> str:
    dst = tmp_path / "copy"
    dst.mkdir(exist_ok=True)
    for ext in (".bin", ".idx", ".meta.json"):
        shutil.copy(good["prefix"] + ext, dst / ("c_text_document" + ext))
    return str(dst / "c_text_document")


def truncated_bin(good, tmp_path):
    p = copy_data(good, tmp_path)
    with open(p + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(p + ".bin") - 10)
    return p


def bad_magic_idx(good, tmp_path):
    p = copy_data(good, tmp_path)
    raw = open(p + ".idx", "rb").read()
    open(p + ".idx", "wb").write(b"NOTMAGIC!" + raw[9:])
    return p


def missing_idx(good, tmp_path):
    p = copy_data(good, tmp_path)
    os.remove(p + ".idx")
    return p


def garbage_yaml(good, tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: [1, 2\n  lr: :\n")
    return str(p)


def bad_json(good, tmp_path):
    p = tmp_path / "ds.json"
    p.write_text("{zero_optimization: ")
    return str(p)


def ds_stage2(good, tmp_path):
    p = tmp_path / "ds2.json"
    p.write_text('{"zero_optimization": {"stage": 2}}')
    return str(p)


def ds_typo(good, tmp_path):
    p = tmp_path / "ds_typo.json"
    p.write_text('{"zero_optimisation": {"stage": 1}}')
    return str(p)


def ds_nested_typo(good, tmp_path):
    p = tmp_path / "ds_nested.json"
    p.write_text('{"zero_optimization": {"stage": 1, "reduce_scater": true}}')
    return str(p)


def hf_tokenizer(good, tmp_path):
    """A tokenizer.json that is not the (byte) tokenizer the good dataset was made with."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1, "def": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    return str(tmp_path / "tokenizer.json")


def binary_file(good, tmp_path):
    p = tmp_path / "ls"
    shutil.copy(shutil.which("ls") or "/bin/ls", p)
    return str(p)


def bad_hostfile(good, tmp_path):
    p = tmp_path / "hosts"
    p.write_text("node0;reboot slots=1\n")
    return str(p)


# ---------------------------------------------------------------------- the matrix
# (id, entry, argv with {placeholders}, WORLD_SIZE for train rows, exit code, message substring)
G = "{prefix}"
CASES = [
    # config: sizes, types, unknown keys, batch arithmetic, divisibility, ranges
    ("negative-size", "train", ["--model.hidden_size=-8"], 2, 2, "hidden_size=-8 must be >= 1"),
    ("zero-vocab", "train", ["--model.vocab_size=0"], 2, 2, "vocab_size=0 must be >= 1"),
    ("string-for-int", "train", ["--train.micro_batch_size=abc"], 2, 2, "train.micro_batch_size must be int"),
    ("float-for-int", "train", ["--model.hidden_size=1.5"], 2, 2, "model.hidden_size must be int, got float"),
    ("unknown-key", "train", ["--train.lrr=0.1"], 2, 2, "unknown key(s) ['lrr'] in train"),
    ("unknown-section", "train", ["--optim.lr=0.1"], 2, 2, "unknown top-level key(s) ['optim']"),
    ("unknown-model-key", "train", ["--model.dtype=bf16"], 2, 2, "unknown key(s) ['dtype'] in model"),
    ("moe-not-mapping", "train", ["--model.moe=5"], 2, 2, "model.moe must be a mapping"),
    ("fp16-on-cpu", "train", ["--train.precision=fp16"], 2, 2, "train.precision=fp16 needs a GPU"),
    ("bad-precision", "train", ["--train.precision=fp8"], 2, 2, "train.precision='fp8' is not one of"),
    ("batch-arithmetic", "train", ["--train.global_batch_size=7", "--train.micro_batch_size=2"], 2, 2,
     "global_batch_size 7 is not a multiple of micro_batch_size x DP = 2 x 2 = 4"),
    ("experts-not-divisible-by-ep", "train", ["--model.moe.num_experts=3"], 2, 2,
     "num_experts 3 is not divisible by expert-parallel size 2"),
    ("heads-not-divisible-by-tp", "train", ["--parallel.tp=4", "--parallel.ep=1", "--model.num_attention_heads=6",
                                            "--model.hidden_size=96"], 4, 2,
     "num_attention_heads 6 is not divisible by tensor-parallel size 4"),
    ("moe-heads-not-dividing-hidden", "train", ["--model.moe.num_heads=3"], 2, 2,
     "moe.num_heads 3 does not divide hidden_size 32"),
    ("top-k-above-experts", "train", ["--model.moe.top_k=9"], 2, 2, "moe.top_k=9 must be in [1, num_experts=4]"),
    ("seq-len-above-max", "train", ["--train.seq_len=4096"], 2, 2, "train.seq_len 4096 exceeds model.max_seq_len"),
    ("zero3-with-moe", "train", ["--train.zero_stage=3"], 2, 2, "ZeRO-3 partitions every parameter"),
    ("world-not-divisible-by-ep", "train", [], 3, 2, "expert-parallel size 2 does not divide world size 3"),
    ("negative-lr", "train", ["--train.lr=-1"], 2, 2, "train.lr=-1 must be > 0.0"),
    ("zero-log-interval", "train", ["--train.log_interval=0"], 2, 2, "train.log_interval=0 must be >= 1"),
    ("zero-timeout", "train", ["--parallel.timeout_s=0"], 2, 2, "parallel.timeout_s=0 must be > 0.0"),
    ("negative-capacity", "train", ["--model.moe.capacity_factor=-1"], 2, 2, "capacity_factor=-1 must be >= 0"),
    ("malformed-yaml-file", "train", ["--config", "{garbage_yaml}"], 2, 2, "is not valid YAML"),
    ("missing-config-file", "train", ["--config", "/nonexistent/run.yaml"], 2, 2,
     "config file '/nonexistent/run.yaml' does not exist"),
    ("ds-config-not-json", "train", ["--deepspeed_config", "{bad_json}"], 2, 2, "is not valid JSON"),
    ("ds-config-disagrees", "train", ["--deepspeed_config", "{ds_stage2}"], 2, 2,
     "zero_optimization.stage=2 but train.zero_stage=1"),
    ("override-without-value", "train", ["--train.lr"], 2, 2, "overrides look like --section.key=value"),
    ("ds-config-key-typo", "train", ["--deepspeed_config", "{ds_typo}"], 2, 2,
     "unknown top-level key 'zero_optimisation' (did you mean 'zero_optimization'?)"),
    ("ds-config-nested-key-typo", "train", ["--deepspeed_config", "{ds_nested_typo}"], 2, 2,
     "unknown key 'reduce_scater' in a section of DeepSpeedZeroConfig (did you mean 'reduce_scatter'?)"),
    ("run-dir-is-a-file", "train", ["--run_dir={yaml}"], 2, 2,
     "run_dir '{yaml}' is an existing file, not a folder"),
    ("train-steps-below-checkpoint", "train", ["--train.save_dir={ckpt_small}", "--train.train_steps=1"], 2, 2,
     "train.train_steps=1 is below the step of the checkpoint this run resumes, 2"),
    # data: missing/corrupt/mismatched files, tokenizer, split, blend
    ("missing-dataset", "train", ["--data.data_path=[{root}/data/c]"], 2, 2,
     "Existing dataset prefixes nearby: {prefix}"),
    ("truncated-bin", "train", ["--data.data_path=[{truncated_bin}]"], 2, 2, ".bin is truncated"),
    ("idx-wrong-magic", "train", ["--data.data_path=[{bad_magic_idx}]"], 2, 2, "is not a Megatron mmap index"),
    ("idx-missing", "train", ["--data.data_path=[{missing_idx}]"], 2, 2, "c_text_document.idx does not exist"),
    ("vocab-mismatch", "train", [f"--data.data_path=[{G}]", "--model.vocab_size=100"], 2, 2,
     "token ids >= 100 would be out of range"),
    ("missing-tokenizer", "train", [f"--data.data_path=[{G}]", "--data.tokenizer_model=/nonexistent/tok.model"], 2,
     2, "data.tokenizer_model '/nonexistent/tok.model' does not exist"),
    ("tokenizer-not-the-datas", "train", [f"--data.data_path=[{G}]", "--data.tokenizer_model={hf_tokenizer}"], 2, 2,
     "dataset {prefix} was tokenized with the built-in byte tokenizer (byte, sha256"),
    ("bad-split", "train", ["--data.split=a,b,c"], 2, 2, "split 'a,b,c' has a non-numeric weight"),
    ("odd-blend", "train", [f"--data.data_path=[0.5, {G}, 0.5]"], 2, 2, "must alternate weight and prefix"),
    ("preprocess-missing-tokenizer", "preprocess",
     ["--input", "{root}/run.yaml", "--tokenizer-model", "/nonexistent/tok.model", "--output-prefix",
      "{root}/data/c", "--workers", "1"], None, 1, "does not exist"),
    ("preprocess-binary-input", "preprocess",
     ["--input", "{binary_file}", "--tokenizer-type", "byte", "--output-prefix", "{root}/data/b", "--workers", "1"],
     None, 1, "does not look like text"),
    # launch
    ("hostfile-shell-name", "launch", ["--hostfile", "{bad_hostfile}"], None, 2, "bad host name 'node0;reboot'"),
    ("hostfile-missing", "launch", ["--hostfile", "/nonexistent/hosts"], None, 2,
     "hostfile /nonexistent/hosts does not exist"),
    ("missing-nodes", "launch", ["--hostfile", "{hosts}", "--nodes", "3"], None, 2,
     "--nodes 3 but the hostfile has only 2 host(s)"),
    ("too-many-gpus-per-node", "launch", ["--hostfile", "{hosts}", "--gpus-per-node", "4"], None, 2,
     "--gpus-per-node 4 but host 'node0' has slots=1"),
    ("world-not-divisible-by-tp-x-ep", "launch", ["--nodes", "1", "--gpus-per-node", "3"], None, 2,
     "expert-parallel size 2 does not divide world size 3"),
    ("include-unknown-host", "launch", ["--hostfile", "{hosts}", "--include", "node7"], None, 2,
     "host 'node7' is not in hostfile"),
    ("privileged-port", "launch", ["--hostfile", "{hosts}", "--master-port", "80"], None, 2,
     "port 80 is out of range"),
    ("node-rank-out-of-range", "launch", ["--nodes", "2", "--gpus-per-node", "1", "--node-rank", "5"], None, 2,
     "--node-rank 5 but there are 2 node(s)"),
    ("launch-bad-run-config", "launch", ["--nodes", "1", "--gpus-per-node", "2", "--", "--train.lrr=1"], None, 2,
     "unknown key(s) ['lrr'] in train"),
]


def _fill(good: dict, tmp_path, items: list[str]) -> list[str]:
    makers = {f.__name__: f for f in (truncated_bin, bad_magic_idx, missing_idx, garbage_yaml, bad_json, ds_stage2,
                                      ds_typo, ds_nested_typo, hf_tokenizer, binary_file, bad_hostfile)}
    out = []
    for item in items:
        for name, make in makers.items():
            if "{" + name + "}" in item:
                item = item.replace("{" + name + "}", make(good, tmp_path))
        out.append(item.format(**good))
    return out


def _run_train(argv: list[str], world: int, monkeypatch, capsys) -> tuple[int, str]:
    from megatron_mhmoe import train
    from megatron_mhmoe.runtime import engine

    class Slipped(BaseException):  # not an Exception: main's handler must not turn it into os._exit(4)
        pass

    def reached(*a, **k):
        raise Slipped("validation let a bad input through to the process-group init")

    monkeypatch.setattr(engine, "init_distributed", reached)
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                     MASTER_PORT="29999").items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MHMOE_FAULT", raising=False)
    try:
        code = train.main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out + err


def _run_preprocess(argv: list[str], capsys) -> tuple[int, str]:
    """The command itself, as a user runs it."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), *argv],
                       capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, good, tmp_path, monkeypatch, capsys):
    name, entry, argv, world, want_code, needle = case
    before = tree_hash(good["root"])
    argv = _fill(good, tmp_path, argv)
    needle = needle.format(**good)
    monkeypatch.chdir(tmp_path)  # nothing relative lands in the checkout
    if entry == "train":
        base = [f"--run_dir={tmp_path}/run"] + TINY
        if not any(a.startswith("--data.data_path") for a in argv):
            base.append(f"--data.data_path=[{good['prefix']}]")
        code, text = _run_train(base + argv, world, monkeypatch, capsys)
    elif entry == "launch":
        monkeypatch.delenv("DS_ACCELERATOR", raising=False)
        code = launch_check.main(argv)
        out, err = capsys.readouterr()
        text = out + err
    else:
        code, text = _run_preprocess(argv, capsys)
    assert code == want_code, text[-2000:]
    assert needle in text, text[-2000:]
    assert "Traceback" not in text
    assert tree_hash(good["root"]) == before  # nothing written over good data


# ---------------------------------------------------------------------- real launches
def _train_cli(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MHMOE_FAULT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "megatron_mhmoe.train"] + args, cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("which, extra, needle", [
    ("ckpt_small", ["--model.hidden_size=64"],
     "holds a different model than this config: model.hidden_size 32 saved vs 64 here"),
    ("ckpt_ep2", [], "was written with world=2 TP=1 EP=2 ZeRO-1 fp32, this run is world=1 TP=1 EP=1"),
])
def test_resume_from_incompatible_checkpoint(good, tmp_path, which, extra, needle):
    """One real single-process launch each: the refusal comes with the fix, exit 1, and the checkpoint
    folder (the run's save_dir) is left exactly as it was."""
    before = tree_hash(good["root"])
    args = [f"--run_dir={tmp_path}/run", f"--data.data_path=[{good['prefix']}]", "--parallel.ep=1",
            f"--train.save_dir={good[which]}", f"--data.cache_dir={tmp_path}/cache"] + TINY + extra
    r = _train_cli(args, tmp_path)
    text = r.stdout + r.stderr
    assert r.returncode == 1, text[-3000:]
    assert "[rank 0] error: CheckpointError: " in text and needle in text, text[-3000:]
    assert "Traceback" not in text
    assert tree_hash(good["root"]) == before


def test_preprocess_cli_never_overwrites_a_good_dataset(good, tmp_path):
    """Preprocessing an empty input onto the prefix of a good dataset fails before touching it."""
    before = tree_hash(good["root"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", str(empty),
                        "--tokenizer-type", "byte", "--output-prefix", os.path.join(good["root"], "data", "c"),
                        "--workers", "1"], capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert r.returncode == 1 and "error: no documents" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert tree_hash(good["root"]) == before


def test_matrix_size():
    """The README's count of bad inputs is this table's size plus the 3 real launches (tests/test_readme_claims)."""
    assert len(CASES) + 3 == 54
