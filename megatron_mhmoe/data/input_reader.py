"""Streaming reader for JSONL / plain-text corpora with an explicit bad-input policy.

Policy (shared by tools/preprocess_data.py and tools/train_tokenizer.py):
- invalid JSON line, a line that is not a JSON object, a missing key or a non-string value:
  the line is skipped and counted; a warning with the first locations is printed at the end.
  With strict=True the first such line raises DataError naming file:line.
- bytes that are not UTF-8: decoded with errors='replace' (U+FFFD) and counted (strict: error).
- lone UTF-16 surrogates (JSON escapes like \\ud800 without their pair): replaced with U+FFFD and counted
  (strict: error); they cannot be encoded as UTF-8, so no tokenizer can take them.
- NUL characters (raw or \\u0000): removed from the text and counted (strict: error). They are almost
  always binary junk and some tools truncate strings at NUL.
- a document longer than max_doc_chars characters: skipped and counted (strict: error). A raw line
  longer than line_byte_limit(max_doc_chars) bytes is skipped *without being held in memory*: lines are
  read with a bounded readline, so one huge line cannot exhaust memory.
- empty documents (no text after the above): skipped and counted (no error even with strict).
- gzip input (`*.gz`) is decompressed on the fly.
- a file that is not text at all (a program, an image, an archive): its first 64 KiB are sniffed and the
  file is refused (DataError with the count) when more than max_nontext_fraction of those bytes (and at
  least NONTEXT_MIN) are not
  text (undecodable as UTF-8, or control bytes other than tab, newline, carriage return, form feed and
  escape), instead of becoming thousands of "documents" of junk.
Documents are lines of a JSONL file (one per key in json_keys), lines of a text file (text_doc='line')
or whole text files (text_doc='file').
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator, Optional, Sequence

from .errors import DataError

JSONL_EXTS = (".jsonl", ".json", ".ndjson")
TEXT_EXTS = (".txt", ".text", ".py", ".md")
MAX_EXAMPLES = 3  # locations kept per problem kind for the end-of-run warning

# Problem kinds, in reporting order, with the fix printed in the warning.
PROBLEMS = {
    "invalid_json": "lines that are not valid JSON objects were skipped",
    "missing_key": "lines without a string value for a requested --json-keys key were skipped",
    "non_utf8": "lines had bytes that are not UTF-8; they were decoded with U+FFFD replacement characters",
    "nul": "documents contained NUL characters, which were removed",
    "surrogate": "documents contained lone UTF-16 surrogates, which were replaced with U+FFFD",
    "too_long": "documents longer than --max-doc-chars were skipped",
    "empty": "empty documents were skipped",
}
# Kinds that raise under strict=True ('empty' never does).
# json.loads turns a "\ud800" escape into a lone surrogate code point; valid pairs arrive combined.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
STRICT_KINDS = ("invalid_json", "missing_key", "non_utf8", "nul", "too_long", "surrogate")


def line_byte_limit(max_doc_chars: int) -> int:
    """Longest raw line read into memory: room for a max_doc_chars document whose every character is a
    6-byte JSON escape (\\uXXXX), plus the JSON around it."""
    return 6 * max_doc_chars + 4096


@dataclass
class InputConfig:
    """How to read the corpus."""

    json_keys: Sequence[str] = ("text",)
    """JSON keys whose string values are documents (one output dataset per key)."""
    input_format: str = "auto"
    """'jsonl', 'text', or 'auto' (by extension, else by whether the first line starts with '{')."""
    text_doc: str = "line"
    """For text input: 'line' (each non-empty line is a document) or 'file' (each file is one)."""
    max_doc_chars: int = 50_000_000
    """Documents longer than this many characters are skipped (and counted)."""
    strict: bool = False
    """Raise DataError on the first bad line instead of skipping it."""
    max_nontext_fraction: float = 0.01
    """Refuse an input file when more than this share of its first SNIFF_BYTES bytes are not text (see the
    module's policy); 1.0 turns the check off."""

    def __post_init__(self) -> None:
        if self.input_format not in ("auto", "jsonl", "text"):
            raise DataError(f"input format must be auto, jsonl or text, not {self.input_format!r}")
        if self.text_doc not in ("line", "file"):
            raise DataError(f"text document mode must be 'line' or 'file', not {self.text_doc!r}")
        if self.max_doc_chars <= 0:
            raise DataError(f"--max-doc-chars must be positive, got {self.max_doc_chars}")
        if not self.json_keys:
            raise DataError("--json-keys needs at least one key")
        if not 0.0 <= self.max_nontext_fraction <= 1.0:
            raise DataError(f"--max-nontext-fraction must be in [0, 1], got {self.max_nontext_fraction}")


@dataclass
class InputStats:
    """Counts of what was read and what was skipped, mergeable across worker processes."""

    lines: int = 0
    documents: int = 0
    bytes: int = 0
    counts: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)

    def note(self, kind: str, where: str) -> None:
        """Count one problem of `kind` at location `where` (file:line)."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        ex = self.examples.setdefault(kind, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(where)

    def merge(self, other: "InputStats") -> None:
        """Add another stats object into this one."""
        self.lines += other.lines
        self.documents += other.documents
        self.bytes += other.bytes
        for kind, n in other.counts.items():
            self.counts[kind] = self.counts.get(kind, 0) + n
            ex = self.examples.setdefault(kind, [])
            ex.extend(other.examples.get(kind, [])[: MAX_EXAMPLES - len(ex)])

    def warnings(self) -> list[str]:
        """One human-readable line per problem kind seen."""
        out = []
        for kind, text in PROBLEMS.items():
            n = self.counts.get(kind, 0)
            if n:
                where = ", ".join(self.examples.get(kind, []))
                fix = "" if kind == "empty" else " (use --strict to fail instead)"
                out.append(f"{n} {text}{fix}; first at {where}")
        return out

    def as_dict(self) -> dict:
        """JSON-friendly summary (stored in the dataset's metadata sidecar)."""
        return {"lines": self.lines, "documents": self.documents, "bytes": self.bytes,
                "skipped_or_fixed": dict(self.counts)}


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Files named by paths, globs or directories (directories: their corpus files, sorted)."""
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(p for p in glob.glob(os.path.join(glob.escape(item), "**", "*"), recursive=True)
                           if os.path.isfile(p) and _strip_gz(p).endswith(JSONL_EXTS + TEXT_EXTS))
            if not found:
                raise DataError(f"input directory {item} contains no .jsonl/.json/.txt(.gz) files")
            files.extend(found)
        elif os.path.isfile(item):
            files.append(item)
        else:
            matches = sorted(glob.glob(item))
            if not matches:
                raise DataError(f"input {item} does not exist (no file, directory or glob match); check --input.")
            files.extend(m for m in matches if os.path.isfile(m))
    if not files:
        raise DataError(f"no input files found in {list(inputs)}")
    return files


def _strip_gz(path: str) -> str:
    return path[:-3] if path.endswith(".gz") else path


def open_binary(path: str) -> BinaryIO:
    """Open a possibly gzip-compressed file for reading bytes."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def detect_format(path: str, config: InputConfig) -> str:
    """'jsonl' or 'text' for one file."""
    if config.input_format != "auto":
        return config.input_format
    base = _strip_gz(path)
    if base.endswith(JSONL_EXTS):
        return "jsonl"
    if base.endswith(TEXT_EXTS):
        return "text"
    try:
        with open_binary(path) as f:
            first = f.readline(4096).lstrip()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    return "jsonl" if first.startswith(b"{") else "text"


SNIFF_BYTES = 1 << 16
NONTEXT_MIN = 8
"""Fewer non-text bytes than this never refuse a file: one stray byte in a short file is the line policy's."""
# Control bytes that plain text does not hold (tab, newline, form feed, carriage return and escape do).
_CONTROL = bytes(b for b in range(32) if b not in (9, 10, 12, 13, 27)) + b"\x7f"
_ESCAPED = re.compile("[\udc80-\udcff]")


def nontext_bytes(sample: bytes) -> int:
    """Bytes of `sample` that are not text: undecodable as UTF-8, or control bytes (NUL, ...)."""
    # surrogateescape maps each undecodable byte to one lone surrogate U+DC80..U+DCFF.
    text = sample.decode("utf-8", errors="surrogateescape")
    undecodable = len(_ESCAPED.findall(text))
    return undecodable + len(sample) - len(sample.translate(None, _CONTROL))


def check_text_file(path: str, config: InputConfig) -> None:
    """DataError when the file looks binary (more than config.max_nontext_fraction of its first bytes, and at
    least NONTEXT_MIN, are not text), with the count; a few odd bytes in a text file are left to the per-line
    policy."""
    if config.max_nontext_fraction >= 1.0:
        return
    try:
        with open_binary(path) as f:
            sample = f.read(SNIFF_BYTES)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read {path}: {e}" + (" (a truncated or corrupt .gz?)" if path.endswith(".gz")
                                                      else "")) from None
    if not sample:
        return
    # A sample cut inside a multi-byte character leaves at most 3 undecodable bytes at its end.
    bad = max(0, nontext_bytes(sample) - (3 if len(sample) == SNIFF_BYTES else 0))
    if bad >= NONTEXT_MIN and bad > config.max_nontext_fraction * len(sample):
        raise DataError(f"{path} does not look like text: {bad} of its first {len(sample)} bytes "
                        f"({100.0 * bad / len(sample):.1f}%) are not UTF-8 text (undecodable or control bytes such "
                        f"as NUL), above --max-nontext-fraction {config.max_nontext_fraction:g}. Remove it from "
                        f"--input (a program, image or archive?), or raise --max-nontext-fraction if it is text")


