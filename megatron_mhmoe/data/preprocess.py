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

from .errors import DataError
from .indexed import (IndexedDataset, IndexedDatasetWriter, merge_datasets, meta_path, optimal_dtype, read_meta,
                      write_json_atomic)
from .input_reader import InputConfig, InputStats, detect_format, expand_inputs, iter_raw, parse_record

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
    tokenizer_type: str = "sentencepiece"
    """'sentencepiece' or 'byte' (--tokenizer-type)."""
    tokenizer_model: Optional[str] = None
    """SentencePiece .model path (--tokenizer-model)."""
    append_eod: bool = False
    """Append the tokenizer's EOD id after every document (--append-eod)."""
    workers: int = 1
    """Worker processes; 1 tokenizes in the main process (--workers)."""
    log_interval: int = 1000
    """Print a progress line every this many documents (--log-interval)."""
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
                 append_eod: bool) -> None:
    from megatron_mhmoe.data.tokenizer import build_tokenizer

    tok = build_tokenizer(tokenizer_type, tokenizer_model)
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


class _Progress:
    """Periodic 'documents, docs/s, MB/s' lines (a log line, not a tty bar, so it reads well in job logs)."""

    def __init__(self, interval: int, log: Log) -> None:
        self.interval, self.log = max(interval, 1), log
        self.start = time.perf_counter()
        self.next_at = self.interval

    def update(self, stats: InputStats) -> None:
        if stats.documents >= self.next_at:
            self.next_at = (stats.documents // self.interval + 1) * self.interval
            self.log(self.line(stats))

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
    init_args = (cfg.tokenizer_type, cfg.tokenizer_model, cfg.input, cfg.append_eod)
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
    files = expand_inputs(cfg.inputs)
    tok = build_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model)
    tok_info = {
        "tokenizer_type": cfg.tokenizer_type,
        "tokenizer_model": os.path.abspath(cfg.tokenizer_model) if cfg.tokenizer_model else None,
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "eod": tok.eod,
    }
    keys = list(cfg.input.json_keys)
    outputs = {k: output_prefix_for(cfg.output_prefix, k) for k in keys}
    log(f"preprocessing {len(files)} file(s) with {cfg.workers} worker(s), vocab {tok.vocab_size} "
        f"({optimal_dtype(tok.vocab_size)} tokens) -> {', '.join(outputs.values())}")
    stats = InputStats()
    progress = _Progress(cfg.log_interval, log)
    groups = _partition(files, cfg.partitions) if cfg.partitions > 1 else [files]
    if len(groups) == 1:
        num_tokens, _ = _run_files(files, list(outputs.values()), cfg, tok_info, log, progress, stats)
    else:
        num_tokens = _run_partitions(groups, keys, outputs, cfg, tok_info, log, progress, stats)
    seconds = time.perf_counter() - progress.start
    log(progress.line(stats, prefix="done:") + f", {num_tokens} tokens per key")
    for w in stats.warnings():
        log(f"WARNING: {w}")
    return PreprocessResult(outputs, stats, seconds, num_tokens)


def _finished(prefix: str, files: list[str], cfg: PreprocessConfig, tok_info: dict) -> bool:
    """Whether a partition dataset from an earlier run is complete and made from the same inputs/tokenizer."""
    meta = read_meta(prefix)
    if meta is None or meta.get("inputs") != [os.path.abspath(f) for f in files] \
            or meta.get("tokenizer_sha256") != tok_info["tokenizer_sha256"] or meta.get("append_eod") != cfg.append_eod:
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
        write_json_atomic(meta_path(outputs[k]), merged)
        num_tokens = merged["num_tokens"]
        if not cfg.keep_partitions:
            for p in parts[k]:
                for ext in (".bin", ".idx", ".meta.json"):
                    if os.path.exists(p + ext):
                        os.remove(p + ext)
    return num_tokens
