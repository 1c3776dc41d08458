"""One call from data path + split + sizes to the train/valid/test datasets."""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence, Union

import numpy as np

from .blend import BlendedDataset, BlendSpec, cached_blending_indices, parse_blend
from .errors import DataError
from .gpt_dataset import GPTDataset
from .index_cache import default_cache_dir
from .indexed import IndexedDataset
from .split import SPLIT_NAMES, parse_split, split_ranges
from .vocab import check_dataset_vocab

Log = Callable[[str], None]
Dataset = Union[GPTDataset, BlendedDataset]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_train_valid_test_datasets(
    data_path: BlendSpec,
    split: str,
    seq_len: int,
    seed: int,
    num_samples: Sequence[Optional[int]],
    cache_dir: Optional[str] = None,
    use_cache: bool = True,
    model_vocab_size: Optional[int] = None,
    log: Log = _stderr,
) -> tuple[Optional[Dataset], Optional[Dataset], Optional[Dataset]]:
    """Build (train, valid, test) GPT datasets, blended when data_path names several datasets.

    Args:
        data_path: a dataset prefix, or Megatron's blend "w1 prefix1 w2 prefix2 ..." (string or list).
        split: document split weights, e.g. "969,30,1"; each blended dataset is split the same way.
        seq_len: tokens per sample (each sample holds seq_len + 1 tokens).
        seed: shuffling seed (same seed, same data, same indices).
        num_samples: samples wanted per split, e.g. (train_iters * global_batch, eval_samples, test_samples);
            None = one epoch of that split; 0 = no dataset for it (returned as None).
        cache_dir: index cache directory (default: `index_cache/` next to each dataset).
        use_cache: False never reads or writes index caches.
        model_vocab_size: if given, check every dataset's token ids fit the model's embedding (DataError if not).
    Returns:
        Three datasets (or None for an empty split); each item is an int64 array of seq_len + 1 tokens.
    """
    if len(num_samples) != 3:
        raise DataError(f"num_samples needs (train, valid, test) sizes, got {list(num_samples)}")
    prefixes, weights = parse_blend(data_path)
    split_weights = parse_split(split)
    indexed = []
    for p in prefixes:
        ds = IndexedDataset(p)
        if model_vocab_size is not None:
            check_dataset_vocab(ds, model_vocab_size)
        indexed.append(ds)
    ranges = [split_ranges(ds.num_documents, split_weights) for ds in indexed]
    out: list[Optional[Dataset]] = []
    for s, name in enumerate(SPLIT_NAMES):
        n = num_samples[s]
        if n == 0 or split_weights[s] == 0:
            if n and split_weights[s] == 0:
                log(f"{name}: {n} samples requested but split {split!r} gives it no documents; no {name} dataset")
            out.append(None)
            continue

        def child(k: int, count: Optional[int]) -> GPTDataset:
            start, end = ranges[k][s]
            return GPTDataset(indexed[k], np.arange(start, end, dtype=np.int64), count, seq_len, seed, name=name,
                              cache_dir=cache_dir, use_cache=use_cache, log=log)

        if len(indexed) == 1:
            out.append(child(0, n))
            continue
        if n is None:  # one epoch: the largest blend in which no dataset needs more than its epoch
            epoch = [max((_split_tokens(indexed[k], *ranges[k][s]) - 1) // seq_len, 0) for k in range(len(indexed))]
            n = int(min(e / w for e, w in zip(epoch, weights) if w > 0))
            if n == 0:
                raise DataError(f"the {name} split of {prefixes} is too small for one blended sample of "
                                f"{seq_len + 1} tokens")
        bcache = (cache_dir or default_cache_dir(indexed[0].prefix)) if use_cache else None
        di, si, _ = cached_blending_indices(weights, n, bcache, name=name, log=log)
        counts = np.bincount(np.asarray(di, dtype=np.int64), minlength=len(indexed))
        # Each dataset gets exactly the samples the blend draws from it (datasets with none are skipped).
        children = [child(k, int(counts[k])) if counts[k] else _Empty() for k in range(len(indexed))]
        out.append(BlendedDataset(children, weights, n, indices=(di, si), name=name))
    return out[0], out[1], out[2]


def _split_tokens(ds: IndexedDataset, first_doc: int, end_doc: int) -> int:
    """Tokens in documents [first_doc, end_doc)."""
    return int(ds.sizes[int(ds.doc_idx[first_doc]):int(ds.doc_idx[end_doc])].sum(dtype=np.int64))


class _Empty:
    """Placeholder for a blended dataset the blend never samples (weight too small for this size)."""

    vocab_size = None

    def __len__(self) -> int:
        return 0

    def __getitem__(self, i: int) -> np.ndarray:
        raise IndexError(i)
