#!/usr/bin/env python
"""Tokenize JSONL or text into Megatron-LM `.bin/.idx` datasets (byte-compatible with Megatron-LM).

Example:
  python tools/preprocess_data.py --input corpus.jsonl --json-keys text \\
      --tokenizer-model tok.model --append-eod --output-prefix data/corpus --workers 8
writes data/corpus_text_document.{bin,idx} (+ .meta.json, a sidecar Megatron ignores) for training
with --data.data_path=[data/corpus_text_document] (not Megatron's --data-path). --tokenizer-model may also be a Hugging Face tokenizer.json
(or a folder holding one); its EOD is its eos token, else a token like </s> or <|endoftext|>, else
--eod-token. Progress is a bar on a terminal and a line every --log-interval documents otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megatron_mhmoe.data.errors import DataError  # noqa: E402
from megatron_mhmoe.data.input_args import BAD_INPUT_POLICY, add_input_arguments, input_config  # noqa: E402
from megatron_mhmoe.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from megatron_mhmoe.data.tokenizer import TOKENIZER_TYPES  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, epilog=BAD_INPUT_POLICY,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_arguments(p.add_argument_group("input"), "JSON keys to tokenize; one output dataset per key "
                                                       "(default: text)")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", default="auto", choices=list(TOKENIZER_TYPES),
                   help="auto (default: by --tokenizer-model: .json or a folder holding tokenizer.json -> hf, "
                        "else sentencepiece), sentencepiece, hf, or byte (UTF-8 bytes, EOD=256, no model)")
    g.add_argument("--tokenizer-model",
                   help="SentencePiece .model or Hugging Face tokenizer.json (or its folder) from "
                        "tools/train_tokenizer.py")
    g.add_argument("--eod-token", default=None,
                   help="Hugging Face tokenizers: the token appended as end-of-document (default: the eos_token "
                        "of a tokenizer_config.json beside it, else </s>, <|endoftext|>, <eos>, ... if present)")
    g.add_argument("--append-eod", action="store_true", help="append the EOD (eos) id after each document")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True,
                   help="writes <prefix>_<key>_document.bin/.idx/.meta.json")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="tokenizer worker processes (default: cores - 1)")
    g.add_argument("--partitions", type=int, default=1,
                   help="split the input files into N groups, each written as its own dataset (finished ones "
                        "are reused when a crashed run is restarted), then merged")
    g.add_argument("--keep-partitions", action="store_true", help="keep the per-partition datasets")
    g.add_argument("--log-interval", type=int, default=1000, help="progress line every N documents (lines mode)")
    g.add_argument("--progress", choices=["auto", "bar", "lines"], default="auto",
                   help="auto (default): a progress bar when stderr is a terminal, else periodic lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = PreprocessConfig(
            inputs=args.input, output_prefix=args.output_prefix, tokenizer_type=args.tokenizer_type,
            tokenizer_model=args.tokenizer_model, eod_token=args.eod_token, append_eod=args.append_eod,
            workers=args.workers, log_interval=args.log_interval, progress=args.progress, partitions=args.partitions,
            keep_partitions=args.keep_partitions, input=input_config(args))
        result = preprocess(cfg)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for key, prefix in result.outputs.items():
        print(f"{key}: {prefix}.bin / .idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
