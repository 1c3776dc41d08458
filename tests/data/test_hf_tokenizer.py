"""Hugging Face tokenizer.json in the data pipeline: training one locally, EOD/vocab/dtype checks, the
preprocess -> .bin/.idx round trip, the training program reading it, and preprocessing's progress output.

Every tokenizer here is trained or built in the test by the `tokenizers` library itself (no download).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from megatron_mhmoe.data.errors import DataError
from megatron_mhmoe.data.indexed import IndexedDataset
from megatron_mhmoe.data.preprocess import PreprocessConfig, preprocess
from megatron_mhmoe.data.tokenizer import HFTokenizer, build_tokenizer, check_vocab, resolve_tokenizer_type
from megatron_mhmoe.data.vocab import check_dataset_vocab

from tests.terminal import run_on_terminal

from .conftest import PY, REPO, TRICKY, run_tool, write_jsonl

pytest.importorskip("tokenizers")

QUIET = dict(log=lambda m: None)
UNSEEN = ["emoji 🦜 and ünïcödé beyond the training set: ∮ ⅀ 𝔘", "\x00nul", "tabs\t\tand\r\nCRLF", "  "]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, corpus) -> str:
    """A byte-level BPE of vocab 300 trained by tools/train_tokenizer.py --type hf-bpe on the tiny corpus."""
    folder = str(tmp_path_factory.mktemp("hf") / "tok")
    r = run_tool("train_tokenizer.py", "--type", "hf-bpe", "--input", corpus, "--model-prefix", folder,
                 "--vocab-size", "300", "--num-threads", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == os.path.join(folder, "tokenizer.json")
    assert "round trip decode(encode(doc)) == doc on" in r.stderr and "WARNING" not in r.stderr
    return folder


def _renamed_eod(hf_dir: str, folder, new: str = "<|doc_end|>") -> str:
    """A copy of the trained tokenizer.json whose end-of-text token has a name no rule recognises."""
    with open(os.path.join(hf_dir, "tokenizer.json"), encoding="utf-8") as f:
        text = f.read()
    assert text.count("<|endoftext|>") == 2  # the added-token entry and the vocabulary entry
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(str(folder), "tokenizer.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace("<|endoftext|>", new))
    return path


def test_trained_tokenizer_round_trips(hf_dir, docs):
    tok = build_tokenizer("auto", hf_dir)
    assert isinstance(tok, HFTokenizer) and tok.type_name == "hf"
    assert tok.vocab_size == 300 and tok.eod == 0 and tok.eod_token == "<|endoftext|>"
    same = build_tokenizer("auto", os.path.join(hf_dir, "tokenizer.json"))  # the file or its folder
    assert (same.sha256, same.vocab_size, same.eod) == (tok.sha256, tok.vocab_size, tok.eod)
    for d in docs + TRICKY + UNSEEN:
        ids = tok.encode(d)
        assert tok.decode(ids) == d
        assert tok.eod not in ids and max(ids, default=0) < tok.vocab_size
        assert tok.decode(ids + [tok.eod]) == d  # EOD is dropped, as the other tokenizers drop theirs
    assert tok.encode_batch(["a b", "c"]) == [tok.encode("a b"), tok.encode("c")]
    with open(os.path.join(hf_dir, "tokenizer_config.json")) as f:
        assert json.load(f)["eos_token"] == "<|endoftext|>"


def test_preprocess_round_trip_through_bin_idx(hf_dir, corpus, docs, tmp_path):
    # The command line, with worker processes: the type comes from the file name alone.
    out = str(tmp_path / "hf")
    r = run_tool("preprocess_data.py", "--input", corpus, "--tokenizer-model", os.path.join(hf_dir, "tokenizer.json"),
                 "--append-eod", "--output-prefix", out, "--workers", "2", "--log-interval", "5")
    assert r.returncode == 0, r.stderr
    assert "hf tokenizer, vocab 300 (uint16 tokens), EOD 0" in r.stderr
    ds = IndexedDataset(out + "_text_document")
    tok = build_tokenizer("auto", hf_dir)
    assert len(ds) == len(docs) and ds.dtype == np.uint16
    for i, d in enumerate(docs):
        ids = ds[i].tolist()
        assert ids[-1] == tok.eod and tok.eod not in ids[:-1]
        assert tok.decode(ids) == d
    meta = ds.meta
    assert meta["tokenizer_type"] == "hf" and meta["vocab_size"] == 300 and meta["eod"] == 0
    assert meta["eod_token"] == "<|endoftext|>" and meta["tokenizer_sha256"] == tok.sha256
    assert meta["dtype"] == "uint16" and meta["max_token_id"] < 300


def test_eod_is_found_or_the_error_names_eod_token(hf_dir, tmp_path, corpus):
    # Alone in a folder (no tokenizer_config.json): found by its conventional name.
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(os.path.join(hf_dir, "tokenizer.json"), alone / "tokenizer.json")
    assert build_tokenizer("auto", str(alone)).eod == 0
    # No eos token anywhere: a clear error that names the option.
    odd = _renamed_eod(hf_dir, tmp_path / "odd")
    with pytest.raises(DataError, match=r"no end-of-document token.*<\|doc_end\|>.*--eod-token"):
        build_tokenizer("auto", odd)
    assert build_tokenizer("auto", odd, eod_token="<|doc_end|>").eod == 0
    with pytest.raises(DataError, match=r"--eod-token '<nope>' is not a token of .*special tokens: <\|doc_end\|>"):
        build_tokenizer("auto", odd, eod_token="<nope>")
    # A tokenizer_config.json beside it names the eos token (what training, which has no --eod-token, reads).
    (tmp_path / "odd" / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|doc_end|>"}}))
    assert build_tokenizer("auto", odd).eod == 0
    (tmp_path / "odd" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(DataError, match=r"eos_token of .*tokenizer_config.json '</s>' is not a token"):
        build_tokenizer("auto", odd)
    os.remove(tmp_path / "odd" / "tokenizer_config.json")
    # The command line: refused with the message, accepted with --eod-token (recorded in the metadata).
    small = write_jsonl(str(tmp_path / "small.jsonl"), [{"text": "def f(x):\n    return x\n"}, {"text": "é 日本"}])
    r = run_tool("preprocess_data.py", "--input", small, "--tokenizer-model", odd, "--append-eod",
                 "--output-prefix", str(tmp_path / "o"), "--workers", "1")
    assert r.returncode == 1 and "--eod-token" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_tool("preprocess_data.py", "--input", small, "--tokenizer-model", odd, "--eod-token", "<|doc_end|>",
                 "--append-eod", "--output-prefix", str(tmp_path / "o"), "--workers", "2")
    assert r.returncode == 0, r.stderr
    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    assert ds.meta["eod_token"] == "<|doc_end|>" and [ds[i][-1] for i in range(2)] == [0, 0]
    with pytest.raises(DataError, match="--eod-token applies to Hugging Face tokenizers only"):
        build_tokenizer("byte", None, eod_token="</s>")


def test_bad_tokenizer_files_are_clear(hf_dir, tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": 42}')
    with pytest.raises(DataError, match="is not a valid Hugging Face tokenizer.json"):
        build_tokenizer("auto", str(bad))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="folder without a tokenizer.json"):
        build_tokenizer("hf", str(empty))
    with pytest.raises(DataError, match="does not exist"):
        build_tokenizer("auto", str(tmp_path / "missing.json"))
    with pytest.raises(DataError, match="is a Hugging Face tokenizer, not a SentencePiece model"):
        build_tokenizer("sentencepiece", hf_dir)
    assert resolve_tokenizer_type("auto", "x/tok.model") == "sentencepiece"
    assert resolve_tokenizer_type("auto", "x/tokenizer.json") == "hf"
    with pytest.raises(DataError, match="--tokenizer-model is required"):
        build_tokenizer("auto", None)


def test_vocab_checks(hf_dir, corpus, tmp_path):
    res = preprocess(PreprocessConfig(inputs=[corpus], output_prefix=str(tmp_path / "v"), tokenizer_model=hf_dir,
                                      append_eod=True), **QUIET)
    ds = IndexedDataset(res.outputs["text"])
    check_dataset_vocab(ds, 384)  # padded for TP: fine
    with pytest.raises(DataError, match="has 300 tokens but the model's embedding has only 256 rows"):
        check_dataset_vocab(ds, 256)
    with pytest.raises(DataError, match="exceeds the tokenizer's"):
        check_vocab(build_tokenizer("auto", hf_dir).vocab_size, 300 + 4096)


def test_large_or_gapped_vocab_gets_int32_and_exact_ids(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    # A vocabulary with a gap whose top id needs int32: vocab_size must be max id + 1, not the entry count.
    vocab = {"[UNK]": 0, "</s>": 1, "common": 2, "rare": 69_999}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    path = str(tmp_path / "tokenizer.json")
    tk.save(path)
    tok = build_tokenizer("auto", path)
    assert tok.vocab_size == 70_000 and tok.eod == 1
    data = write_jsonl(str(tmp_path / "w.jsonl"), [{"text": "common rare common"}, {"text": "rare"}])
    res = preprocess(PreprocessConfig(inputs=[data], output_prefix=str(tmp_path / "w"), tokenizer_model=path,
                                      append_eod=True, workers=1), **QUIET)
    ds = IndexedDataset(res.outputs["text"])
    assert ds.dtype == np.int32 and ds.meta["dtype"] == "int32" and ds.meta["vocab_size"] == 70_000
    assert ds[0].tolist() == [2, 69_999, 2, 1] and ds[1].tolist() == [69_999, 1]
    with pytest.raises(DataError, match="the tokenizer has 70000 tokens but the model.s embedding has only 65536 rows"):
        check_dataset_vocab(ds, 65_536, max_padding=1 << 20)


def test_training_program_reads_tokenizer_json(hf_dir, corpus, tmp_path):
    res = preprocess(PreprocessConfig(inputs=[corpus], output_prefix=str(tmp_path / "t"), tokenizer_model=hf_dir,
                                      append_eod=True), **QUIET)
    run_dir = str(tmp_path / "run")
    args = [f"--run_dir={run_dir}", f"--data.data_path=[{res.outputs['text']}]",
            f"--data.tokenizer_model={os.path.join(hf_dir, 'tokenizer.json')}", "--model.hidden_size=32",
            "--model.num_layers=2", "--model.ffn_hidden_size=64", "--model.max_seq_len=32",
            "--model.moe.num_experts=2", "--model.moe.expert_hidden_size=32", "--model.moe.num_heads=2",
            "--train.seq_len=32", "--train.micro_batch_size=2", "--train.train_steps=2", "--train.warmup_steps=1",
            "--train.log_interval=1", "--train.eval_interval=2", "--train.eval_iters=1",
            "--train.save_interval=100", "--wandb.mode=disabled", "--parallel.ep=1", "--data.split=90,10,0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled")

    def train(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([PY, "-m", "megatron_mhmoe.train", *args, *extra], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)

    r = train("--model.vocab_size=256")  # smaller than the tokenizer's 300: refused before anything starts
    assert r.returncode == 2, r.stderr[-3000:]
    assert "data error" in r.stderr and "has 300 tokens but the model's embedding has only 256 rows" in r.stderr
    r = train("--model.vocab_size=300")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        steps = [rec["step"] for rec in map(json.loads, f) if "loss" in rec]
    assert steps == [1, 2]


def _preprocess_on_a_terminal(args: list[str]) -> tuple[int, str]:
    """Run tools/preprocess_data.py with stderr on a pseudo-terminal; returns (rc, what it showed)."""
    return run_on_terminal([PY, os.path.join(REPO, "tools", "preprocess_data.py"), *args], REPO)


def test_progress_bar_on_a_terminal_lines_otherwise(hf_dir, corpus, tmp_path):
    common = ["--input", corpus, "--tokenizer-model", hf_dir, "--append-eod", "--workers", "1", "--log-interval", "5"]
    rc, shown = _preprocess_on_a_terminal(common + ["--output-prefix", str(tmp_path / "tty")])
    assert rc == 0, shown
    assert "preprocessing: 100%|" in shown and "B/s" in shown and "docs/s]" in shown
    assert "processed " not in shown  # no periodic lines under a bar
    assert "\ndone: " in shown and "MB/s), " in shown  # the final throughput line stays
    r = run_tool("preprocess_data.py", *common, "--output-prefix", str(tmp_path / "pipe"))
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert "\r" not in r.stderr and not any("%|" in line for line in lines)
    assert sum(line.startswith("processed ") and "docs/s" in line for line in lines) >= 1
    assert lines[-1].startswith("done: ") and "tokens per key" in lines[-1]
    for ext in (".bin", ".idx"):  # the same bytes either way
        assert open(str(tmp_path / "tty_text_document") + ext, "rb").read() == \
            open(str(tmp_path / "pipe_text_document") + ext, "rb").read()


def test_hf_training_options_and_errors(tmp_path, corpus):
    from megatron_mhmoe.data.spm_train import TokenizerTrainConfig, train_hf_tokenizer

    res = train_hf_tokenizer(TokenizerTrainConfig(inputs=[corpus], model_prefix=str(tmp_path / "fim"), vocab_size=320,
                                                  user_defined_symbols=["<|fim|>"]), **QUIET)
    tok = build_tokenizer("auto", res.model_path)
    fim = tok.tk.token_to_id("<|fim|>")
    assert tok.eod == 0 and fim == 1 and tok.encode("a<|fim|>b").count(fim) == 1  # kept whole
    assert tok.decode(tok.encode("a<|fim|>b")) == "a<|fim|>b" and res.roundtrip_failed == 0
    with pytest.raises(DataError, match="leaves no room for merges"):
        train_hf_tokenizer(TokenizerTrainConfig(inputs=[corpus], model_prefix=str(tmp_path / "x"), vocab_size=257),
                           **QUIET)
    with pytest.raises(DataError, match="--control-symbols is SentencePiece-only"):
        train_hf_tokenizer(TokenizerTrainConfig(inputs=[corpus], model_prefix=str(tmp_path / "x"), vocab_size=300,
                                                control_symbols=["<|sep|>"]), **QUIET)
    with pytest.raises(DataError, match="trains BPE only"):
        train_hf_tokenizer(TokenizerTrainConfig(inputs=[corpus], model_prefix=str(tmp_path / "x"), vocab_size=300,
                                                model_type="unigram"), **QUIET)
    empty = write_jsonl(str(tmp_path / "empty.jsonl"), [])
    with pytest.raises(DataError, match="no text to train a tokenizer on"):
        train_hf_tokenizer(TokenizerTrainConfig(inputs=[empty], model_prefix=str(tmp_path / "x")), **QUIET)
