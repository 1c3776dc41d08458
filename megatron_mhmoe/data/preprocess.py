"""Tokenize JSONL/text corpora into Megatron `.bin/.idx` datasets with a pool of worker processes.

Flow: the main process streams raw lines (bounded readline, gzip ok) and groups them into ~1 MB
chunks; workers parse + tokenize a chunk and return flat token arrays; the main process appends
them, in input order, to one IndexedDatasetWriter per JSON key. At most `2 * workers + 2` chunks are in
flight (a semaphore throttles the chunk generator, because Pool.imap would otherwise read the
whole input ahead into memory), so memory stays flat however large the input is.
"""
from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing import Pool
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from megatron_mhmoe import atomic

from .errors import DataError
from .indexed import IndexedDataset, IndexedDatasetWriter, merge_datasets, meta_path, optimal_dtype, read_meta
from .input_reader import (InputConfig, InputStats, check_text_file, detect_format, expand_inputs, iter_raw,
                           parse_record)

Log = Callable[[str], None]


def _stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class PreprocessConfig:
    """Everything tools/preprocess_data.py needs (flags use Megatron-LM's names)."""

    inputs: Sequence[str]
    """Input files, directories or globs (--input)."""
    output_prefix: str
    """Outputs are `<output_prefix>_<key>_document.{bin,idx,meta.json}` (--output-prefix)."""
    tokenizer_type: str = "auto"
    """'auto' (by --tokenizer-model's file), 'sentencepiece', 'hf' or 'byte' (--tokenizer-type)."""
    tokenizer_model: Optional[str] = None
    """SentencePiece .model, Hugging Face tokenizer.json or a folder holding one (--tokenizer-model)."""
    eod_token: Optional[str] = None
    """End-of-document token of a Hugging Face tokenizer that names no eos token (--eod-token)."""
    append_eod: bool = False
    """Append the tokenizer's EOD id after every document (--append-eod)."""
    workers: int = 1
    """Worker processes; 1 tokenizes in the main process (--workers)."""
    log_interval: int = 1000
    """Print a progress line every this many documents (--log-interval; lines mode only)."""
    progress: str = "auto"
    """'bar' (a tqdm bar of bytes and documents), 'lines' (a log line every log_interval documents) or
    'auto': a bar when stderr is a terminal, lines otherwise (--progress)."""
    partitions: int = 1
    """Split the input files into this many groups, each written as its own dataset (reused on a rerun
    after a crash), then merged (--partitions)."""
    keep_partitions: bool = False
    """Keep the per-partition datasets after merging."""
    chunk_bytes: int = 1 << 20
    """Raw input bytes per task sent to a worker."""
    input: InputConfig = field(default_factory=InputConfig)
    """How to read the input and what to do with bad lines."""


@dataclass
class PreprocessResult:
    """What was written and how fast."""

    outputs: dict
    """json key -> dataset prefix."""
    stats: InputStats
    seconds: float
    num_tokens: int

    @property
    def docs_per_s(self) -> float:
        return self.stats.documents / max(self.seconds, 1e-9)

    @property
    def mb_per_s(self) -> float:
        return self.stats.bytes / 1e6 / max(self.seconds, 1e-9)


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron's naming: `<output_prefix>_<key>_document`."""
    return f"{output_prefix}_{key}_document"


# --- worker side -----------------------------------------------------------------------------------
# Per-process state of a Pool worker (set by _init_worker); the main process uses it too when workers == 1.
_STATE: dict = {}


def _init_worker(tokenizer_type: str, tokenizer_model: Optional[str], input_cfg: InputConfig,
                 append_eod: bool, eod_token: Optional[str] = None) -> None:
    from megatron_mhmoe.data.tokenizer import build_tokenizer

    tok = build_tokenizer(tokenizer_type, tokenizer_model, eod_token)
    _STATE.update(tok=tok, input=input_cfg, append_eod=append_eod, dtype=optimal_dtype(tok.vocab_size))


@dataclass
class _Chunk:
    path: str
    fmt: str
    records: list  # [(line number, raw bytes or None)]


@dataclass
class _ChunkResult:
    tokens: list  # per key: flat np.ndarray of all documents' ids
    lengths: list  # per key: np.ndarray int64 of document lengths
    max_ids: list  # per key: largest id, -1 if none
    stats: InputStats


