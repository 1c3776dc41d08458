"""tools/build_corpus.py: a deterministic stdlib JSONL corpus, no download."""
from __future__ import annotations

import itertools
import json
import sysconfig

from megatron_mhmoe.data.corpus import iter_sources

from .conftest import run_tool


def test_build_corpus_is_deterministic_and_bounded(tmp_path):
    outs = []
    for name in ("a.jsonl", "b.jsonl"):
        r = run_tool("build_corpus.py", "--out", str(tmp_path / name), "--max-mb", "0.3")
        assert r.returncode == 0, r.stderr
        assert "wrote" in r.stderr
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1] and 0 < len(outs[0]) <= 300_000
    recs = [json.loads(line) for line in outs[0].decode().splitlines()]
    assert recs and all(set(r) == {"text", "path"} and r["path"].endswith(".py") for r in recs)
    walk = [rel for rel, _ in itertools.islice(iter_sources(sysconfig.get_paths()["stdlib"]), len(recs))]
    assert [r["path"] for r in recs] == walk  # sorted walk order, stopping at the size limit
    r = run_tool("build_corpus.py", "--out", str(tmp_path / "x2.jsonl"), "--max-mb", "0.1", "--repeat", "2")
    assert r.returncode == 0
    half = (tmp_path / "x2.jsonl").read_bytes()
    assert half[: len(half) // 2] == half[len(half) // 2:]
    assert "--max-mb" in run_tool("build_corpus.py", "--help").stdout
