"""Tokenizers the data pipeline and the model agree on: `vocab_size`, `eod`, `encode`, `decode`.

`SentencePieceTokenizer` wraps a model trained by tools/train_tokenizer.py (end-of-document = the
SentencePiece eos id). `ByteTokenizer` (256 byte ids + EOD) needs no model file: handy for tests.
"""
from __future__ import annotations

import hashlib
import os
from typing import Protocol, Sequence

from megatron_mhmoe.data.errors import DataError
from megatron_mhmoe.data.vocab import check_vocab  # re-exported: the runtime checks its embedding size

__all__ = ["Tokenizer", "SentencePieceTokenizer", "ByteTokenizer", "build_tokenizer", "check_vocab",
           "file_sha256"]


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    vocab_size: int
    eod: int
    sha256: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def file_sha256(path: str) -> str:
    """Hex sha256 of a file (identifies the tokenizer a dataset was made with)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class SentencePieceTokenizer:
    """A SentencePiece model. `eod` is its eos id, appended after each document by --append-eod."""

    def __init__(self, model_path: str) -> None:
        import sentencepiece as spm  # imported here so the rest of the package works without it

        if not os.path.isfile(model_path):
            raise DataError(f"tokenizer model {model_path} does not exist; train one with "
                            "tools/train_tokenizer.py or pass the right --tokenizer-model.")
        self.model_path = model_path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except (OSError, RuntimeError) as e:
            raise DataError(f"{model_path} is not a valid SentencePiece model ({e}); pass the .model file "
                            "written by tools/train_tokenizer.py.") from None
        self.vocab_size: int = int(self.sp.GetPieceSize())
        self.bos: int = int(self.sp.bos_id())
        self.unk: int = int(self.sp.unk_id())
        self.pad: int = int(self.sp.pad_id())
        eos = int(self.sp.eos_id())
        if eos < 0:
            raise DataError(f"tokenizer {model_path} has no eos piece, which the pipeline uses as end-of-document; "
                            "retrain it with tools/train_tokenizer.py (eos_id=2).")
        self.eod: int = eos
        self.sha256: str = file_sha256(model_path)

    def encode(self, text: str) -> list[int]:
        """Token ids of one text (no bos/eos added)."""
        return self.sp.EncodeAsIds(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts; one C++ call (single-threaded: callers parallelise with processes)."""
        return self.sp.Encode(texts, num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids."""
        return self.sp.DecodeIds([int(i) for i in ids])

    def piece(self, token_id: int) -> str:
        """The vocabulary piece of an id (for debugging)."""
        return self.sp.IdToPiece(int(token_id))


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and EOD = 256 (vocab 257). No training, exact round trip."""

    vocab_size = 257
    eod = 256
    sha256 = "byte-tokenizer-v1"
    model_path = "<bytes>"

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of the text."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Bytes of many texts."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of byte ids (EOD ids are dropped; invalid UTF-8 becomes U+FFFD)."""
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def build_tokenizer(tokenizer_type: str, model_path: str | None = None) -> "SentencePieceTokenizer | ByteTokenizer":
    """`sentencepiece` (needs model_path) or `byte`."""
    if tokenizer_type in ("sentencepiece", "SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        if not model_path:
            raise DataError("--tokenizer-model is required for the sentencepiece tokenizer")
        return SentencePieceTokenizer(model_path)
    if tokenizer_type in ("byte", "ByteTokenizer"):
        return ByteTokenizer()
    raise DataError(f"unknown tokenizer type {tokenizer_type!r}; use 'sentencepiece' or 'byte'.")
