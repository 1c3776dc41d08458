"""Every tokenizer the pipeline accepts survives the exports with the same ids.

A byte-level BPE tokenizer.json (vocab 300) is trained here by the `tokenizers` library. Through
tools/export_checkpoint.py's tokenizer lookup, tools/generate.py's loader and tools/export_hf.py, the ids of
the exported tokenizer equal the pipeline's HFTokenizer ids on code with unseen Unicode, and the transformers
folder uses transformers' own PreTrainedTokenizerFast (no remote code) with the same end-of-document token.
"""
from __future__ import annotations

import json
import os

import pytest

from megatron_mhmoe.evaluation.generate import load_tokenizer
from megatron_mhmoe.export.huggingface import export_hf
from megatron_mhmoe.export.native import find_tokenizer
from tests.tools.test_evaluate import random_export

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")
TEXTS = ["def f(x):\n    return x + 1\n", "ünïcödé 🦜 beyond the training set\t\r\n", "   "]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def main(args):\n    return args\n" * 20, "class A:\n    pass\n" * 20], trainer)
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    tok.save(path)
    return path


def test_hf_tokenizer_is_found_exported_and_loaded_with_the_same_ids(hf_tokenizer, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from megatron_mhmoe.data.tokenizer import HFTokenizer
    ours = HFTokenizer(hf_tokenizer)
    found = find_tokenizer({"data": {"tokenizer_model": hf_tokenizer}}, None)
    assert found == {"type": "hf", "path": hf_tokenizer, "eod_token": "<|endoftext|>"}
    folder = random_export(str(tmp_path / "ours"), {"type": "hf", "file": "tokenizer.json",
                                                    "eod_token": "<|endoftext|>"},
                           {"tokenizer.json": hf_tokenizer}, vocab_size=ours.vocab_size)
    with open(os.path.join(folder, "config.json")) as f:
        loaded = load_tokenizer(folder, json.load(f), None)
    hf_dir = str(tmp_path / "hf")
    export_hf(folder, hf_dir, log=lambda m: None)
    auto = AutoTokenizer.from_pretrained(hf_dir)  # no trust_remote_code: transformers' own class
    assert isinstance(auto, PreTrainedTokenizerFast) and auto.eos_token_id == ours.eod
    for text in TEXTS:
        assert loaded.encode(text) == ours.encode(text)
        assert auto(text).input_ids == ours.encode(text)
        assert auto.decode(ours.encode(text)) == text
    with open(os.path.join(hf_dir, "config.json")) as f:
        assert json.load(f)["eos_token_id"] == ours.eod
