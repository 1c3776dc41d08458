"""Megatron-LM's memory-mapped indexed dataset (`.bin` + `.idx`), byte for byte.

Layout of `<prefix>.idx` (all little-endian; checked against Megatron-LM's
megatron/core/datasets/indexed_dataset.py `_IndexWriter` / `_IndexReader`):

    offset 0   9 bytes   magic  b"MMIDIDX\\x00\\x00"
    offset 9   uint64    version, always 1
    offset 17  uint8     dtype code of the tokens in .bin (see DTYPE_CODES)
    offset 18  uint64    sequence_count  S
    offset 26  uint64    document_count  D  (= number of documents + 1: doc_idx starts with 0)
    offset 34  int32[S]  sizes     tokens per sequence
               int64[S]  pointers  byte offset of each sequence in .bin
               int64[D]  doc_idx   sequence index where each document starts; doc_idx[-1] == S
               (int8[S]  modes     only in Megatron's multimodal files; tolerated, ignored)

`<prefix>.bin` is the concatenation of all sequences in that dtype. Our preprocessing writes one
sequence per document, so doc_idx == arange(S + 1), as Megatron's does without --split-sentences.

Besides the two Megatron files we write an optional `<prefix>.meta.json` sidecar (vocab size,
tokenizer hash, max token id). Megatron ignores it; we use it to catch a tokenizer/model mismatch.
"""
from __future__ import annotations

import array
import glob
import json
import os
import shutil
import struct
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from megatron_mhmoe import atomic
from .errors import DataError

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_SIZE = 34  # 9 magic + 8 version + 1 dtype + 8 sequence count + 8 document count
# The pre-2021 Megatron/fairseq "lazy"/"cached" IndexedDataset magic: recognised to give a useful error.
_LEGACY_HEADER = b"TNTIDX\x00\x00"

# Megatron's DType enum (uint8=1 ... uint16=8).
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF_DTYPE = {dt: code for code, dt in DTYPE_CODES.items()}
_VERIFY_CHUNK = 1 << 22  # elements per chunk when checking pointers: bounds temporary memory


def optimal_dtype(vocab_size: int) -> np.dtype:
    """Token dtype Megatron picks for a vocabulary: uint16 below 65500 entries, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def dtype_code(dtype: Any) -> int:
    """Megatron's numeric code for a numpy dtype."""
    dt = np.dtype(dtype)
    if dt not in _CODE_OF_DTYPE:
        raise DataError(f"dtype {dt} has no Megatron dtype code; use one of "
                        f"{sorted(str(d) for d in _CODE_OF_DTYPE)}")
    return _CODE_OF_DTYPE[dt]


def normalize_prefix(prefix: str) -> str:
    """Accept `foo`, `foo.bin` or `foo.idx` for the dataset prefix `foo`."""
    prefix = os.fspath(prefix)
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext):
            return prefix[: -len(ext)]
    return prefix


def expand_prefixes(inputs: Sequence[str]) -> list[str]:
    """Dataset prefixes named by prefixes (or their .bin/.idx) or directories (every *.idx, sorted by name)."""
    out: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(p[: -len(".idx")] for p in glob.glob(os.path.join(glob.escape(item), "*.idx")))
            if not found:
                raise DataError(f"directory {item} holds no .idx files")
            out.extend(found)
        else:
            out.append(normalize_prefix(item))
    return out


def idx_path(prefix: str) -> str:
    """Path of the index file of a dataset prefix."""
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    """Path of the token file of a dataset prefix."""
    return prefix + ".bin"


def meta_path(prefix: str) -> str:
    """Path of our optional metadata sidecar (ignored by Megatron-LM)."""
    return prefix + ".meta.json"


@dataclass(frozen=True)
class IndexHeader:
    """The fixed-size head of an `.idx` file."""

    dtype: np.dtype
    sequence_count: int
    document_count: int


def _suggest_prefixes(prefix: str) -> str:
    """A hint naming datasets that do exist near a missing prefix (the usual mistakes: passing the
    preprocess --output-prefix without the `_text_document` part Megatron appends, or the folder the
    dataset is in)."""
    if os.path.isdir(prefix):
        return _folder_hint(prefix)
    found = sorted(glob.glob(glob.escape(prefix) + "*.idx"))[:5]
    if not found:
        folder = os.path.dirname(prefix) or "."
        found = sorted(glob.glob(os.path.join(glob.escape(folder), "*.idx")))[:5]
    if not found:
        return " No .idx files were found there; run tools/preprocess_data.py to create the dataset."
    names = ", ".join(p[: -len(".idx")] for p in found)
    return f" Existing dataset prefixes nearby: {names}."


