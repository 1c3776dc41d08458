"""Every kind of bad input gives a clear DataError (or a counted, reported skip), never a silent wrong result."""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from megatron_mhmoe.data import build_train_valid_test_datasets
from megatron_mhmoe.data.errors import DataError
from megatron_mhmoe.data.indexed import IndexedDataset, IndexedDatasetWriter
from megatron_mhmoe.data.input_reader import InputConfig, iter_raw
from megatron_mhmoe.data.preprocess import PreprocessConfig, preprocess
from megatron_mhmoe.data.vocab import check_dataset_vocab

from .conftest import run_tool, write_jsonl


def run(tmp_path, lines, model, strict=False, logs=None, **input_kw):
    path = tmp_path / "in.jsonl"
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else line.encode())
            f.write(b"\n")
    cfg = PreprocessConfig(inputs=[str(path)], output_prefix=str(tmp_path / "out"), tokenizer_model=model,
                           input=InputConfig(strict=strict, **input_kw))
    log = logs.append if logs is not None else (lambda m: None)
    return preprocess(cfg, log=log), str(path)


GOOD = '{"text": "print(1)"}'


def test_empty_input(tmp_path, spm_model):
    with pytest.raises(DataError, match=r"no documents: the input \(.*in.jsonl\) is empty"):
        run(tmp_path, [], spm_model)
    assert not list(tmp_path.glob("out*"))  # nothing half-written
    with pytest.raises(DataError, match="all 2 records were skipped.*not valid JSON"):
        run(tmp_path, ["{bad", "also bad"], spm_model)


def test_invalid_json_skipped_and_counted_or_strict(tmp_path, spm_model):
    logs: list = []
    res, path = run(tmp_path, [GOOD, "{not json", "[1, 2]", GOOD], spm_model, logs=logs)
    assert res.stats.documents == 2 and res.stats.counts["invalid_json"] == 2
    warning = [m for m in logs if m.startswith("WARNING")]
    assert warning and f"2 lines that are not valid JSON objects were skipped" in warning[0]
    assert f"{path}:2" in warning[0] and f"{path}:3" in warning[0] and "--strict" in warning[0]
    with pytest.raises(DataError, match=rf"{path}:2: invalid JSON .*--strict is set"):
        run(tmp_path, [GOOD, "{not json", GOOD], spm_model, strict=True)


def test_missing_key(tmp_path, spm_model):
    res, path = run(tmp_path, [GOOD, '{"content": "x"}', '{"text": 5}'], spm_model)
    assert res.stats.counts["missing_key"] == 2 and res.stats.documents == 1
    with pytest.raises(DataError, match=rf"{path}:2: no key 'text' \(keys: \['content'\]\); set --json-keys"):
        run(tmp_path, [GOOD, '{"content": "x"}'], spm_model, strict=True)
    with pytest.raises(DataError, match="key 'text' holds a int, not a string"):
        run(tmp_path, ['{"text": 5}'], spm_model, strict=True)


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path, spm_model):
    from megatron_mhmoe.data.tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer(spm_model)
    res, path = run(tmp_path, [b'{"text": "caf\xe9 ok"}'], spm_model)
    assert res.stats.counts["non_utf8"] == 1
    assert tok.decode(IndexedDataset(res.outputs["text"])[0]) == "caf\ufffd ok"
    with pytest.raises(DataError, match=rf"{path}:1: bytes that are not UTF-8 .*byte"):
        run(tmp_path, [b'{"text": "caf\xe9"}'], spm_model, strict=True)


def test_nul_characters_are_removed_and_counted(tmp_path, spm_model):
    from megatron_mhmoe.data.tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer(spm_model)
    res, _ = run(tmp_path, ['{"text": "a\\u0000b"}', b'{"text": "raw\x00nul"}'], spm_model)
    assert res.stats.counts["nul"] == 1 and res.stats.counts["invalid_json"] == 1  # raw NUL is not legal JSON
    assert tok.decode(IndexedDataset(res.outputs["text"])[0]) == "ab"
    with pytest.raises(DataError, match="NUL characters"):
        run(tmp_path, ['{"text": "a\\u0000b"}'], spm_model, strict=True)
    txt = tmp_path / "nul.txt"
    txt.write_bytes(b"x\x00y\n")
    res = preprocess(PreprocessConfig(inputs=[str(txt)], output_prefix=str(tmp_path / "t"), tokenizer_model=spm_model),
                     log=lambda m: None)
    assert res.stats.counts["nul"] == 1 and tok.decode(IndexedDataset(res.outputs["text"])[0]) == "xy"


