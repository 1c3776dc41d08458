"""The one check of the run's tokenizer (data/vocab.py check_training_tokenizer): its messages name the problem
and the fix, and the package makes it in one place (train.py, before launch)."""
from __future__ import annotations

import ast
import json
import os

import pytest

from megatron_mhmoe.data.errors import DataError
from megatron_mhmoe.data.tokenizer import build_tokenizer
from megatron_mhmoe.data.vocab import check_training_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def tokenizers(tmp_path):
    """Two different word-level tokenizer.json files (5 pieces each) and a dataset sidecar made with the first."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    paths = []
    for i, word in enumerate(("def", "class")):
        tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1, word: 2, "x": 3, "y": 4},
                                         unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.save(str(tmp_path / f"tok{i}.json"))
        paths.append(str(tmp_path / f"tok{i}.json"))
    made = build_tokenizer("auto", paths[0])
    prefix = str(tmp_path / "d_text_document")
    with open(prefix + ".meta.json", "w") as f:
        json.dump({"tokenizer_type": made.type_name, "tokenizer_sha256": made.sha256, "tokenizer_model": paths[0]},
                  f)
    return paths, prefix


def test_messages_name_the_problem_and_the_fix(tokenizers, tmp_path):
    (made, other), prefix = tokenizers
    missing = str(tmp_path / "nope.model")
    with pytest.raises(DataError, match=rf"data.tokenizer_model '{missing}' does not exist: train one with "
                                        r"tools/train_tokenizer.py"):
        check_training_tokenizer(missing, [prefix], 300)
    vocab = build_tokenizer("auto", made).vocab_size
    with pytest.raises(DataError, match=rf"has {vocab} pieces but model.vocab_size is 4: set "
                                        rf"--model.vocab_size={vocab}"):
        check_training_tokenizer(made, [prefix], 4)
    with pytest.raises(DataError, match=rf"dataset {prefix} was tokenized with {made} .*not with {other} .*Train "
                                        r"with the tokenizer the data was made with .*allow_tokenizer_mismatch=true"):
        check_training_tokenizer(other, [prefix], 300)
    warnings = check_training_tokenizer(other, [prefix], 300, allow_mismatch=True)
    assert len(warnings) == 1 and warnings[0].endswith("(data.allow_tokenizer_mismatch=true)")
    assert check_training_tokenizer(made, [prefix], 300) == []  # the data's own tokenizer


def test_the_package_checks_the_tokenizer_once():
    """One call site of the check (train.py's pre-launch data check), and no other comparison of a dataset's
    recorded tokenizer hash outside data/vocab.py (the export reuses its tokenizer_mismatches)."""
    calls, compares = [], []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "megatron_mhmoe")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
            tree = ast.parse(open(path, encoding="utf-8").read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) \
                        == "check_training_tokenizer":
                    calls.append(rel)
                if isinstance(node, ast.Compare) and any(isinstance(c, ast.Constant) and c.value == "tokenizer_sha256"
                                                         for c in ast.walk(node)):
                    compares.append(rel)
                if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "get" and node.args
                        and isinstance(node.args[0], ast.Constant) and node.args[0].value == "tokenizer_sha256"):
                    compares.append(rel)
    assert calls == ["megatron_mhmoe/train.py"]
    # preprocess.py reads the hash to reuse finished partitions (same tokenizer): not a check of the run's.
    assert sorted(set(compares)) == ["megatron_mhmoe/data/preprocess.py", "megatron_mhmoe/data/vocab.py"]
