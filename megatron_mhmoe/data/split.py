"""Train/valid/test splits of a dataset's documents from a Megatron split string like "969,30,1"."""
from __future__ import annotations

from .errors import DataError

SPLIT_NAMES = ("train", "valid", "test")


def parse_split(split: str) -> list[float]:
    """Normalised weights of "969,30,1" (',' or '/' separated, up to 3 parts, missing parts are 0)."""
    parts = [p.strip() for p in split.replace("/", ",").split(",") if p.strip()]
    if not 1 <= len(parts) <= 3:
        raise DataError(f"split {split!r} must have 1 to 3 comma-separated weights, e.g. '969,30,1'")
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise DataError(f"split {split!r} has a non-numeric weight; use e.g. '969,30,1'") from None
    if any(w < 0 or w != w for w in weights) or sum(weights) <= 0:
        raise DataError(f"split {split!r} weights must be >= 0 with a positive sum")
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return [w / total for w in weights]


def split_ranges(num_documents: int, weights: list[float]) -> list[tuple[int, int]]:
    """[start, end) document ranges per split, Megatron's rounding (the last boundary is num_documents)."""
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w * float(num_documents))))
    diff = bounds[-1] - num_documents
    bounds = [bounds[0]] + [b - diff for b in bounds[1:]]
    return [(max(bounds[i], 0), max(bounds[i + 1], 0)) for i in range(len(weights))]