def test_lone_surrogates_are_replaced_and_counted(tmp_path, spm_model):
    """A JSON escape of half a surrogate pair cannot be encoded as UTF-8: replaced, not a crash."""
    from megatron_mhmoe.data.tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer(spm_model)
    pair = '{"text": "ok \\ud83d\\ude00"}'  # a valid pair: one emoji, untouched
    res, _ = run(tmp_path, ['{"text": "a\\ud800b"}', pair], spm_model)
    assert res.stats.counts["surrogate"] == 1
    docs = IndexedDataset(res.outputs["text"])
    assert tok.decode(docs[0]) == "a\ufffdb" and tok.decode(docs[1]) == "ok \U0001F600"
    with pytest.raises(DataError, match="surrogates"):
        run(tmp_path, ['{"text": "a\\udc00"}'], spm_model, strict=True)


def test_huge_line_is_skipped_with_bounded_reads(tmp_path, spm_model):
    cfg = InputConfig(max_doc_chars=100)
    big = tmp_path / "big.jsonl"
    big.write_text(GOOD + "\n" + '{"text": "' + "x" * 1_000_000 + '"}\n' + GOOD + "\n")
    records = list(iter_raw(str(big), "jsonl", cfg))
    assert [(n, r is None) for n, r in records] == [(1, False), (2, True), (3, False)]
    assert max(len(r) for _, r in records if r) < 100  # the megabyte line was never held whole
    res, path = run(tmp_path, [GOOD, '{"text": "' + "y" * 300 + '"}', '{"text": "' + "z" * 100_000 + '"}'],
                    spm_model, max_doc_chars=100)
    assert res.stats.counts["too_long"] == 2 and res.stats.documents == 1
    with pytest.raises(DataError, match=rf"{path}:2: a document of 300 characters > --max-doc-chars 100"):
        run(tmp_path, [GOOD, '{"text": "' + "y" * 300 + '"}'], spm_model, strict=True, max_doc_chars=100)


def _dataset(tmp_path, name="ds", vocab=600, max_id=599):
    prefix = str(tmp_path / name)
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for i in range(20):
            w.add_document(np.append(np.arange(i, i + 50) % max_id, max_id))
        w.finalize({"vocab_size": vocab, "max_token_id": max_id, "tokenizer_sha256": "a" * 64})
    return prefix


def test_truncated_bin(tmp_path):
    prefix = _dataset(tmp_path)
    size = os.path.getsize(prefix + ".bin")
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(DataError, match=rf"{prefix}.bin is truncated: {size - 10} bytes, but .* describes {size}.*"
                                        "Re-run tools/preprocess_data.py"):
        IndexedDataset(prefix)


def test_truncated_idx_and_wrong_magic_and_version(tmp_path):
    prefix = _dataset(tmp_path)
    idx = prefix + ".idx"
    good = open(idx, "rb").read()
    open(idx, "wb").write(good[:-8])
    with pytest.raises(DataError, match="is truncated"):
        IndexedDataset(prefix)
    open(idx, "wb").write(b"NOTMAGIC!" + good[9:])
    with pytest.raises(DataError, match=rf"{idx} is not a Megatron mmap index: its first bytes are .*NOTMAGIC"):
        IndexedDataset(prefix)
    open(idx, "wb").write(b"TNTIDX\x00\x00" + good[8:])
    with pytest.raises(DataError, match="old Megatron/fairseq 'lazy'/'cached' IndexedDataset"):
        IndexedDataset(prefix)
    open(idx, "wb").write(good[:9] + struct.pack("<Q", 2) + good[17:])
    with pytest.raises(DataError, match=rf"{idx} has index version 2; only version 1"):
        IndexedDataset(prefix)
    open(idx, "wb").write(good[:17] + bytes([99]) + good[18:])
    with pytest.raises(DataError, match="unknown dtype code 99"):
        IndexedDataset(prefix)
    open(idx, "wb").write(good[:5])
    with pytest.raises(DataError, match="not a Megatron mmap index"):
        IndexedDataset(prefix)


def test_missing_files_suggest_prefixes(tmp_path):
    _dataset(tmp_path, "corpus_text_document")
    with pytest.raises(DataError, match=r"corpus.idx does not exist.*Existing dataset prefixes nearby: .*"
                                        r"corpus_text_document"):
        IndexedDataset(str(tmp_path / "corpus"))
    os.remove(tmp_path / "corpus_text_document.bin")
    with pytest.raises(DataError, match="corpus_text_document.bin does not exist"):
        IndexedDataset(str(tmp_path / "corpus_text_document"))


