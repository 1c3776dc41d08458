"""Data-parallel batch sampler that resumes from a consumed-samples count.

Global batch b covers samples [start_b, start_b + G) with G = micro_batch * grad_accum * dp_size and
start_b = consumed_samples + b * G. Data-parallel rank r owns the consecutive slice
[start_b + r * micro_batch * grad_accum, start_b + (r + 1) * micro_batch * grad_accum) and gets it as
grad_accum micro-batches in order. The only state is consumed_samples (what the checkpoint stores),
so resuming, even with a different dp_size, continues exactly where training stopped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from .errors import DataError


@dataclass
class DPBatchSampler:
    """Yields lists of sample indices, one per micro-batch, for one data-parallel rank.

    Usable directly or as `torch.utils.data.DataLoader(batch_sampler=...)`. Incomplete global
    batches at the end of the dataset are dropped (every rank must run the same number of steps).
    """

    total_samples: int
    """Length of the dataset."""
    micro_batch_size: int
    grad_accum_steps: int
    dp_rank: int
    dp_size: int
    consumed_samples: int = 0
    """Samples consumed by all ranks together before this sampler starts (from the checkpoint)."""

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "grad_accum_steps", "dp_size"):
            if getattr(self, name) < 1:
                raise DataError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.dp_rank < self.dp_size:
            raise DataError(f"dp_rank {self.dp_rank} must be in [0, dp_size={self.dp_size})")
        if self.consumed_samples < 0:
            raise DataError(f"consumed_samples must be >= 0, got {self.consumed_samples}")
        if self.consumed_samples > self.total_samples:
            raise DataError(f"consumed_samples {self.consumed_samples} > dataset size {self.total_samples}: the "
                            "checkpoint consumed more samples than this dataset provides; build the dataset with "
                            "at least train_iters * global_batch_size samples.")

    @property
    def global_batch_size(self) -> int:
        """micro_batch_size * grad_accum_steps * dp_size."""
        return self.micro_batch_size * self.grad_accum_steps * self.dp_size

    @property
    def num_global_batches(self) -> int:
        """Complete global batches left after consumed_samples."""
        return (self.total_samples - self.consumed_samples) // self.global_batch_size

    def __len__(self) -> int:
        """Micro-batches this rank will yield."""
        return self.num_global_batches * self.grad_accum_steps

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.micro_batch_size * self.grad_accum_steps
        for b in range(self.num_global_batches):
            base = self.consumed_samples + b * self.global_batch_size + self.dp_rank * per_rank
            for m in range(self.grad_accum_steps):
                start = base + m * self.micro_batch_size
                yield list(range(start, start + self.micro_batch_size))
