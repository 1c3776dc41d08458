"""GPT pretraining samples: fixed windows of seq_len + 1 tokens over shuffled, concatenated documents.

The three index arrays follow Megatron-LM's scheme (pure numpy here, no C++ helper):
1. doc_index: the split's documents, one independent random permutation per epoch, concatenated,
   then written as the *sequence* ids of those documents (the same thing for our one-sequence-per-
   document files; a multi-sentence document stays whole). Epochs are added until the concatenation
   holds num_samples windows.
2. sample_index[j] = (position in doc_index, token offset) where window j starts; window j covers
   tokens [j*seq_len, j*seq_len + seq_len + 1) of the concatenation, so consecutive windows share
   one token (the last label of j is the first input of j + 1) and windows span document boundaries.
   num_samples + 1 rows: row j + 1 marks the (inclusive) end of window j.
3. shuffle_index: a random permutation of the windows; dataset[i] is window shuffle_index[i].
All three come from one numpy RandomState(seed) (the legacy generator, whose streams numpy keeps
stable across versions) and are cached on disk by a hash of the parameters.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from typing import Callable, Optional

import numpy as np

from .errors import DataError
from .index_cache import IndexCache, default_cache_dir, params_hash
from .indexed import IndexedDataset

Log = Callable[[str], None]
INDEX_VERSION = 1  # bump when the index construction changes: invalidates caches
_VECTOR_SHUFFLE_MIN_EPOCHS = 64  # many epochs of a small split: shuffle all epochs in one numpy call


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def num_epochs_needed(tokens_per_epoch: int, seq_len: int, num_samples: int) -> int:
    """Fewest epochs whose concatenation holds num_samples windows of seq_len + 1 (overlapping by 1)."""
    # windows in E epochs = (E * T - 1) // seq_len  >=  num_samples   <=>   E * T >= num_samples * seq_len + 1
    return max(1, -(-(num_samples * seq_len + 1) // tokens_per_epoch))


def build_doc_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState) -> np.ndarray:
    """Per-epoch permutations of `documents`, concatenated (int32 when ids allow)."""
    dtype = np.int32 if len(documents) == 0 or documents.max() < 2**31 - 1 else np.int64
    documents = np.asarray(documents, dtype=dtype)
    if num_epochs < _VECTOR_SHUFFLE_MIN_EPOCHS:
        return np.concatenate([rng.permutation(documents) for _ in range(num_epochs)])
    order = np.argsort(rng.random_sample((num_epochs, len(documents))), axis=1, kind="stable")
    return documents[order].reshape(-1)


def expand_to_sequences(doc_ids: np.ndarray, doc_idx: np.ndarray) -> np.ndarray:
    """Sequence ids of documents, in the given document order (documents made of several sequences,
    e.g. Megatron's --split-sentences data, stay whole and in order)."""
    starts, ends = doc_idx[doc_ids], doc_idx[doc_ids + 1]
    lengths = ends - starts
    offsets = np.zeros(len(doc_ids), dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    # sequence k of the output = starts[d] + (k - offsets[d]) for the document d it falls in
    seq = np.repeat(starts - offsets, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)
    return seq.astype(doc_ids.dtype if seq.size == 0 or seq.max() < 2**31 - 1 else np.int64)


def build_sample_index(sizes: np.ndarray, doc_index: np.ndarray, seq_len: int, num_samples: int) -> np.ndarray:
    """(doc_index position, offset) of token j*seq_len for j = 0..num_samples; int64 [num_samples + 1, 2]."""
    cum = np.zeros(len(doc_index) + 1, dtype=np.int64)
    np.cumsum(sizes[doc_index], dtype=np.int64, out=cum[1:])
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_len
    if starts[-1] >= cum[-1]:
        raise AssertionError("doc_index holds too few tokens for the requested samples")
    # side='right' skips zero-length documents: a window starting at a boundary starts in a real document.
    pos = np.searchsorted(cum, starts, side="right") - 1
    return np.stack([pos, starts - cum[pos]], axis=1)


class GPTDataset:
    """`dataset[i]` is an int64 array of seq_len + 1 tokens (inputs = [:-1], labels = [1:]).

    Args:
        indexed: the tokenized data.
        documents: document ids of `indexed` in this split (e.g. arange(start, end)).
        num_samples: windows to provide; None = exactly one epoch's worth.
        seq_len: model sequence length.
        seed: shuffling seed.
        name: split name, part of the cache file names.
        cache_dir: where index arrays are cached; default `index_cache/` next to the data; a
            non-writable directory falls back to memory only.
        use_cache: False builds in memory and writes nothing.
    """

    def __init__(self, indexed: IndexedDataset, documents: np.ndarray, num_samples: Optional[int], seq_len: int,
                 seed: int, name: str = "train", cache_dir: Optional[str] = None, use_cache: bool = True,
                 log: Log = _stderr) -> None:
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        self.indexed, self.seq_len, self.seed, self.name = indexed, seq_len, seed, name
        self.documents = np.asarray(documents, dtype=np.int64)
        if len(self.documents) and (self.documents.min() < 0 or self.documents.max() >= indexed.num_documents):
            raise DataError(f"document ids out of range for {indexed.prefix} ({indexed.num_documents} documents)")
        self.tokens_per_epoch = int(indexed.sizes[self._sequences(self.documents)].sum(dtype=np.int64))
        where = f"the {name} split of {indexed.prefix} ({len(self.documents)} documents)"
        if self.tokens_per_epoch == 0:
            raise DataError(f"{where} has no tokens; give it a larger share in the split string or use more data.")
        if num_samples is None:
            num_samples = (self.tokens_per_epoch - 1) // seq_len
            if num_samples == 0:
                raise DataError(f"{where} has {self.tokens_per_epoch} tokens, fewer than one sample of seq_len + 1 "
                                f"= {seq_len + 1}; use a shorter seq_len or more data.")
        if num_samples < 0:
            raise DataError(f"num_samples must be >= 0, got {num_samples}")
        self.num_samples = int(num_samples)
        self.num_epochs = num_epochs_needed(self.tokens_per_epoch, seq_len, self.num_samples)
        self.vocab_size: Optional[int] = (indexed.meta or {}).get("vocab_size")
        self.dtype = indexed.dtype
        self.desc = {
            "class": "GPTDataset", "version": INDEX_VERSION, "data": os.path.basename(indexed.prefix),
            "num_sequences": len(indexed), "num_documents_total": indexed.num_documents, "num_tokens": indexed.num_tokens, "name": name,
            "documents_sha256": hashlib.sha256(self.documents.tobytes()).hexdigest(),
            "num_documents": len(self.documents), "num_samples": self.num_samples, "seq_len": seq_len,
            "seed": seed, "num_epochs": self.num_epochs,
        }
        self.cache_key = f"{os.path.basename(indexed.prefix)}-{name}-{params_hash(self.desc)}"
        cache = IndexCache((cache_dir or default_cache_dir(indexed.prefix)) if use_cache else None, log)
        parts = ["doc_index", "sample_index", "shuffle_index"]
        arrays = cache.load(self.cache_key, parts)
        if arrays is not None and (arrays["sample_index"].shape != (self.num_samples + 1, 2)
                                   or arrays["shuffle_index"].shape != (self.num_samples,)):
            log(f"index cache entry {self.cache_key} has unexpected shapes; rebuilding")
            arrays = None
        self.loaded_from_cache = arrays is not None
        if arrays is None:
            t0 = time.perf_counter()
            arrays = self._build()
            saved = cache.save(self.cache_key, arrays, self.desc)
            log(f"built {name} indices for {indexed.prefix}: {self.num_samples} samples, {self.num_epochs} epoch(s) "
                f"in {time.perf_counter() - t0:.2f} s" + (f", cached as {self.cache_key}" if saved else ""))
        self.doc_index: np.ndarray = arrays["doc_index"]
        self.sample_index: np.ndarray = arrays["sample_index"]
        self.shuffle_index: np.ndarray = arrays["shuffle_index"]

    def _sequences(self, doc_ids: np.ndarray) -> np.ndarray:
        """Sequence ids of documents: the same ids for our files (and Megatron's without
        --split-sentences), which hold one sequence per document."""
        if self.indexed.one_sequence_per_document:
            return doc_ids
        return expand_to_sequences(doc_ids, np.asarray(self.indexed.doc_idx))

    def _build(self) -> dict[str, np.ndarray]:
        rng = np.random.RandomState(self.seed)
        doc_index = self._sequences(build_doc_index(self.documents, self.num_epochs, rng))
        sample_index = build_sample_index(self.indexed.sizes, doc_index, self.seq_len, self.num_samples)
        shuffle_index = rng.permutation(self.num_samples).astype(np.int64)
        return {"doc_index": doc_index, "sample_index": sample_index, "shuffle_index": shuffle_index}

    def __len__(self) -> int:
        return self.num_samples

    def window(self, j: int) -> np.ndarray:
        """Window j in concatenation order (before the sample shuffle)."""
        first_pos, first_off = (int(v) for v in self.sample_index[j])
        last_pos, last_off = (int(v) for v in self.sample_index[j + 1])
        if first_pos == last_pos:
            return self.indexed.get(int(self.doc_index[first_pos]), first_off,
                                    last_off - first_off + 1).astype(np.int64)
        pieces = [self.indexed.get(int(self.doc_index[first_pos]), first_off)]
        pieces += [self.indexed.get(int(self.doc_index[p])) for p in range(first_pos + 1, last_pos)]
        pieces.append(self.indexed.get(int(self.doc_index[last_pos]), 0, last_off + 1))
        out = np.concatenate(pieces).astype(np.int64)
        assert len(out) == self.seq_len + 1, (len(out), self.seq_len)
        return out

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for the {self.name} dataset of {self.num_samples} samples")
        return self.window(int(self.shuffle_index[i]))