def test_vocab_mismatch(tmp_path):
    prefix = _dataset(tmp_path, vocab=600, max_id=599)
    ds = IndexedDataset(prefix)
    check_dataset_vocab(ds, 640)
    with pytest.raises(DataError, match=rf"dataset {prefix} .*tokenizer has 600 tokens but the model's embedding "
                                        "has only 512 rows"):
        check_dataset_vocab(ds, 512)
    with pytest.raises(DataError, match="tokenizer has 600 tokens"):
        build_train_valid_test_datasets(prefix, "1", 16, 0, (10, 0, 0), model_vocab_size=512, log=lambda m: None)
    # without a sidecar (e.g. a Megatron-made dataset) the data itself is scanned
    os.remove(prefix + ".meta.json")
    with pytest.raises(DataError, match="contains token id 599, out of range for a model vocab of 512"):
        check_dataset_vocab(IndexedDataset(prefix), 512)


def test_split_and_sizes_errors(tmp_path):
    prefix = _dataset(tmp_path)
    with pytest.raises(DataError, match="non-numeric"):
        build_train_valid_test_datasets(prefix, "90,x,1", 16, 0, (10, 0, 0), log=lambda m: None)
    with pytest.raises(DataError, match="valid split .* has no tokens"):
        build_train_valid_test_datasets(prefix, "1000,1,0", 16, 0, (10, 5, 0), use_cache=False, log=lambda m: None)
    with pytest.raises(DataError, match="alternate weight and prefix"):
        build_train_valid_test_datasets(f"0.5 {prefix} 0.5", "1", 16, 0, (10, 0, 0), log=lambda m: None)


def test_cli_reports_errors_without_traceback(tmp_path, spm_model):
    empty = write_jsonl(str(tmp_path / "e.jsonl"), [])
    r = run_tool("preprocess_data.py", "--input", empty, "--tokenizer-model", spm_model, "--output-prefix",
                 str(tmp_path / "o"), "--workers", "2")
    assert r.returncode == 1 and "error: no documents" in r.stderr and "Traceback" not in r.stderr
    bad = write_jsonl(str(tmp_path / "b.jsonl"), [GOOD, "{oops"])
    r = run_tool("preprocess_data.py", "--input", bad, "--tokenizer-model", spm_model, "--output-prefix",
                 str(tmp_path / "o"), "--workers", "2", "--strict")
    assert r.returncode == 1 and f"{bad}:2: invalid JSON" in r.stderr and "Traceback" not in r.stderr
    r = run_tool("preprocess_data.py", "--input", bad, "--tokenizer-model", str(tmp_path / "none.model"),
                 "--output-prefix", str(tmp_path / "o"))
    assert r.returncode == 1 and "none.model does not exist" in r.stderr


def test_truncated_gzip_input(tmp_path, spm_model):
    import gzip

    data = gzip.compress(("\n".join([GOOD] * 2000) + "\n").encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    for workers in (1, 2):
        cfg = PreprocessConfig(inputs=[str(path)], output_prefix=str(tmp_path / "o"), tokenizer_model=spm_model,
                               workers=workers)
        with pytest.raises(DataError, match=rf"cannot read {path}: .*truncated or corrupt .gz"):
            preprocess(cfg, log=lambda m: None)
    assert not list(tmp_path.glob("o*"))


def test_binary_input_is_refused_with_the_count(tmp_path, spm_model):
    """A program given as input (issue 23: /bin/ls became 488 "documents", exit 0) is refused before anything
    is written, with the count of non-text bytes; a text file with one stray byte is still read (line policy)."""
    import shutil
    binary = tmp_path / "ls"
    shutil.copy(shutil.which("ls") or "/bin/ls", binary)
    for workers in (1, 2):
        cfg = PreprocessConfig(inputs=[str(binary)], output_prefix=str(tmp_path / "o"), tokenizer_model=spm_model,
                               workers=workers)
        with pytest.raises(DataError, match=rf"{binary} does not look like text: \d+ of its first 65536 bytes "
                                            r"\(\d+\.\d%\) are not UTF-8 text .* above --max-nontext-fraction 0.01"):
            preprocess(cfg, log=lambda m: None)
    assert not list(tmp_path.glob("o*"))
    res, _ = run(tmp_path, [GOOD] * 50 + [b'{"text": "caf\xe9"}'], spm_model)  # 1 bad byte: counted, not refused
    assert res.stats.counts["non_utf8"] == 1 and res.stats.documents == 51
    # the threshold is the user's: 1.0 turns the check off (the file's lines then go through the line policy)
    cfg = PreprocessConfig(inputs=[str(binary)], output_prefix=str(tmp_path / "o2"), tokenizer_model=spm_model,
                           input=InputConfig(max_nontext_fraction=1.0))
    assert preprocess(cfg, log=lambda m: None).stats.counts.get("non_utf8", 0) > 0