def _encode_chunk(chunk: _Chunk) -> _ChunkResult:
    tok, cfg = _STATE["tok"], _STATE["input"]
    stats = InputStats()
    per_key: list[list[str]] = [[] for _ in cfg.json_keys] if chunk.fmt == "jsonl" else [[]]
    for line_no, raw in chunk.records:
        docs = parse_record(raw, chunk.fmt, f"{chunk.path}:{line_no}", cfg, stats)
        if docs is not None:
            for texts, doc in zip(per_key, docs):
                texts.append(doc)
    tokens, lengths, max_ids = [], [], []
    for texts in per_key:
        ids = tok.encode_batch(texts) if texts else []
        if _STATE["append_eod"]:
            for x in ids:
                x.append(tok.eod)
        lens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lens.sum()))
        top = int(flat.max()) if flat.size else -1
        if flat.size and (top >= tok.vocab_size or int(flat.min()) < 0):
            raise DataError(f"{chunk.path}: tokenizer produced id {top} outside its vocab of {tok.vocab_size}")
        tokens.append(flat.astype(_STATE["dtype"]))
        lengths.append(lens)
        max_ids.append(top)
    return _ChunkResult(tokens, lengths, max_ids, stats)


# --- main side -------------------------------------------------------------------------------------
def _iter_chunks(files: Sequence[str], cfg: InputConfig, chunk_bytes: int) -> Iterator[_Chunk]:
    for path in files:
        fmt = detect_format(path, cfg)
        records: list = []
        size = 0
        for line_no, raw in iter_raw(path, fmt, cfg):
            records.append((line_no, raw))
            size += len(raw) if raw is not None else 0
            if size >= chunk_bytes or len(records) >= 4096:
                yield _Chunk(path, fmt, records)
                records, size = [], 0
        if records:
            yield _Chunk(path, fmt, records)


