"""Tokenizer training (code preset round trip, sampling, special tokens) and the wrapper."""
from __future__ import annotations

import random

import pytest

from megatron_mhmoe.data.errors import DataError
from megatron_mhmoe.data.spm_train import TokenizerTrainConfig, reservoir_sample, split_sentences, train_tokenizer
from megatron_mhmoe.data.tokenizer import ByteTokenizer, SentencePieceTokenizer, build_tokenizer, check_vocab

from .conftest import TRICKY, run_tool, write_jsonl


def test_code_preset_round_trips_exactly(spm_model, docs):
    tok = SentencePieceTokenizer(spm_model)
    assert tok.vocab_size == 600 and tok.eod == 2 and tok.pad == 3 and tok.bos == 1
    for d in docs + TRICKY + ["\x00nul", "emoji 🦜 and ünïcödé beyond the training set: ∮ ⅀ 𝔘"]:
        ids = tok.encode(d)
        assert tok.decode(ids) == d
        assert tok.eod not in ids  # EOD is only ever appended by the pipeline
    assert tok.encode_batch(["a b", "c"]) == [tok.encode("a b"), tok.encode("c")]
    assert tok.piece(tok.encode("\n")[-1]) == "\n"  # newline is its own user-defined piece


def test_unigram_user_symbols_and_text_input(tmp_path, docs):
    txt = tmp_path / "corpus.txt"
    txt.write_text("".join(d.replace("\n", " ") + "\n" for d in docs[:10]) + "<|fim|> marker\n" * 3)
    res = train_tokenizer(TokenizerTrainConfig(inputs=[str(txt)], model_prefix=str(tmp_path / "uni"),
                                               vocab_size=500, model_type="unigram", num_threads=1,
                                               user_defined_symbols=["<|fim|>"], control_symbols=["<|sep|>"]),
                          log=lambda m: None)
    tok = SentencePieceTokenizer(res.model_path)
    assert tok.vocab_size == 500
    fim = tok.sp.PieceToId("<|fim|>")
    assert fim > 3 and fim in tok.encode("a<|fim|>b")  # user-defined symbols are kept whole
    assert tok.sp.PieceToId("<|sep|>") not in tok.encode("<|sep|>")  # control symbols never come from text
    assert res.roundtrip_failed == 0


def test_sampling_is_uniform_and_bounded():
    sample, seen = reservoir_sample((str(i) for i in range(10_000)), 100, random.Random(0))
    assert seen == 10_000 and len(sample) == 100 and len(set(sample)) == 100
    assert 3000 < sum(int(s) for s in sample) / 100 < 7000  # mean of a uniform sample of 0..9999
    pieces = list(split_sentences("a\n" * 1000 + "x" * 10_000 + "\nend", 100))
    assert "".join(pieces) == "a\n" * 1000 + "x" * 10_000 + "\nend"
    assert max(len(p.encode()) for p in pieces) <= 100


def test_max_sentences_subsamples(tmp_path, corpus):
    res = train_tokenizer(TokenizerTrainConfig(inputs=[corpus], model_prefix=str(tmp_path / "s"), vocab_size=400,
                                               max_sentences=20, num_threads=1), log=lambda m: None)
    assert res.sentences_used == 20 and res.sentences_seen > 20


def test_training_errors_are_clear(tmp_path, corpus):
    empty = write_jsonl(str(tmp_path / "empty.jsonl"), [])
    with pytest.raises(DataError, match="no text to train a tokenizer on"):
        train_tokenizer(TokenizerTrainConfig(inputs=[empty], model_prefix=str(tmp_path / "t")), log=lambda m: None)
    with pytest.raises(DataError, match="lower --vocab-size"):
        train_tokenizer(TokenizerTrainConfig(inputs=[corpus], model_prefix=str(tmp_path / "t"), vocab_size=200_000,
                                             num_threads=1), log=lambda m: None)


def test_wrapper_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        SentencePieceTokenizer(str(tmp_path / "missing.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a valid SentencePiece model"):
        SentencePieceTokenizer(str(bad))
    with pytest.raises(DataError, match="unknown tokenizer type"):
        build_tokenizer("gpt2")


def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert tok.vocab_size == 257 and tok.eod == 256
    assert tok.decode(tok.encode("héllo") + [tok.eod]) == "héllo"


def test_check_vocab():
    check_vocab(8000, 8000)
    check_vocab(8000, 8192)  # padded for tensor parallelism
    with pytest.raises(DataError, match="tokenizer has 8000 tokens but the model's embedding has only 4096 rows"):
        check_vocab(8000, 4096)
    with pytest.raises(DataError, match="different setups"):
        check_vocab(8000, 50304)


def test_cli_help_and_run(tmp_path, corpus):
    r = run_tool("train_tokenizer.py", "--help")
    assert r.returncode == 0 and "--vocab-size" in r.stdout and "round trip" in r.stdout
    r = run_tool("train_tokenizer.py", "--input", corpus, "--model-prefix", str(tmp_path / "cli"),
                 "--vocab-size", "400", "--num-threads", "1", "--log-interval", "5")
    assert r.returncode == 0, r.stderr
    assert "read 5 documents" in r.stderr and "round trip" in r.stderr
    assert (tmp_path / "cli.model").exists() and (tmp_path / "cli.vocab").exists()
    r = run_tool("train_tokenizer.py", "--input", str(tmp_path / "nope.jsonl"), "--model-prefix", str(tmp_path / "x"))
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr
