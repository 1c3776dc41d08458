"""Tokenizers the data pipeline and the model agree on: `vocab_size`, `eod`, `encode`, `decode`.

`SentencePieceTokenizer` wraps a model trained by tools/train_tokenizer.py (end-of-document = the
SentencePiece eos id). `HFTokenizer` wraps a Hugging Face `tokenizer.json` (the `tokenizers` library;
tools/train_tokenizer.py --type hf-bpe trains one). `ByteTokenizer` (256 byte ids + EOD) needs no
model file: handy for tests. `build_tokenizer("auto", path)` picks the class from the file.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional, Protocol, Sequence

from megatron_mhmoe.data.errors import DataError
from megatron_mhmoe.data.vocab import check_vocab  # re-exported: the runtime checks its embedding size

__all__ = ["Tokenizer", "SentencePieceTokenizer", "HFTokenizer", "ByteTokenizer", "build_tokenizer", "check_vocab",
           "file_sha256", "resolve_tokenizer_type", "TOKENIZER_TYPES"]

# Accepted --tokenizer-type values; the Megatron-LM class names are kept as aliases.
SENTENCEPIECE_TYPES = ("sentencepiece", "SentencePieceTokenizer", "GPTSentencePieceTokenizer")
HF_TYPES = ("hf", "huggingface", "HuggingFaceTokenizer")
BYTE_TYPES = ("byte", "ByteTokenizer")
TOKENIZER_TYPES = ("auto",) + SENTENCEPIECE_TYPES + HF_TYPES + BYTE_TYPES
HF_FILE = "tokenizer.json"
# Looked up in this order when a tokenizer.json names no eos token (GPT-2/Llama/Gemma conventions).
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>", "[EOS]")


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    vocab_size: int
    eod: int
    sha256: str
    type_name: str

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

    type_name = "sentencepiece"

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
    type_name = "byte"

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of the text."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Bytes of many texts."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of byte ids (EOD ids are dropped; invalid UTF-8 becomes U+FFFD)."""
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def _hf_file(path: str) -> Optional[str]:
    """The tokenizer.json that `path` names (the file itself or one inside the folder), else None."""
    if os.path.isdir(path):
        inner = os.path.join(path, HF_FILE)
        return inner if os.path.isfile(inner) else None
    return path if path.endswith(".json") else None


