"""The built-in dataset of the README's main job: this machine's Python stdlib, tokenized, no download.

Three steps, each skipped when its output exists (so a second run reuses them):
1. corpus.jsonl from the standard library sources (megatron_mhmoe.data.corpus);
2. a SentencePiece BPE tokenizer trained on it (code preset: exact round trip);
3. Megatron .bin/.idx files with an EOD after every document.
"""
from __future__ import annotations

import os
import sys

from megatron_mhmoe.data.corpus import build_corpus
from megatron_mhmoe.data.preprocess import PreprocessConfig, output_prefix_for, preprocess
from megatron_mhmoe.data.spm_train import TokenizerTrainConfig, train_tokenizer


def _log(msg: str) -> None:
    print(f"[data] {msg}", file=sys.stderr, flush=True)


def prepare_builtin_data(data_dir: str, vocab_size: int = 2048, max_mb: float = 4.0,
                         workers: int = 2) -> tuple[str, str]:
    """Returns (data prefix, tokenizer model path)."""
    os.makedirs(data_dir, exist_ok=True)
    corpus = os.path.join(data_dir, "corpus.jsonl")
    tok_prefix = os.path.join(data_dir, f"spm_bpe_{vocab_size}")
    out_prefix = os.path.join(data_dir, f"stdlib_bpe_{vocab_size}")  # token files belong to one tokenizer
    data_prefix = output_prefix_for(out_prefix, "text")
    if not os.path.exists(corpus):
        docs, nbytes = build_corpus(corpus, max_mb=max_mb)
        _log(f"built corpus {corpus}: {docs} documents, {nbytes / 1e6:.1f} MB of Python stdlib source")
    if not os.path.exists(tok_prefix + ".model"):
        res = train_tokenizer(TokenizerTrainConfig(inputs=[corpus], model_prefix=tok_prefix, vocab_size=vocab_size,
                                                   model_type="bpe", verify_docs=20), log=_log)
        _log(f"trained tokenizer {res.model_path} (vocab {res.vocab_size})")
    if not os.path.exists(data_prefix + ".idx"):
        preprocess(PreprocessConfig(inputs=[corpus], output_prefix=out_prefix, tokenizer_model=tok_prefix + ".model",
                                    append_eod=True, workers=workers, log_interval=2000), log=_log)
    return data_prefix, tok_prefix + ".model"