def _folder_hint(folder: str) -> str:
    """What a folder given as a dataset prefix holds, and the exact value to pass instead."""
    def stems(ext: str) -> set:
        return {p[: -len(ext)] for p in glob.glob(os.path.join(glob.escape(folder), "*" + ext))}
    idx, bins = stems(".idx"), stems(".bin")
    pairs, halves = sorted(idx & bins), sorted(idx ^ bins)
    if pairs:
        shown = ", ".join(pairs[:5]) + (f" and {len(pairs) - 5} more" if len(pairs) > 5 else "")
        value = pairs[0] if len(pairs) == 1 else " ".join(f"1 {p}" for p in pairs[:2])
        return (f" {folder} is a folder holding {len(pairs)} dataset(s) (.bin + .idx): {shown}. data.data_path "
                f"takes a dataset's prefix (its path without .bin/.idx), not the folder: pass "
                f"--data.data_path=[{value}]" + (" (weight prefix pairs blend several)" if len(pairs) > 1 else "")
                + ".")
    if halves:
        lone = ", ".join(h + (".idx" if h in idx else ".bin") for h in halves[:5])
        return (f" {folder} is a folder; it holds {lone} "
                f"without the matching {'.bin' if halves[0] in idx else '.idx'}: re-run tools/preprocess_data.py "
                f"(an interrupted run leaves one half).")
    return (f" {folder} is a folder without any .bin/.idx dataset; data.data_path takes a dataset's prefix (its "
            f"path without .bin/.idx): run tools/preprocess_data.py to create one.")