def iter_raw(path: str, fmt: str, config: InputConfig) -> Iterator[tuple[int, Optional[bytes]]]:
    """(line number, raw bytes) per record of a file; bytes is None for a record over the size limit,
    which is skipped without being read into memory. In text_doc='file' mode the file is one record."""
    limit = line_byte_limit(config.max_doc_chars)
    try:
        with open_binary(path) as f:
            if fmt == "text" and config.text_doc == "file":
                data = f.read(4 * config.max_doc_chars + 1)  # UTF-8 is at most 4 bytes per character
                yield 1, (None if len(data) > 4 * config.max_doc_chars else data)
                return
            line_no = 0
            while True:
                line = f.readline(limit)
                if not line:
                    return
                line_no += 1
                if len(line) == limit and not line.endswith(b"\n"):
                    # Oversized: drain the rest of this line in bounded pieces.
                    while True:
                        rest = f.readline(limit)
                        if not rest or rest.endswith(b"\n"):
                            break
                    yield line_no, None
                    continue
                yield line_no, line
    except (OSError, EOFError, gzip.BadGzipFile, io.UnsupportedOperation) as e:
        raise DataError(f"cannot read {path}: {e} (a truncated or corrupt .gz?)") from None


def _problem(kind: str, where: str, detail: str, config: InputConfig, stats: InputStats) -> None:
    if config.strict and kind in STRICT_KINDS:
        raise DataError(f"{where}: {detail} (--strict is set; drop --strict to skip and count such lines)")
    stats.note(kind, where)


