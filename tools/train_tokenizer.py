#!/usr/bin/env python
"""Train a SentencePiece tokenizer (BPE or unigram) or a Hugging Face byte-level BPE on JSONL or text files.

Example:
  python tools/train_tokenizer.py --input corpus.jsonl --model-prefix tok/code8k --vocab-size 8000
writes tok/code8k.model (+ .vocab). The default 'code' preset gives an exact round trip of source
code (byte fallback, identity normalisation, whitespace kept, '\\n' and '\\t' as pieces).
Ids: unk 0, bos 1, eos 2 (the datasets' end-of-document, EOD), pad 3, then user-defined symbols.

  python tools/train_tokenizer.py --type hf-bpe --input corpus.jsonl --model-prefix tok/hf8k --vocab-size 8000
writes the folder tok/hf8k/ with tokenizer.json (the `tokenizers` library's byte-level BPE: every text
round-trips exactly under the code preset) and tokenizer_config.json. Ids: <|endoftext|> 0 (EOD), then the
user-defined symbols, the 256 byte symbols and the merges. Pass the folder or its tokenizer.json to
tools/preprocess_data.py --tokenizer-model, and the tokenizer.json to training as data.tokenizer_model.

Large corpora are streamed and uniformly subsampled to --max-sentences sentences.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megatron_mhmoe.data.errors import DataError  # noqa: E402
from megatron_mhmoe.data.input_args import add_input_arguments, input_config  # noqa: E402
from megatron_mhmoe.data.spm_train import (PRESETS, TokenizerTrainConfig, train_hf_tokenizer,  # noqa: E402
                                            train_tokenizer)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Bad input lines follow tools/preprocess_data.py's policy (see its --help).")
    add_input_arguments(p)
    p.add_argument("--type", choices=["sentencepiece", "hf-bpe"], default="sentencepiece",
                   help="sentencepiece (default) or hf-bpe: a byte-level BPE tokenizer.json (Hugging Face tokenizers)")
    p.add_argument("--model-prefix", required=True,
                   help="output: <prefix>.model and <prefix>.vocab; with --type hf-bpe the folder <prefix>/ "
                        "(tokenizer.json, tokenizer_config.json)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="SentencePiece model type")
    p.add_argument("--preset", choices=sorted(PRESETS), default="code",
                   help="code: exact round trip of source (default); text: NFKC, folded whitespace")
    fb = p.add_mutually_exclusive_group()
    fb.add_argument("--byte-fallback", dest="byte_fallback", action="store_true", default=None,
                    help="encode unknown characters as UTF-8 byte pieces (preset default: on)")
    fb.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false")
    p.add_argument("--user-defined-symbols", nargs="*", default=[],
                   help="extra special tokens kept whole when they occur in text, e.g. '<|fim_prefix|>'")
    p.add_argument("--control-symbols", nargs="*", default=[],
                   help="extra reserved ids never produced by encode")
    p.add_argument("--max-sentences", type=int, default=300_000,
                   help="reservoir sample size (sentences = documents cut at newlines into <= 4 KB pieces)")
    p.add_argument("--max-sentence-bytes", type=int, default=4096)
    p.add_argument("--seed", type=int, default=1234, help="sampling seed")
    p.add_argument("--num-threads", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--log-interval", type=int, default=10_000, help="progress line every N documents read")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = TokenizerTrainConfig(
            inputs=args.input, model_prefix=args.model_prefix, vocab_size=args.vocab_size,
            model_type=args.model_type, preset=args.preset, byte_fallback=args.byte_fallback,
            user_defined_symbols=args.user_defined_symbols, control_symbols=args.control_symbols,
            max_sentences=args.max_sentences, max_sentence_bytes=args.max_sentence_bytes, seed=args.seed,
            num_threads=args.num_threads, log_interval=args.log_interval, input=input_config(args))
        result = (train_hf_tokenizer if args.type == "hf-bpe" else train_tokenizer)(cfg)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(result.model_path)
    return 0 if result.roundtrip_failed == 0 else 2


if __name__ == "__main__":
    sys.exit(main())
