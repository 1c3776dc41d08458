#!/usr/bin/env python
"""Sample text from a model exported by tools/export_checkpoint.py (megatron_mhmoe/evaluation/generate.py; --help)."""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megatron_mhmoe.evaluation import generate as G  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=G.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="folder written by tools/export_checkpoint.py")
    p.add_argument("--prompt", default="", help="text to continue (empty: start from end-of-document)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperature/top-k/seed)")
    p.add_argument("--temperature", type=float, default=1.0, help="> 0; lower is more conservative")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--tokenizer", default=None,
                   help="'byte', a SentencePiece .model or a tokenizer.json (default: the export's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--ids", action="store_true", help="also print the generated token ids")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole window every token (no KV cache)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.temperature <= 0 and not args.greedy:
        print("error: --temperature must be > 0 (or use --greedy)", file=sys.stderr)
        return 2
    try:
        model, info = G.load_model(args.model, args.device)
        tok = G.load_tokenizer(args.model, info, args.tokenizer)
        prompt = G.prompt_ids(tok, args.prompt, model.config.vocab_size)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    new = G.generate(model, prompt, args.max_new_tokens, args.greedy, args.temperature, args.top_k, args.seed,
                     getattr(tok, "eod", None), use_cache=not args.no_cache)
    print(args.prompt + tok.decode(new), flush=True)
    if args.ids:
        print(f"ids: {new}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
