"""transformers tokenizer of an exported megatron_mhmoe GPT (copied into the export folder).

The same ids as the run's tokenizer: a SentencePiece model (`tokenizer.model`, encoded with
EncodeAsPieces/PieceToId exactly as preprocessing did) or the byte tokenizer (ids 0..255 = UTF-8 bytes,
256 = end of document). No bos is added: training documents had none.
"""
from __future__ import annotations

import os
import shutil
from typing import Optional

from transformers import PreTrainedTokenizer

EOD_BYTE = "<eod>"


class MHMoETokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: Optional[str] = None, kind: str = "sentencepiece", **kwargs):
        self.kind, self.vocab_file = kind, vocab_file
        if kind == "sentencepiece":
            import sentencepiece as spm
            self.sp = spm.SentencePieceProcessor()
            self.sp.Load(vocab_file)
            eos = self.sp.IdToPiece(self.sp.eos_id())
        elif kind == "byte":
            self.sp, eos = None, EOD_BYTE
        else:
            raise ValueError(f"unknown tokenizer kind {kind!r}: 'sentencepiece' or 'byte'")
        kwargs.setdefault("eos_token", eos)
        kwargs.setdefault("pad_token", eos)
        kwargs.setdefault("padding_side", "left")  # generate() continues the last column: pads go first
        super().__init__(kind=kind, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize() if self.sp is not None else 257

    def get_vocab(self) -> dict:
        return {self._convert_id_to_token(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        if self.sp is not None:
            return self.sp.EncodeAsPieces(text)
        return [f"<0x{b:02X}>" for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int:
        if self.sp is not None:
            return self.sp.PieceToId(token)
        return 256 if token == EOD_BYTE else int(token[3:5], 16)

    def _convert_id_to_token(self, index: int) -> str:
        if self.sp is not None:
            return self.sp.IdToPiece(int(index))
        return EOD_BYTE if index == 256 else f"<0x{int(index):02X}>"

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        if self.sp is not None:
            return self.sp.DecodePieces(tokens)
        data = bytes(int(t[3:5], 16) for t in tokens if t != EOD_BYTE)
        return data.decode("utf-8", errors="replace")

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        return token_ids_0 + (token_ids_1 or [])

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> tuple:
        if self.sp is None:
            return ()
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        if os.path.abspath(out) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
