"""Turn token windows into the model's batch tensors: tokens, labels, loss_mask."""
from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import numpy as np

from .errors import DataError
from .sampler import DPBatchSampler


def collate_samples(samples: Sequence[np.ndarray], eod: Optional[int] = None, mask_eod: bool = False) -> dict:
    """Stack windows of seq_len + 1 tokens into {'tokens', 'labels', 'loss_mask'} torch tensors.

    tokens = window[:-1], labels = window[1:] (int64, shape [B, seq_len]); loss_mask is float32 ones.
    With mask_eod (Megatron's --eod-mask-loss) positions whose *input* token is EOD get mask 0: their
    label is the first token of an unrelated next document.
    """
    import torch

    if not samples:
        raise DataError("cannot collate an empty batch")
    data = torch.from_numpy(np.stack([np.asarray(s, dtype=np.int64) for s in samples]))
    tokens = data[:, :-1].contiguous()
    labels = data[:, 1:].contiguous()
    loss_mask = torch.ones(tokens.shape, dtype=torch.float32)
    if mask_eod:
        if eod is None:
            raise DataError("mask_eod=True needs the tokenizer's eod id")
        loss_mask[tokens == eod] = 0.0
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}


class _Collate:
    """Picklable collate function (DataLoader workers)."""

    def __init__(self, eod: Optional[int], mask_eod: bool) -> None:
        self.eod, self.mask_eod = eod, mask_eod

    def __call__(self, samples: Sequence[np.ndarray]) -> dict:
        return collate_samples(samples, self.eod, self.mask_eod)


def make_batch_iterator(dataset: Any, micro_batch_size: int, grad_accum_steps: int, dp_rank: int, dp_size: int,
                        consumed_samples: int = 0, eod: Optional[int] = None, mask_eod: bool = False,
                        num_workers: int = 0) -> Iterator[dict]:
    """Micro-batches of this data-parallel rank, starting after `consumed_samples` (see DPBatchSampler).

    Each item is collate_samples' dict of [micro_batch_size, seq_len] tensors; grad_accum_steps
    consecutive items form this rank's share of one global batch.
    """
    sampler = DPBatchSampler(len(dataset), micro_batch_size, grad_accum_steps, dp_rank, dp_size, consumed_samples)
    collate = _Collate(eod, mask_eod)
    if num_workers == 0:
        return (collate([dataset[i] for i in batch]) for batch in sampler)
    import torch.utils.data

    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=num_workers, persistent_workers=False)
    return iter(loader)