def parse_record(raw: Optional[bytes], fmt: str, where: str, config: InputConfig,
                 stats: InputStats) -> Optional[list[str]]:
    """Documents (one per json key, or one for text) of one raw record, or None if it is skipped.

    Applies the module's policy, counting problems in `stats` (or raising DataError when strict).
    """
    stats.lines += 1
    if raw is None:
        _problem("too_long", where, f"record longer than {line_byte_limit(config.max_doc_chars)} bytes "
                 f"(--max-doc-chars {config.max_doc_chars})", config, stats)
        return None
    stats.bytes += len(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        _problem("non_utf8", where, f"bytes that are not UTF-8 ({e.reason} at byte {e.start})", config, stats)
        text = raw.decode("utf-8", errors="replace")
    if fmt == "jsonl":
        if not text.strip():
            stats.note("empty", where)
            return None
        try:
            obj = json.loads(text)
        except ValueError as e:
            _problem("invalid_json", where, f"invalid JSON ({e}); expected one JSON object per line (JSON Lines)",
                     config, stats)
            return None
        if not isinstance(obj, dict):
            _problem("invalid_json", where, f"a JSON {type(obj).__name__}, not an object", config, stats)
            return None
        docs = []
        for key in config.json_keys:
            value = obj.get(key)
            if not isinstance(value, str):
                detail = (f"no key {key!r} (keys: {sorted(obj)[:10]}); set --json-keys" if key not in obj
                          else f"key {key!r} holds a {type(value).__name__}, not a string")
                _problem("missing_key", where, detail, config, stats)
                return None  # skip the whole line so per-key outputs stay aligned
            docs.append(value)
    else:
        docs = [text[:-1] if config.text_doc == "line" and text.endswith("\n") else text]
    out = []
    for doc in docs:
        if "\x00" in doc:
            _problem("nul", where, "NUL characters in the text", config, stats)
            doc = doc.replace("\x00", "")
        if _LONE_SURROGATE.search(doc):
            _problem("surrogate", where, "lone UTF-16 surrogates (e.g. a \\ud800 escape without its pair)",
                     config, stats)
            doc = _LONE_SURROGATE.sub("\ufffd", doc)
        if len(doc) > config.max_doc_chars:
            _problem("too_long", where, f"a document of {len(doc)} characters > --max-doc-chars "
                     f"{config.max_doc_chars}", config, stats)
            return None
        out.append(doc)
    if all(not d for d in out):
        stats.note("empty", where)
        return None
    stats.documents += 1
    return out


def iter_documents(paths: Sequence[str], config: InputConfig, stats: InputStats) -> Iterator[list[str]]:
    """Single-process stream of documents (a list with one text per json key) from all files."""
    files = expand_inputs(paths)
    for path in files:
        check_text_file(path, config)
    for path in files:
        fmt = detect_format(path, config)
        for line_no, raw in iter_raw(path, fmt, config):
            docs = parse_record(raw, fmt, f"{path}:{line_no}", config, stats)
            if docs is not None:
                yield docs
