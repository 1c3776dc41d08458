"""Checks that token ids in a dataset fit the model's embedding table, and the one check of the run's tokenizer
against the data (check_training_tokenizer, made once before launch by train.py; the export makes the same
comparison through tokenizer_mismatches)."""
from __future__ import annotations

from typing import Sequence

from .errors import DataError
from .indexed import IndexedDataset, meta_path

# Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by (128) * TP; with TP <= 8
# that adds at most 1023 rows. More padding than that almost always means the wrong tokenizer.
DEFAULT_MAX_PADDING = 1024


def check_vocab(tokenizer_vocab: int, model_vocab: int, max_padding: int = DEFAULT_MAX_PADDING) -> None:
    """Raise DataError unless a model with `model_vocab` embedding rows fits a `tokenizer_vocab` tokenizer.

    The model may be larger by up to `max_padding` rows (Megatron-style padding for tensor parallelism);
    smaller would index out of the embedding, much larger signals a different tokenizer.
    """
    if tokenizer_vocab <= 0 or model_vocab <= 0:
        raise DataError(f"vocabulary sizes must be positive: tokenizer {tokenizer_vocab}, model {model_vocab}")
    if model_vocab < tokenizer_vocab:
        raise DataError(f"the tokenizer has {tokenizer_vocab} tokens but the model's embedding has only "
                        f"{model_vocab} rows: token ids >= {model_vocab} would be out of range. Set the model "
                        f"vocab size to at least {tokenizer_vocab} (padded), or use the tokenizer the data was "
                        "made with.")
    if model_vocab - tokenizer_vocab > max_padding:
        raise DataError(f"the model's vocab ({model_vocab}) exceeds the tokenizer's ({tokenizer_vocab}) by "
                        f"{model_vocab - tokenizer_vocab} > {max_padding} padding rows: the model config and the "
                        "tokenizer probably belong to different setups. Set the model vocab size from the "
                        "tokenizer (padded to a multiple of 128 * TP), or raise max_padding if intended.")


def check_dataset_vocab(dataset: IndexedDataset, model_vocab: int, max_padding: int = DEFAULT_MAX_PADDING,
                        scan_without_meta: bool = True) -> None:
    """Check that a tokenized dataset's ids fit the model (which tokenizer made it: check_training_tokenizer).

    With our `.meta.json` sidecar the check is free (vocab size and max token id are recorded). A dataset
    without one (e.g. made by Megatron-LM) is scanned once for its largest id.
    """
    meta = dataset.meta
    if meta is not None:
        if meta.get("vocab_size") is not None:
            try:
                check_vocab(int(meta["vocab_size"]), model_vocab, max_padding)
            except DataError as e:
                raise DataError(f"dataset {dataset.prefix} (tokenizer recorded in {meta_path(dataset.prefix)}): "
                                f"{e}") from None
        max_id = meta.get("max_token_id")
    else:
        max_id = dataset.max_token_id() if scan_without_meta else None
    if max_id is not None and int(max_id) >= model_vocab:
        raise DataError(f"dataset {dataset.prefix} contains token id {max_id}, out of range for a model vocab of "
                        f"{model_vocab}: the data was made with a larger tokenizer. Re-tokenize it or enlarge the "
                        "model vocab.")


def tokenizer_mismatches(tokenizer_path: str, type_name: str, sha256: str, prefixes: Sequence[str]) -> list[str]:
    """One line per dataset whose `.meta.json` records another tokenizer (type or sha256) than the one given.

    Datasets without a sidecar (made by Megatron-LM) record nothing and are not judged."""
    from .indexed import read_meta
    out = []
    for prefix in prefixes:
        meta = read_meta(prefix)
        if not meta or not (meta.get("tokenizer_type") or meta.get("tokenizer_sha256")):
            continue
        kind, digest = meta.get("tokenizer_type"), meta.get("tokenizer_sha256")
        if (kind and kind != type_name) or (digest and digest != sha256):
            made_with = meta.get("tokenizer_model") or f"the built-in {kind} tokenizer"
            out.append(f"dataset {prefix} was tokenized with {made_with} ({kind}, sha256 {str(digest)[:12]}..., "
                       f"recorded in {meta_path(prefix)}), not with {tokenizer_path} ({type_name}, sha256 "
                       f"{sha256[:12]}...)")
    return out


def check_training_tokenizer(tokenizer_model: str, prefixes: Sequence[str], model_vocab: int,
                             allow_mismatch: bool = False) -> list[str]:
    """The run's tokenizer, checked once before launch: it exists, fits the model's embedding, and is the one
    every dataset was made with. Raises DataError; returns warnings (a mismatch the user allowed)."""
    import os

    from .tokenizer import build_tokenizer
    if not os.path.exists(tokenizer_model):
        raise DataError(f"data.tokenizer_model {tokenizer_model!r} does not exist: train one with "
                        f"tools/train_tokenizer.py or point at the model the data was made with")
    tok = build_tokenizer("auto", tokenizer_model)
    if tok.vocab_size > model_vocab:
        raise DataError(f"tokenizer {tokenizer_model} has {tok.vocab_size} pieces but model.vocab_size is "
                        f"{model_vocab}: set --model.vocab_size={tok.vocab_size}")
    found = tokenizer_mismatches(tokenizer_model, tok.type_name, tok.sha256, prefixes)
    if found and not allow_mismatch:
        raise DataError("; ".join(found) + ". Train with the tokenizer the data was made with "
                        "(--data.tokenizer_model=...), or re-tokenize the data with tools/preprocess_data.py; "
                        "--data.allow_tokenizer_mismatch=true trains anyway")
    return [f"{m} (data.allow_tokenizer_mismatch=true)" for m in found]
