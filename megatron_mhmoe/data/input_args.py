"""The corpus-reading options of the commands that read raw text (tools/preprocess_data.py,
tools/train_tokenizer.py), defined once: the same flags, help and bad-input policy for both, and the
InputConfig they make."""
from __future__ import annotations

import argparse

from .input_reader import InputConfig

BAD_INPUT_POLICY = """\
bad input policy (counts and the first locations are printed as warnings at the end):
  invalid JSON / not an object / missing --json-keys key or non-string value: line skipped
  non-UTF-8 bytes: decoded with U+FFFD replacement characters, counted
  NUL characters: removed from the text, counted
  document longer than --max-doc-chars characters: skipped; a raw line longer than
      6 * --max-doc-chars bytes is skipped without being read into memory
  empty documents: skipped
  --strict turns every case above except empty documents into an error naming file:line.
  No documents at all (empty input, or everything skipped) is always an error.
  A file whose first 64 KiB are more than --max-nontext-fraction non-text bytes (a program, an archive) is
      refused before anything is written, with the count.
"""


def add_input_arguments(g, json_keys_help: str = "JSON keys holding text (default: text)") -> None:
    """--input, --json-keys, --input-format, --text-doc, --max-doc-chars, --strict, --max-nontext-fraction."""
    g.add_argument("--input", nargs="+", required=True,
                   help="JSONL or text files, directories or globs; .gz is decompressed on the fly")
    g.add_argument("--json-keys", nargs="+", default=["text"], help=json_keys_help)
    g.add_argument("--input-format", choices=["auto", "jsonl", "text"], default="auto",
                   help="auto: by extension (.jsonl/.json -> jsonl, .txt -> text), else by the first line")
    g.add_argument("--text-doc", choices=["line", "file"], default="line",
                   help="text input: each non-empty line is a document (line) or each file is one (file)")
    g.add_argument("--max-doc-chars", type=int, default=50_000_000,
                   help="skip (count) documents longer than this many characters (default 50M)")
    g.add_argument("--strict", action="store_true", help="fail on the first bad line instead of skipping it")
    g.add_argument("--max-nontext-fraction", type=float, default=0.01,
                   help="refuse an input whose first 64 KiB are more than this share non-text bytes "
                        "(undecodable UTF-8, NUL and other control bytes): a program or archive, not a corpus "
                        "(default 0.01; 1 turns the check off)")


def input_config(args: argparse.Namespace) -> InputConfig:
    """The InputConfig of parsed add_input_arguments options."""
    return InputConfig(json_keys=tuple(args.json_keys), input_format=args.input_format, text_doc=args.text_doc,
                       max_doc_chars=args.max_doc_chars, strict=args.strict,
                       max_nontext_fraction=args.max_nontext_fraction)
