"""tools/preprocess_data.py and tools/merge_datasets.py end to end."""
from __future__ import annotations

import gzip
import json
import os
import shutil

import numpy as np

from megatron_mhmoe.data.indexed import IndexedDataset
from megatron_mhmoe.data.input_reader import InputConfig
from megatron_mhmoe.data.preprocess import PreprocessConfig, preprocess
from megatron_mhmoe.data.tokenizer import SentencePieceTokenizer

from .conftest import run_tool, write_jsonl

QUIET = dict(log=lambda m: None)


def run(inputs, out, model, **kw) -> dict:
    input_cfg = InputConfig(**kw.pop("input", {}))
    res = preprocess(PreprocessConfig(inputs=inputs, output_prefix=out, tokenizer_model=model, input=input_cfg, **kw),
                     **QUIET)
    return res.outputs


def test_text_to_tokens_to_bin_idx_round_trip(tmp_path, corpus, spm_model, docs):
    tok = SentencePieceTokenizer(spm_model)
    out = run([corpus], str(tmp_path / "c"), spm_model, append_eod=True, workers=2, chunk_bytes=4096)
    ds = IndexedDataset(out["text"])
    kept = [d for d in docs if d]
    assert len(ds) == len(kept) and ds.dtype == np.uint16
    for i, d in enumerate(kept):
        assert ds[i].tolist() == tok.encode(d) + [tok.eod]  # order preserved across workers
        assert tok.decode(ds[i][:-1]) == d
    meta = ds.meta
    assert meta["vocab_size"] == 600 and meta["eod"] == 2 and meta["tokenizer_sha256"] == tok.sha256
    assert meta["max_token_id"] == ds.max_token_id() and meta["num_tokens"] == ds.num_tokens
    # one worker gives the very same bytes
    out1 = run([corpus], str(tmp_path / "one"), spm_model, append_eod=True, workers=1)
    for ext in (".bin", ".idx"):
        assert open(out1["text"] + ext, "rb").read() == open(out["text"] + ext, "rb").read()


def test_gzip_multiple_keys_and_text_input(tmp_path, spm_model):
    tok = SentencePieceTokenizer(spm_model)
    recs = [{"text": f"def f{i}():\n    return {i}\n", "title": f"f{i}"} for i in range(50)]
    path = tmp_path / "in.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    out = run([str(path)], str(tmp_path / "g"), spm_model, input={"json_keys": ("text", "title")})
    assert sorted(out) == ["text", "title"] and out["title"].endswith("g_title_document")
    for key in ("text", "title"):
        ds = IndexedDataset(out[key])
        assert [tok.decode(x) for x in ds] == [r[key] for r in recs]
    txt = tmp_path / "in.txt"
    txt.write_text("first line\n\nsecond line\n")
    ds = IndexedDataset(run([str(txt)], str(tmp_path / "t"), spm_model)["text"])
    assert [tok.decode(x) for x in ds] == ["first line", "second line"]
    ds = IndexedDataset(run([str(txt)], str(tmp_path / "f"), spm_model, input={"text_doc": "file"})["text"])
    assert [tok.decode(x) for x in ds] == ["first line\n\nsecond line\n"]


def test_partitions_match_single_run_and_merge_tool(tmp_path, corpus, spm_model):
    parts = []
    for i in range(3):
        p = tmp_path / f"part{i}.jsonl"
        shutil.copy(corpus, p)
        parts.append(str(p))
    single = run(parts, str(tmp_path / "single"), spm_model, append_eod=True)["text"]
    parted = run(parts, str(tmp_path / "parted"), spm_model, append_eod=True, partitions=3)["text"]
    for ext in (".bin", ".idx"):
        assert open(single + ext, "rb").read() == open(parted + ext, "rb").read()
    assert not list(tmp_path.glob("parted_part*"))  # partitions removed after merging
    # kept partitions are reused by a rerun (e.g. after a crash)
    logs: list = []
    cfg = PreprocessConfig(inputs=parts, output_prefix=str(tmp_path / "kept"), tokenizer_model=spm_model,
                           append_eod=True, partitions=3, keep_partitions=True)
    preprocess(cfg, log=logs.append)
    os.remove(str(tmp_path / "kept_part001_text_document.idx"))  # as if the run died in partition 2
    logs.clear()
    out = preprocess(cfg, log=logs.append).outputs["text"]
    assert sum("reusing finished" in m for m in logs) == 2
    assert open(out + ".bin", "rb").read() == open(single + ".bin", "rb").read()
    # merge tool: two single-file datasets -> same as the 2-file run
    a = run(parts[:1], str(tmp_path / "a"), spm_model, append_eod=True)["text"]
    b = run(parts[1:2], str(tmp_path / "b"), spm_model, append_eod=True)["text"]
    ab = run(parts[:2], str(tmp_path / "ab"), spm_model, append_eod=True)["text"]
    r = run_tool("merge_datasets.py", "--input", a, b + ".bin", "--output-prefix", str(tmp_path / "merged"))
    assert r.returncode == 0, r.stderr
    for ext in (".bin", ".idx"):
        assert open(str(tmp_path / "merged") + ext, "rb").read() == open(ab + ext, "rb").read()


def test_cli_progress_and_help(tmp_path, corpus, spm_model):
    r = run_tool("preprocess_data.py", "--help")
    assert r.returncode == 0
    for flag in ("--input", "--json-keys", "--tokenizer-model", "--append-eod", "--output-prefix", "--workers",
                 "--log-interval", "--partitions", "--strict", "--max-doc-chars", "bad input policy", "U+FFFD"):
        assert flag in r.stdout, flag
    r = run_tool("preprocess_data.py", "--input", corpus, "--tokenizer-model", spm_model, "--append-eod",
                 "--output-prefix", str(tmp_path / "cli"), "--workers", "2", "--log-interval", "5")
    assert r.returncode == 0, r.stderr
    progress = [line for line in r.stderr.splitlines() if line.startswith("processed ")]
    assert len(progress) >= 1 and all("docs/s" in line and "MB/s" in line for line in progress)
    assert IndexedDataset(str(tmp_path / "cli_text_document")).num_documents > 5


def test_byte_tokenizer_needs_no_model(tmp_path):
    path = write_jsonl(str(tmp_path / "b.jsonl"), [{"text": "héllo"}])
    res = preprocess(PreprocessConfig(inputs=[path], output_prefix=str(tmp_path / "b"), tokenizer_type="byte",
                                      append_eod=True), **QUIET)
    assert IndexedDataset(res.outputs["text"])[0].tolist() == list("héllo".encode()) + [256]