def _eos_from_config(folder: str) -> Optional[tuple[str, str]]:
    """(eos token, file) from the transformers files that sit beside a tokenizer.json, if any names one."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token")
        except (OSError, ValueError, AttributeError) as e:
            raise DataError(f"{path} is not a readable JSON object ({e}); fix or remove it") from None
        if isinstance(eos, dict):  # the AddedToken form: {"content": "</s>", ...}
            eos = eos.get("content")
        if isinstance(eos, str) and eos:
            return eos, path
    return None


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json (byte-level BPE from tools/train_tokenizer.py, or any other).

    `vocab_size` is the largest id + 1 (added tokens included), so every id it can emit fits the model's
    embedding and the dataset dtype even when the vocabulary has gaps. `eod`: `eod_token` when given, else
    the `eos_token` of a tokenizer_config.json / special_tokens_map.json beside the file, else the first of
    EOD_CANDIDATES in the vocabulary; none of these is an error naming --eod-token. Encoding adds no
    special tokens (the pipeline appends EOD itself); decoding drops EOD and keeps other special tokens.
    """

    type_name = "hf"

    def __init__(self, path: str, eod_token: Optional[str] = None) -> None:
        if not os.path.exists(path):
            raise DataError(f"tokenizer {path} does not exist; train one with tools/train_tokenizer.py --type hf-bpe "
                            "or pass the right --tokenizer-model.")
        file = _hf_file(path)
        if file is None:
            raise DataError(f"{path} is a folder without a {HF_FILE}; pass the tokenizer.json file or its folder.")
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError:
            raise DataError(f"{file} is a Hugging Face tokenizer, which needs the 'tokenizers' package: "
                            "pip install -r requirements.txt") from None
        try:
            self.tk = _HF.from_file(file)
        except Exception as e:  # the library raises its own Exception subclass for every parse error
            why = (str(e).splitlines() or [type(e).__name__])[0]
            raise DataError(f"{file} is not a valid Hugging Face tokenizer.json ({why}); pass "
                            "the file written by tools/train_tokenizer.py --type hf-bpe or by tokenizers' "
                            "Tokenizer.save.") from None
        self.model_path = file
        vocab = self.tk.get_vocab(with_added_tokens=True)
        if not vocab:
            raise DataError(f"tokenizer {file} has an empty vocabulary")
        self.vocab_size: int = max(vocab.values()) + 1
        self.eod: int = self._find_eod(file, eod_token)
        self.eod_token: str = self.tk.id_to_token(self.eod)
        self.sha256: str = file_sha256(file)

    def _specials(self) -> list[str]:
        return [t.content for _, t in sorted(self.tk.get_added_tokens_decoder().items()) if t.special]

    def _find_eod(self, file: str, eod_token: Optional[str]) -> int:
        def known(what: str, token: str) -> int:
            tid = self.tk.token_to_id(token)
            if tid is None:
                shown = ", ".join(self._specials()[:20]) or "none"
                raise DataError(f"{what} {token!r} is not a token of {file} (its special tokens: {shown}); "
                                "pass one of them with --eod-token.")
            return int(tid)

        if eod_token:
            return known("--eod-token", eod_token)
        found = _eos_from_config(os.path.dirname(os.path.abspath(file)))
        if found is not None:
            return known(f"eos_token of {found[1]}", found[0])
        for token in EOD_CANDIDATES:
            tid = self.tk.token_to_id(token)
            if tid is not None:
                return int(tid)
        shown = ", ".join(self._specials()[:20]) or "none"
        raise DataError(f"tokenizer {file} has no end-of-document token: no eos_token in a tokenizer_config.json "
                        f"beside it and none of {', '.join(EOD_CANDIDATES)} in its vocabulary (special tokens: "
                        f"{shown}). Pass --eod-token TOKEN to tools/preprocess_data.py, or set \"eos_token\" in a "
                        "tokenizer_config.json next to it (which training reads too).")

    def encode(self, text: str) -> list[int]:
        """Token ids of one text (no special tokens added)."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts (the library's threads unless TOKENIZERS_PARALLELISM=false)."""
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids; EOD ids are dropped, as the other tokenizers drop theirs."""
        return self.tk.decode([int(i) for i in ids if int(i) != self.eod], skip_special_tokens=False)

    def piece(self, token_id: int) -> str:
        """The vocabulary entry of an id (for debugging)."""
        return self.tk.id_to_token(int(token_id))


def resolve_tokenizer_type(tokenizer_type: str, model_path: Optional[str] = None) -> str:
    """'sentencepiece', 'hf' or 'byte' for a --tokenizer-type (alias or 'auto') and a tokenizer path.

    auto: no path -> error; a .json file or a folder holding tokenizer.json -> hf; anything else ->
    sentencepiece (whose loader explains a file that is not a model).
    """
    if tokenizer_type in BYTE_TYPES:
        return "byte"
    if tokenizer_type in HF_TYPES:
        return "hf"
    if tokenizer_type in SENTENCEPIECE_TYPES:
        if model_path and _hf_file(model_path) is not None and os.path.exists(model_path):
            raise DataError(f"{model_path} is a Hugging Face tokenizer, not a SentencePiece model: use "
                            "--tokenizer-type auto (or hf).")
        return "sentencepiece"
    if tokenizer_type == "auto":
        if not model_path:
            raise DataError("--tokenizer-model is required (a SentencePiece .model, a tokenizer.json or a folder "
                            "holding one), or pass --tokenizer-type byte")
        return "hf" if _hf_file(model_path) is not None else "sentencepiece"
    raise DataError(f"unknown tokenizer type {tokenizer_type!r}; use 'auto', 'sentencepiece', 'hf' or 'byte'.")


def build_tokenizer(tokenizer_type: str, model_path: str | None = None, eod_token: str | None = None
                    ) -> "SentencePieceTokenizer | HFTokenizer | ByteTokenizer":
    """The tokenizer of a --tokenizer-type and --tokenizer-model (see resolve_tokenizer_type).

    `eod_token` names the HF tokenizer's end-of-document token; SentencePiece and bytes have a fixed one.
    """
    kind = resolve_tokenizer_type(tokenizer_type, model_path)
    if eod_token and kind != "hf":
        raise DataError(f"--eod-token applies to Hugging Face tokenizers only: the {kind} tokenizer's EOD is fixed "
                        "(SentencePiece: its eos piece; bytes: 256)")
    if kind == "byte":
        return ByteTokenizer()
    if not model_path:
        raise DataError(f"--tokenizer-model is required for the {kind} tokenizer")
    if kind == "hf":
        return HFTokenizer(model_path, eod_token=eod_token)
    return SentencePieceTokenizer(model_path)
