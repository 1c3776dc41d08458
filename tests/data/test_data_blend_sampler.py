"""Blending by weight, the data-parallel sampler, resume, and batch tensors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_mhmoe.data import (DPBatchSampler, IndexedDatasetWriter, build_blending_indices,
                                 build_train_valid_test_datasets, collate_samples, make_batch_iterator, parse_blend)
from megatron_mhmoe.data.errors import DataError

QUIET = lambda m: None  # noqa: E731


def make_dataset(tmp_path, name: str, base: int, n_docs: int = 60) -> str:
    """Token ids in [base, base + 1000): a sample's ids tell which dataset it came from."""
    rng = np.random.RandomState(base)
    prefix = str(tmp_path / name)
    with IndexedDatasetWriter(prefix, np.int32) as w:
        for _ in range(n_docs):
            w.add_document(base + rng.randint(0, 1000, size=rng.randint(1, 80)))
        w.finalize()
    return prefix


def test_blending_indices_follow_weights_at_every_prefix():
    weights = [0.5, 0.3, 0.2]
    di, si = build_blending_indices(weights, 10_000)
    assert di[:10].tolist() == [0, 1, 2, 0, 1, 0, 2, 0, 1, 0]  # worked by hand: argmax w_i*max(n,1) - c_i
    counts = np.zeros(3)
    for n, d in enumerate(di):
        assert si[n] == counts[d]  # each dataset is read in order 0, 1, 2, ...
        counts[d] += 1
        assert np.all(np.abs(counts - np.array(weights) * (n + 1)) <= 1.5)
    assert np.allclose(counts / 10_000, weights, rtol=0.01)
    di2, si2 = build_blending_indices(weights, 10_000)
    assert np.array_equal(di, di2) and np.array_equal(si, si2)


def test_blended_datasets_hold_weights_within_one_percent(tmp_path):
    a, b = make_dataset(tmp_path, "a", 0), make_dataset(tmp_path, "b", 1000)
    assert parse_blend(f"3 {a} 1 {b}") == ([a, b], [0.75, 0.25])
    train, valid, _ = build_train_valid_test_datasets([0.75, a, 0.25, b], "90,10,0", 16, 1, (4000, None, 0),
                                                      log=QUIET)
    from_b = np.array([train[i][0] >= 1000 for i in range(len(train))])
    for i in range(0, 4000, 137):
        s = train[i]
        assert (s >= 1000).all() or (s < 1000).all()  # a sample never mixes datasets
    assert abs(from_b.mean() - 0.25) < 0.01
    assert abs(from_b[:400].mean() - 0.25) < 0.01  # also on a short prefix
    assert len(valid) > 0 and valid.datasets[0].name == "valid"
    again = build_train_valid_test_datasets([0.75, a, 0.25, b], "90,10,0", 16, 1, (4000, None, 0), log=QUIET)[0]
    assert all(np.array_equal(train[i], again[i]) for i in range(0, 4000, 7))  # deterministic (and cached)
    assert all(d.loaded_from_cache for d in again.datasets)
    with pytest.raises(DataError, match="not a number"):
        parse_blend(f"x {a} 1 {b}")


def test_sampler_gives_each_rank_its_consecutive_slice():
    mbs, ga, dp = 2, 3, 4
    gbs = mbs * ga * dp
    per_rank = [list(DPBatchSampler(100, mbs, ga, r, dp)) for r in range(dp)]
    assert DPBatchSampler(100, mbs, ga, 0, dp).global_batch_size == gbs == 24
    assert all(len(b) == (100 // gbs) * ga for b in per_rank)  # incomplete last global batch dropped
    for step in range(100 // gbs):
        union = []
        for r in range(dp):
            micro = per_rank[r][step * ga:(step + 1) * ga]
            flat = [i for m in micro for i in m]
            assert flat == list(range(step * gbs + r * mbs * ga, step * gbs + (r + 1) * mbs * ga))
            assert all(len(m) == mbs for m in micro)
            union += flat
        assert sorted(union) == list(range(step * gbs, (step + 1) * gbs))
    with pytest.raises(DataError, match=r"dp_rank 4 must be in \[0, dp_size=4\)"):
        DPBatchSampler(100, mbs, ga, 4, dp)
    with pytest.raises(DataError, match="consumed_samples 200 > dataset size 100"):
        DPBatchSampler(100, mbs, ga, 0, dp, consumed_samples=200)


def test_resume_from_consumed_samples_gives_the_identical_next_batch(tmp_path):
    prefix = make_dataset(tmp_path, "a", 0)
    train = build_train_valid_test_datasets(prefix, "1", 16, 3, (200, 0, 0), log=QUIET)[0]
    mbs, ga, dp = 2, 2, 2
    for rank in range(dp):
        full = list(make_batch_iterator(train, mbs, ga, rank, dp, consumed_samples=0))
        steps_done = 5
        consumed = steps_done * mbs * ga * dp
        resumed = make_batch_iterator(train, mbs, ga, rank, dp, consumed_samples=consumed)
        for expected in full[steps_done * ga:]:
            got = next(resumed)
            assert all(torch.equal(got[k], expected[k]) for k in expected)
        assert next(resumed, None) is None
    # a restart with another data-parallel size continues with the same global batch of samples
    def first_global_batch(mbs: int, ga: int, dp: int) -> list[int]:
        return sorted(i for r in range(dp) for m in list(DPBatchSampler(200, mbs, ga, r, dp, 40))[:ga] for i in m)

    assert first_global_batch(2, 2, 2) == first_global_batch(2, 1, 4) == list(range(40, 48))


def test_batch_tensors_and_eod_mask(tmp_path):
    samples = [np.array([5, 2, 7, 8]), np.array([2, 3, 4, 2])]
    b = collate_samples(samples)
    assert b["tokens"].tolist() == [[5, 2, 7], [2, 3, 4]] and b["labels"].tolist() == [[2, 7, 8], [3, 4, 2]]
    assert b["tokens"].dtype == torch.int64 and b["loss_mask"].dtype == torch.float32
    assert b["loss_mask"].tolist() == [[1, 1, 1], [1, 1, 1]]
    masked = collate_samples(samples, eod=2, mask_eod=True)
    assert masked["loss_mask"].tolist() == [[1, 0, 1], [0, 1, 1]]  # input token is EOD -> no loss
    with pytest.raises(DataError, match="needs the tokenizer's eod id"):
        collate_samples(samples, mask_eod=True)
    prefix = make_dataset(tmp_path, "a", 0)
    train = build_train_valid_test_datasets(prefix, "1", 16, 3, (64, 0, 0), log=QUIET)[0]
    plain = list(make_batch_iterator(train, 4, 1, 0, 1))
    workers = list(make_batch_iterator(train, 4, 1, 0, 1, num_workers=1))
    assert len(plain) == 16 and all(torch.equal(p["tokens"], w["tokens"]) for p, w in zip(plain, workers))
    assert plain[0]["tokens"].shape == (4, 16)