def read_index_header(path: str) -> IndexHeader:
    """Read and validate the 34-byte header of an `.idx` file; DataError names the file and the fix."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
    except FileNotFoundError:
        raise DataError(f"index file {path} does not exist."
                        + _suggest_prefixes(path[: -len(".idx")] if path.endswith(".idx") else path)) from None
    if len(head) >= len(_LEGACY_HEADER) and head.startswith(_LEGACY_HEADER):
        raise DataError(f"{path} is an old Megatron/fairseq 'lazy'/'cached' IndexedDataset (magic TNTIDX), "
                        "not the mmap format; re-run tools/preprocess_data.py on the source text.")
    if head[:9] != INDEX_HEADER:
        raise DataError(f"{path} is not a Megatron mmap index: its first bytes are {head[:9]!r}, expected "
                        f"{INDEX_HEADER!r}. Pass the prefix of a dataset written by tools/preprocess_data.py "
                        "or Megatron-LM's preprocess_data.py.")
    if len(head) < HEADER_SIZE:
        raise DataError(f"{path} is truncated: {len(head)} bytes, shorter than the {HEADER_SIZE}-byte header. "
                        "Re-run tools/preprocess_data.py (the previous run was probably interrupted).")
    (version,) = struct.unpack("<Q", head[9:17])
    if version != INDEX_VERSION:
        raise DataError(f"{path} has index version {version}; only version {INDEX_VERSION} (Megatron mmap "
                        "format) is supported. Re-run tools/preprocess_data.py to rewrite it.")
    code = head[17]
    if code not in DTYPE_CODES:
        raise DataError(f"{path} has unknown dtype code {code} (known: {sorted(DTYPE_CODES)}); "
                        "the file is corrupt, re-run tools/preprocess_data.py.")
    seq_count, doc_count = struct.unpack("<QQ", head[18:34])
    return IndexHeader(DTYPE_CODES[code], int(seq_count), int(doc_count))


def read_meta(prefix: str) -> Optional[dict]:
    """The `.meta.json` sidecar of a dataset, or None when absent (e.g. a Megatron-made dataset)."""
    path = meta_path(prefix)
    if not os.path.exists(path):
        return None
    try:
        with open(path, "r", encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"metadata sidecar {path} is unreadable ({e}); delete it or re-run "
                        "tools/preprocess_data.py.") from None
    if not isinstance(meta, dict):
        raise DataError(f"metadata sidecar {path} is not a JSON object; delete it or re-run preprocessing.")
    return meta


class IndexedDataset:
    """Read-only view of a Megatron `.bin/.idx` pair through memory maps.

    `ds[i]` is sequence i as a read-only numpy array of the file's dtype (no copy). With
    `verify=True` (default) the index is checked against the `.bin` size and itself once, at O(S)
    numpy cost, so a truncated or mismatched file fails here with a DataError, not later as garbage.
    """

    def __init__(self, prefix: str, verify: bool = True) -> None:
        self.prefix = normalize_prefix(prefix)
        ipath, bpath = idx_path(self.prefix), bin_path(self.prefix)
        for p in (ipath, bpath):
            if not os.path.exists(p):
                raise DataError(f"dataset file {p} does not exist (dataset prefix {self.prefix!r})."
                                + _suggest_prefixes(self.prefix))
        header = read_index_header(ipath)
        self.dtype: np.dtype = header.dtype
        s, d = header.sequence_count, header.document_count
        expected = HEADER_SIZE + 4 * s + 8 * s + 8 * d
        idx_size = os.path.getsize(ipath)
        # Megatron's multimodal files append one int8 mode per sequence; those are legal too.
        if idx_size not in (expected, expected + s):
            what = "truncated" if idx_size < expected else "longer than its header says"
            raise DataError(f"{ipath} is {what}: {idx_size} bytes, but its header ({s} sequences, {d} document "
                            f"entries) needs {expected}. Re-run tools/preprocess_data.py for {self.prefix}.")
        self._idx_mmap = np.memmap(ipath, dtype=np.uint8, mode="r")
        buf = self._idx_mmap
        self.sizes: np.ndarray = np.frombuffer(buf, dtype=np.int32, count=s, offset=HEADER_SIZE)
        self.pointers: np.ndarray = np.frombuffer(buf, dtype=np.int64, count=s, offset=HEADER_SIZE + 4 * s)
        self.doc_idx: np.ndarray = np.frombuffer(buf, dtype=np.int64, count=d, offset=HEADER_SIZE + 12 * s)
        bin_size = os.path.getsize(bpath)
        # numpy cannot memory-map an empty file; an empty dataset is still a valid dataset.
        self._bin_mmap = np.memmap(bpath, dtype=np.uint8, mode="r") if bin_size else np.zeros(0, np.uint8)
        self.meta: Optional[dict] = read_meta(self.prefix)
        self._one_seq: Optional[bool] = None
        if verify:
            self._verify(bin_size)

    def _verify(self, bin_size: int) -> None:
        ipath, bpath = idx_path(self.prefix), bin_path(self.prefix)
        s, itemsize = len(self.sizes), self.dtype.itemsize
        fix = f"Re-run tools/preprocess_data.py to rebuild {self.prefix}."
        d = self.doc_idx
        if len(d) > 0 and (d[0] != 0 or d[-1] != s or (len(d) > 1 and np.any(np.diff(d) < 0))):
            raise DataError(f"{ipath} is corrupt: doc_idx must rise from 0 to the sequence count {s}. {fix}")
        if len(d) == 0 and s > 0:
            raise DataError(f"{ipath} is corrupt: {s} sequences but no document index. {fix}")
        if s and int(self.sizes.min()) < 0:
            raise DataError(f"{ipath} is corrupt: negative sequence sizes. {fix}")
        expected_bin = 0
        for start in range(0, s, _VERIFY_CHUNK):
            sizes = self.sizes[start:start + _VERIFY_CHUNK].astype(np.int64) * itemsize
            ends = expected_bin + np.cumsum(sizes)
            starts = ends - sizes
            if not np.array_equal(starts, self.pointers[start:start + _VERIFY_CHUNK]):
                raise DataError(f"{ipath} is corrupt: sequence pointers do not follow the sizes. {fix}")
            expected_bin = int(ends[-1])
        if bin_size != expected_bin:
            if bin_size < expected_bin:
                raise DataError(f"{bpath} is truncated: {bin_size} bytes, but {ipath} describes {expected_bin} "
                                f"bytes ({int(self.sizes.sum(dtype=np.int64))} {self.dtype} tokens). The file was "
                                f"cut short (interrupted copy or preprocessing). {fix}")
            raise DataError(f"{bpath} has {bin_size} bytes but {ipath} describes {expected_bin}: the .bin and "
                            f".idx come from different runs. {fix}")

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_documents(self) -> int:
        """Documents (doc_idx has one extra leading 0 entry)."""
        return max(len(self.doc_idx) - 1, 0)

    @property
    def one_sequence_per_document(self) -> bool:
        """True when doc_idx == [0, 1, ..., S] (no sentence splitting): documents are sequences."""
        if self._one_seq is None:
            d = self.doc_idx
            self._one_seq = len(d) == len(self) + 1 and all(
                np.array_equal(d[i:i + _VERIFY_CHUNK], np.arange(i, min(i + _VERIFY_CHUNK, len(d))))
                for i in range(0, len(d), _VERIFY_CHUNK))
        return self._one_seq

    @property
    def num_tokens(self) -> int:
        """Total tokens over all sequences."""
        return int(self.sizes.sum(dtype=np.int64))

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence idx, as a read-only view."""
        size = int(self.sizes[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence {idx} of "
                             f"length {size} in {self.prefix}")
        start = int(self.pointers[idx]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin_mmap, dtype=self.dtype, count=length, offset=start)

    def __getitem__(self, idx: int) -> np.ndarray:
        if not isinstance(idx, (int, np.integer)):
            raise TypeError(f"IndexedDataset indices must be integers, not {type(idx).__name__}")
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(f"sequence {idx} out of range for {self.prefix} with {len(self)} sequences")
        return self.get(int(idx))

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self.get(i)

    def max_token_id(self, chunk_tokens: int = 1 << 26) -> int:
        """Largest token id in the .bin (a full scan, chunked so memory stays bounded); -1 if empty."""
        flat = np.frombuffer(self._bin_mmap, dtype=self.dtype) if len(self._bin_mmap) else np.zeros(0, self.dtype)
        best = -1
        for start in range(0, len(flat), chunk_tokens):
            best = max(best, int(flat[start:start + chunk_tokens].max()))
        return best


class IndexedDatasetWriter:
    """Streams documents into `<prefix>.bin` and writes `<prefix>.idx` at the end.

    Only the per-sequence sizes (4 bytes each) and document boundaries stay in memory; tokens go to
    disk as they arrive. Output is written to temporary names and renamed in `finalize`, so an
    interrupted run never leaves a valid-looking truncated dataset behind. Use as a context manager:
    an exception inside the block removes the temporary files.
    """

    def __init__(self, prefix: str, dtype: Any) -> None:
        self.prefix = normalize_prefix(prefix)
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # validates
        folder = os.path.dirname(self.prefix)
        if folder:
            os.makedirs(folder, exist_ok=True)
        self._tmp_bin = atomic.temp_path(bin_path(self.prefix))
        self._bin = open(self._tmp_bin, "wb")
        self._sizes = array.array("i")  # int32, Megatron's sizes dtype
        self._doc_idx = array.array("q", [0])  # int64
        if self._sizes.itemsize != 4 or self._doc_idx.itemsize != 8:
            raise RuntimeError("platform C int/long long sizes are not 4/8 bytes")
        info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        self._lo, self._hi = (info.min, info.max) if info else (None, None)
        self.num_tokens = 0

    def _as_tokens(self, tokens: Any) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.dtype != self.dtype:
            # Refuse ids the dtype cannot hold instead of letting astype wrap them silently.
            if arr.size and self._hi is not None and (arr.min() < self._lo or arr.max() > self._hi):
                raise DataError(f"token ids in [{arr.min()}, {arr.max()}] do not fit {self.dtype} while writing "
                                f"{self.prefix}; the tokenizer vocabulary is larger than the dtype allows "
                                "(use int32, which optimal_dtype picks for vocab >= 65500).")
            arr = arr.astype(self.dtype)
        return arr.reshape(-1)

    def add_document(self, tokens: Any, lengths: Optional[Sequence[int]] = None) -> None:
        """Append one document: its tokens, optionally as several sequences of the given lengths."""
        arr = self._as_tokens(tokens)
        lens = [len(arr)] if lengths is None else [int(n) for n in lengths]
        if sum(lens) != len(arr) or any(n < 0 for n in lens):
            raise ValueError(f"sequence lengths {lens} do not add up to the {len(arr)} tokens given")
        if any(n > 2**31 - 1 for n in lens):
            raise DataError(f"a sequence of {max(lens)} tokens exceeds the int32 size field of the index")
        self._bin.write(arr.tobytes(order="C"))
        self._sizes.extend(lens)
        self._doc_idx.append(len(self._sizes))
        self.num_tokens += len(arr)

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many one-sequence documents at once (`tokens` is their concatenation)."""
        arr = self._as_tokens(tokens)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(arr):
            raise ValueError("document lengths do not add up to the tokens given")
        self._bin.write(arr.tobytes(order="C"))
        base = len(self._sizes)
        self._sizes.frombytes(lengths.astype(np.int32).tobytes())
        self._doc_idx.frombytes(np.arange(base + 1, base + 1 + len(lengths), dtype=np.int64).tobytes())
        self.num_tokens += len(arr)

    def add_index(self, prefix: str) -> None:
        """Append a whole existing dataset (used to merge), keeping its document boundaries."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise DataError(f"cannot merge {other.prefix} (dtype {other.dtype}) into {self.prefix} (dtype "
                            f"{self.dtype}): datasets must be tokenized with the same tokenizer.")
        base = len(self._sizes)
        for start in range(0, len(other), _VERIFY_CHUNK):
            self._sizes.frombytes(np.ascontiguousarray(other.sizes[start:start + _VERIFY_CHUNK]).tobytes())
        for start in range(1, len(other.doc_idx), _VERIFY_CHUNK):
            self._doc_idx.frombytes((other.doc_idx[start:start + _VERIFY_CHUNK] + base).tobytes())
        self.num_tokens += other.num_tokens
        with open(bin_path(other.prefix), "rb") as f:
            shutil.copyfileobj(f, self._bin, length=1 << 24)

    @property
    def num_documents(self) -> int:
        """Documents written so far."""
        return len(self._doc_idx) - 1

    def finalize(self, meta: Optional[dict] = None) -> None:
        """Write the .idx, move both files into place, then write the metadata sidecar (if given)."""
        self._bin.close()
        s, d = len(self._sizes), len(self._doc_idx)
        tmp_idx = atomic.temp_path(idx_path(self.prefix))
        with open(tmp_idx, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<Q", INDEX_VERSION))
            f.write(struct.pack("<B", dtype_code(self.dtype)))
            f.write(struct.pack("<QQ", s, d))
            f.write(self._sizes.tobytes())
            sizes = np.frombuffer(self._sizes, dtype=np.int32) if s else np.zeros(0, np.int32)
            offset = 0
            for start in range(0, s, _VERIFY_CHUNK):  # exclusive cumsum of byte sizes, chunked
                nbytes = sizes[start:start + _VERIFY_CHUNK].astype(np.int64) * self.dtype.itemsize
                ends = offset + np.cumsum(nbytes)
                f.write((ends - nbytes).tobytes())
                offset = int(ends[-1])
            f.write(self._doc_idx.tobytes())
        # A stale sidecar must not describe the new files, so it goes first and comes back last.
        if os.path.exists(meta_path(self.prefix)):
            os.remove(meta_path(self.prefix))
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(tmp_idx, idx_path(self.prefix))
        if meta is not None:
            atomic.write_json(meta_path(self.prefix), meta, sort_keys=True)

    def abort(self) -> None:
        """Drop the partial output."""
        if not self._bin.closed:
            self._bin.close()
        if os.path.exists(self._tmp_bin):
            os.remove(self._tmp_bin)

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()


def merge_datasets(prefixes: Sequence[str], out_prefix: str, log: Any = None) -> dict:
    """Concatenate datasets (same dtype and tokenizer) into `out_prefix`; returns the merged metadata."""
    if not prefixes:
        raise DataError("merge_datasets: no input datasets given")
    metas = [read_meta(normalize_prefix(p)) for p in prefixes]
    known = [(p, m) for p, m in zip(prefixes, metas) if m]
    for key in ("vocab_size", "tokenizer_sha256"):
        values = {m.get(key) for _, m in known}
        if len(values) > 1:
            detail = ", ".join(f"{p}: {m.get(key)}" for p, m in known)
            raise DataError(f"cannot merge datasets made with different tokenizers ({key} differs: {detail}); "
                            "re-tokenize them with one tokenizer model.")
    first = IndexedDataset(prefixes[0])
    with IndexedDatasetWriter(out_prefix, first.dtype) as writer:
        for i, p in enumerate(prefixes):
            writer.add_index(p)
            if log:
                log(f"merged {i + 1}/{len(prefixes)}: {p} ({writer.num_documents} documents, "
                    f"{writer.num_tokens} tokens so far)")
        meta: dict = dict(known[0][1]) if known else {}
        meta.update({
            "num_documents": writer.num_documents,
            "num_tokens": writer.num_tokens,
            "dtype": str(first.dtype),
            "merged_from": [normalize_prefix(p) for p in prefixes],
        })
        if known and len(known) == len(prefixes):
            maxes = [m.get("max_token_id") for _, m in known]
            meta["max_token_id"] = max(maxes) if all(x is not None for x in maxes) else None
        else:
            meta.pop("max_token_id", None)  # unknown for the parts without a sidecar
        meta.pop("stats", None)
        writer.finalize(meta)
    return meta
