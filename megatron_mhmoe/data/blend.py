"""Blend several datasets by weight, Megatron-LM's way.

Sample n of the blend goes to the dataset most behind its target: argmax_i (w_i * max(n, 1) - c_i),
c_i = samples dataset i got so far (first index on ties). Every dataset then stays within about one
sample of w_i * n at every prefix n, so the weights hold to well under 1% on any window of a few
hundred samples. Deterministic (no randomness at all), cached like the GPT indices.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Protocol, Sequence, Union

import numpy as np

from .errors import DataError
from .index_cache import IndexCache, params_hash

Log = Callable[[str], None]
BlendSpec = Union[str, Sequence[Union[str, float, int]]]


class SampleDataset(Protocol):
    """Anything with len() and integer indexing returning a token array (GPTDataset, BlendedDataset)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> np.ndarray: ...


def parse_blend(spec: BlendSpec) -> tuple[list[str], list[float]]:
    """Megatron's --data-path forms: "prefix", "w1 prefix1 w2 prefix2 ...", or the same as a list.

    Returns (prefixes, normalised weights).
    """
    items = spec.split() if isinstance(spec, str) else [str(x) for x in spec]
    if not items:
        raise DataError("empty data path: give a dataset prefix or 'weight prefix weight prefix ...'")
    if len(items) == 1:
        return [items[0]], [1.0]
    if len(items) % 2:
        raise DataError(f"blend {items} must alternate weight and prefix, e.g. '0.7 data/a_text_document "
                        "0.3 data/b_text_document'")
    prefixes, weights = [], []
    for w, p in zip(items[0::2], items[1::2]):
        try:
            weight = float(w)
        except ValueError:
            raise DataError(f"blend weight {w!r} (before {p!r}) is not a number; the form is "
                            "'weight prefix weight prefix ...'") from None
        if not weight >= 0:
            raise DataError(f"blend weight {w} for {p} must be >= 0")
        prefixes.append(p)
        weights.append(weight)
    total = sum(weights)
    if total <= 0:
        raise DataError(f"blend weights {weights} sum to zero")
    return prefixes, [w / total for w in weights]


def build_blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index, dataset_sample_index) of each blended sample; Megatron's greedy scheme."""
    w = [float(x) for x in weights]
    k = len(w)
    counts = [0] * k
    dataset_index = np.empty(size, dtype=np.int16 if k < 2**15 else np.int32)
    sample_index = np.empty(size, dtype=np.int64)
    # A plain Python loop: k is small and the result is cached; numpy per step would be slower.
    for n in range(size):
        nn = max(n, 1)
        best, best_err = 0, w[0] * nn - counts[0]
        for i in range(1, k):
            err = w[i] * nn - counts[i]
            if err > best_err:
                best, best_err = i, err
        dataset_index[n] = best
        sample_index[n] = counts[best]
        counts[best] += 1
    return dataset_index, sample_index


def cached_blending_indices(weights: Sequence[float], size: int, cache_dir: Optional[str], name: str = "train",
                            log: Log = lambda m: None) -> tuple[np.ndarray, np.ndarray, bool]:
    """build_blending_indices through the on-disk cache; returns (dataset_index, sample_index, from_cache).

    The indices depend only on the normalised weights and the size, so that is all the key holds.
    """
    total = float(sum(weights))
    desc = {"class": "BlendedDataset", "version": 1, "weights": [float(w) / total for w in weights], "size": int(size)}
    key = f"blend-{name}-{params_hash(desc)}"
    cache = IndexCache(cache_dir, log)
    arrays = cache.load(key, ["dataset_index", "dataset_sample_index"])
    if arrays is not None and arrays["dataset_index"].shape == (size,):
        return arrays["dataset_index"], arrays["dataset_sample_index"], True
    t0 = time.perf_counter()
    di, si = build_blending_indices(desc["weights"], size)
    saved = cache.save(key, {"dataset_index": di, "dataset_sample_index": si}, desc)
    log(f"built {name} blending indices ({size} samples over {len(desc['weights'])} datasets) in "
        f"{time.perf_counter() - t0:.2f} s" + (f", cached as {key}" if saved else ""))
    return di, si, False


class BlendedDataset:
    """`blend[n] = datasets[dataset_index[n]][dataset_sample_index[n]]`.

    `indices` (from cached_blending_indices) may be passed in; otherwise they are built in memory.
    """

    def __init__(self, datasets: Sequence[SampleDataset], weights: Sequence[float], size: int,
                 indices: Optional[tuple[np.ndarray, np.ndarray]] = None, name: str = "train") -> None:
        if len(datasets) != len(weights) or not datasets:
            raise DataError(f"{len(datasets)} datasets but {len(weights)} weights")
        total = float(sum(weights))
        self.datasets = list(datasets)
        self.weights = [float(w) / total for w in weights]
        self.size = int(size)
        self.name = name
        di, si = indices if indices is not None else build_blending_indices(self.weights, self.size)
        if len(di) != self.size or len(si) != self.size:
            raise ValueError(f"blending indices have {len(di)} entries, expected {self.size}")
        self.dataset_index: np.ndarray = di
        self.dataset_sample_index: np.ndarray = si
        counts = np.bincount(np.asarray(di, dtype=np.int64), minlength=len(datasets))
        for i, d in enumerate(self.datasets):  # the greedy scheme uses samples 0..counts[i]-1 of dataset i
            if counts[i] > len(d):
                raise DataError(f"blended dataset {i} has {len(d)} samples but the blend needs {int(counts[i])}")
        self.vocab_size = next((getattr(d, "vocab_size", None) for d in self.datasets
                                if getattr(d, "vocab_size", None) is not None), None)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, n: int) -> np.ndarray:
        if not 0 <= n < self.size:
            raise IndexError(f"sample {n} out of range for a blend of {self.size} samples")
        return self.datasets[int(self.dataset_index[n])][int(self.dataset_sample_index[n])]
