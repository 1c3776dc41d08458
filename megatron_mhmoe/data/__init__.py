"""Data pipeline: Megatron `.bin/.idx` datasets, GPT samples, blending, data-parallel batches.

Typical use by the training runtime:

    from megatron_mhmoe.data import build_train_valid_test_datasets, make_batch_iterator
    train, valid, test = build_train_valid_test_datasets(
        "data/corpus_text_document", split="969,30,1", seq_len=1024, seed=1234,
        num_samples=(train_iters * global_batch, eval_samples, 0), model_vocab_size=padded_vocab)
    batches = make_batch_iterator(train, micro_batch, grad_accum, dp_rank, dp_size, consumed_samples)
    batch = next(batches)  # {'tokens', 'labels', 'loss_mask'}: [micro_batch, seq_len] tensors

Importing this package does not import torch (only make_batch_iterator / collate_samples use it).
"""
from .batches import collate_samples, make_batch_iterator
from .blend import BlendedDataset, build_blending_indices, parse_blend
from .builder import build_train_valid_test_datasets
from .errors import DataError
from .gpt_dataset import GPTDataset
from .indexed import IndexedDataset, IndexedDatasetWriter, merge_datasets, optimal_dtype
from .sampler import DPBatchSampler
from .split import parse_split, split_ranges
from .vocab import check_dataset_vocab, check_vocab

__all__ = [
    "BlendedDataset", "DPBatchSampler", "DataError", "GPTDataset", "IndexedDataset", "IndexedDatasetWriter",
    "build_blending_indices", "build_train_valid_test_datasets", "check_dataset_vocab", "check_vocab",
    "collate_samples", "make_batch_iterator", "merge_datasets", "optimal_dtype", "parse_blend", "parse_split",
    "split_ranges",
]
