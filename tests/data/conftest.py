"""Shared fixtures: a tiny code corpus and a tiny SentencePiece model trained on it (once per session)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig

import pytest

from megatron_mhmoe.data.spm_train import TokenizerTrainConfig, train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable

# Edge cases every code tokenizer must round-trip exactly.
TRICKY = ["  leading spaces", "\ttab\tseparated\n", "trailing   \n\n\n", "unicode é ß 日本 😀", "x = {'a': [1, 2]}\r\n",
          " ", "\n"]


def stdlib_docs(max_chars: int = 150_000) -> list[str]:
    """A few small stdlib sources (deterministic)."""
    root = sysconfig.get_paths()["stdlib"]
    docs, total = [], 0
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        try:
            with open(os.path.join(root, name), encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        if 500 < len(text) < 20_000:
            docs.append(text)
            total += len(text)
            if total > max_chars:
                break
    return docs


def write_jsonl(path: str, records: list) -> str:
    """Write dicts (or raw str lines) as JSONL."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def run_tool(tool: str, *args: str) -> subprocess.CompletedProcess:
    """Run tools/<tool> in a subprocess, capturing output."""
    return subprocess.run([PY, os.path.join(REPO, "tools", tool), *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


@pytest.fixture(scope="session")
def docs() -> list[str]:
    return stdlib_docs() + TRICKY


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, docs) -> str:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    return write_jsonl(str(path), [{"text": d, "path": f"doc{i}.py"} for i, d in enumerate(docs)])


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory, corpus) -> str:
    prefix = str(tmp_path_factory.mktemp("tok") / "tiny")
    res = train_tokenizer(TokenizerTrainConfig(inputs=[corpus], model_prefix=prefix, vocab_size=600,
                                               num_threads=1), log=lambda m: None)
    assert res.roundtrip_failed == 0
    return res.model_path