def _terminal_size() -> tuple[int, int]:
    """(columns, rows) of the terminal; some ptys report 0 x 0, for which tqdm would draw nothing at all."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
        cols, rows = size.columns, size.lines
    except (OSError, ValueError, AttributeError):
        cols = rows = 0
    return (cols if cols > 0 else 100), (rows if rows > 0 else 24)


class _Progress:
    """A tqdm bar (bytes read, documents, rates) on a terminal; otherwise a 'documents, docs/s, MB/s' line
    every `interval` documents, because a bar's carriage returns make a mess of job logs."""

    def __init__(self, interval: int, log: Log, bar: bool = False, total_bytes: Optional[int] = None) -> None:
        self.interval, self._log = max(interval, 1), log
        self.start = time.perf_counter()
        self.next_at = self.interval
        self.total_bytes = total_bytes
        self.bar = None
        if bar:
            from tqdm import tqdm

            cols, rows = _terminal_size()
            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocessing", file=sys.stderr,
                            ncols=cols, nrows=rows, mininterval=0.5)

    def log(self, msg: str) -> None:
        """Log around the bar: it is erased, the message printed, and the bar redrawn below it."""
        if self.bar is None:
            self._log(msg)
            return
        with self.bar.external_write_mode(file=sys.stderr):
            self._log(msg)

    def update(self, stats: InputStats) -> None:
        if self.bar is not None:
            dt = max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{stats.documents} docs, {stats.documents / dt:.0f} docs/s", refresh=False)
            self.bar.update(stats.bytes - self.bar.n)
            return
        if stats.documents >= self.next_at:
            self.next_at = (stats.documents // self.interval + 1) * self.interval
            self.log(self.line(stats))

    def close(self, done: bool) -> None:
        if self.bar is None:
            return
        if done and self.total_bytes and self.bar.n < self.total_bytes:
            # Newlines and reused partitions are not counted as read: a finished run is still 100%.
            self.bar.update(self.total_bytes - self.bar.n)
        self.bar.close()
        self.bar = None

    def line(self, stats: InputStats, prefix: str = "processed") -> str:
        dt = max(time.perf_counter() - self.start, 1e-9)
        return (f"{prefix} {stats.documents} documents, {stats.bytes / 1e6:.1f} MB in {dt:.1f} s "
                f"({stats.documents / dt:.0f} docs/s, {stats.bytes / 1e6 / dt:.2f} MB/s)")


def _run_files(files: Sequence[str], prefixes: list[str], cfg: PreprocessConfig, tok_info: dict,
               log: Log, progress: _Progress, stats: InputStats) -> tuple[int, list[int]]:
    """Tokenize `files` into one dataset per prefix. Returns (tokens written, max id per prefix)."""
    dtype = optimal_dtype(tok_info["vocab_size"])
    writers = [IndexedDatasetWriter(p, dtype) for p in prefixes]
    max_ids = [-1] * len(prefixes)
    init_args = (cfg.tokenizer_type, cfg.tokenizer_model, cfg.input, cfg.append_eod, cfg.eod_token)
    chunks = _iter_chunks(files, cfg.input, cfg.chunk_bytes)
    pool = None
    stop = threading.Event()
    try:
        if cfg.workers > 1:
            in_flight = threading.Semaphore(2 * cfg.workers + 2)

            def throttled() -> Iterator[_Chunk]:
                for chunk in chunks:
                    while not in_flight.acquire(timeout=0.1):
                        if stop.is_set():
                            return
                    yield chunk

            # One process per core already: the HF tokenizers' own thread pool in every worker would
            # oversubscribe the cores (and the library warns about threads used before a fork).
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            pool = Pool(cfg.workers, initializer=_init_worker, initargs=init_args)
            results: Iterator[_ChunkResult] = pool.imap(_encode_chunk, throttled())
        else:
            _init_worker(*init_args)
            results = map(_encode_chunk, chunks)
            in_flight = None
        for res in results:
            if in_flight is not None:
                in_flight.release()
            if len(res.tokens) != len(writers):
                raise DataError(f"text input yields one document per record, but {len(writers)} --json-keys were "
                                "given; use one key with text input or convert it to JSONL.")
            for i, w in enumerate(writers):
                w.add_documents(res.tokens[i], res.lengths[i])
                max_ids[i] = max(max_ids[i], res.max_ids[i])
            stats.merge(res.stats)
            progress.update(stats)
        if writers[0].num_documents == 0:
            raise DataError(_empty_message(files, stats))
        for p, w, top in zip(prefixes, writers, max_ids):
            w.finalize(_meta(cfg, tok_info, files, w, top, stats))
        return writers[0].num_tokens, max_ids
    except BaseException:
        for w in writers:
            w.abort()
        raise
    finally:
        stop.set()
        if pool is not None:
            pool.terminate()
            pool.join()


def _empty_message(files: Sequence[str], stats: InputStats) -> str:
    shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    if stats.lines == 0:
        return f"no documents: the input ({shown}) is empty. Check --input."
    why = "; ".join(stats.warnings()) or "all records were empty"
    return (f"no documents written from {shown}: all {stats.lines} records were skipped ({why}). Check --input, "
            "--json-keys and --max-doc-chars.")


def _meta(cfg: PreprocessConfig, tok_info: dict, files: Sequence[str], writer: IndexedDatasetWriter,
          max_id: int, stats: InputStats) -> dict:
    return {
        **tok_info,
        "append_eod": cfg.append_eod,
        "dtype": str(writer.dtype),
        "num_documents": writer.num_documents,
        "num_tokens": writer.num_tokens,
        "max_token_id": max_id,
        "inputs": [os.path.abspath(f) for f in files],
        "stats": stats.as_dict(),
    }


def _partition(files: list[str], n: int) -> list[list[str]]:
    """Contiguous groups of similar total size (contiguous keeps the merged output in input order)."""
    sizes = [os.path.getsize(f) for f in files]
    total, groups, current, acc = sum(sizes), [], [], 0
    for f, s in zip(files, sizes):
        current.append(f)
        acc += s
        if acc >= total * (len(groups) + 1) / n and len(groups) < n - 1:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


def preprocess(cfg: PreprocessConfig, log: Log = _stderr_log) -> PreprocessResult:
    """Tokenize the inputs into `<output_prefix>_<key>_document` datasets; see PreprocessConfig."""
    from megatron_mhmoe.data.tokenizer import build_tokenizer

    if cfg.workers < 1:
        raise DataError(f"--workers must be >= 1, got {cfg.workers}")
    if cfg.partitions < 1:
        raise DataError(f"--partitions must be >= 1, got {cfg.partitions}")
    if cfg.progress not in ("auto", "bar", "lines"):
        raise DataError(f"--progress must be auto, bar or lines, got {cfg.progress!r}")
    files = expand_inputs(cfg.inputs)
    for path in files:  # before anything is written: a program or an archive is not a corpus
        check_text_file(path, cfg.input)
    tok = build_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model, cfg.eod_token)
    tok_info = {
        "tokenizer_type": tok.type_name,
        "tokenizer_model": os.path.abspath(cfg.tokenizer_model) if cfg.tokenizer_model else None,
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "eod": tok.eod,
    }
    if getattr(tok, "eod_token", None) is not None:
        tok_info["eod_token"] = tok.eod_token
    keys = list(cfg.input.json_keys)
    outputs = {k: output_prefix_for(cfg.output_prefix, k) for k in keys}
    log(f"preprocessing {len(files)} file(s) with {cfg.workers} worker(s), {tok.type_name} tokenizer, vocab "
        f"{tok.vocab_size} ({optimal_dtype(tok.vocab_size)} tokens), EOD {tok.eod} -> {', '.join(outputs.values())}")
    stats = InputStats()
    groups = _partition(files, cfg.partitions) if cfg.partitions > 1 else [files]
    bar = cfg.progress == "bar" or (cfg.progress == "auto" and sys.stderr.isatty())
    total = None if any(f.endswith(".gz") for f in files) else sum(os.path.getsize(f) for f in files)
    progress = _Progress(cfg.log_interval, log, bar=bar, total_bytes=total)
    log = progress.log
    done = False
    try:
        if len(groups) == 1:
            num_tokens, _ = _run_files(files, list(outputs.values()), cfg, tok_info, log, progress, stats)
        else:
            num_tokens = _run_partitions(groups, keys, outputs, cfg, tok_info, log, progress, stats)
        done = True
    finally:
        progress.close(done)
    seconds = time.perf_counter() - progress.start
    log(progress.line(stats, prefix="done:") + f", {num_tokens} tokens per key")
    for w in stats.warnings():
        log(f"WARNING: {w}")
    return PreprocessResult(outputs, stats, seconds, num_tokens)


def _finished(prefix: str, files: list[str], cfg: PreprocessConfig, tok_info: dict) -> bool:
    """Whether a partition dataset from an earlier run is complete and made from the same inputs/tokenizer."""
    meta = read_meta(prefix)
    if meta is None or meta.get("inputs") != [os.path.abspath(f) for f in files] \
            or meta.get("tokenizer_sha256") != tok_info["tokenizer_sha256"] or meta.get("append_eod") != cfg.append_eod \
            or meta.get("eod", tok_info["eod"]) != tok_info["eod"]:
        return False
    try:
        return IndexedDataset(prefix).num_tokens == meta.get("num_tokens")  # opens and checks both files
    except DataError:
        return False


def _run_partitions(groups: list[list[str]], keys: list[str], outputs: dict, cfg: PreprocessConfig,
                    tok_info: dict, log: Log, progress: _Progress, stats: InputStats) -> int:
    parts: dict[str, list[str]] = {k: [] for k in keys}
    for i, group in enumerate(groups):
        part_prefixes = [output_prefix_for(f"{cfg.output_prefix}_part{i:03d}", k) for k in keys]
        done = all(_finished(p, group, cfg, tok_info) for p in part_prefixes)
        if done:
            log(f"partition {i + 1}/{len(groups)}: reusing finished {part_prefixes[0]}")
        else:
            log(f"partition {i + 1}/{len(groups)}: {len(group)} file(s)")
            _run_files(group, part_prefixes, cfg, tok_info, log, progress, stats)
        for k, p in zip(keys, part_prefixes):
            parts[k].append(p)
    num_tokens = 0
    for k in keys:
        merged = merge_datasets(parts[k], outputs[k], log=log)
        merged.pop("merged_from", None)
        merged.update(inputs=[os.path.abspath(f) for g in groups for f in g], stats=stats.as_dict(),
                      partitions=len(groups))
        atomic.write_json(meta_path(outputs[k]), merged, sort_keys=True)
        num_tokens = merged["num_tokens"]
        if not cfg.keep_partitions:
            for p in parts[k]:
                for ext in (".bin", ".idx", ".meta.json"):
                    if os.path.exists(p + ext):
                        os.remove(p + ext)
    return num_tokens
