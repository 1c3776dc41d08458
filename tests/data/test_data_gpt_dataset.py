"""GPT samples: exact token coverage, splits, determinism, on-disk index cache."""
from __future__ import annotations

import numpy as np
import pytest

from megatron_mhmoe.data import GPTDataset, IndexedDataset, IndexedDatasetWriter, build_train_valid_test_datasets
from megatron_mhmoe.data.gpt_dataset import num_epochs_needed
from megatron_mhmoe.data.split import parse_split, split_ranges

QUIET = lambda m: None  # noqa: E731


def make_dataset(tmp_path, n_docs=40, seed=0, name="ds") -> str:
    """Documents of random lengths (some empty) whose tokens are globally unique: token = its position."""
    rng = np.random.RandomState(seed)
    prefix = str(tmp_path / name)
    pos = 0
    with IndexedDatasetWriter(prefix, np.int32) as w:
        for _ in range(n_docs):
            n = int(rng.choice([0, 1, 3, 17, 40, 101]))
            w.add_document(np.arange(pos, pos + n))
            pos += n
        w.finalize({"vocab_size": 1 << 20})
    return prefix


def concatenation(ds: GPTDataset) -> np.ndarray:
    return np.concatenate([ds.indexed[int(d)] for d in ds.doc_index]).astype(np.int64)


@pytest.mark.parametrize("seq_len", [1, 7, 32, 500])
def test_every_token_in_exactly_the_expected_samples(tmp_path, seq_len):
    indexed = IndexedDataset(make_dataset(tmp_path))
    docs = np.arange(5, 35)
    ds = GPTDataset(indexed, docs, None, seq_len, seed=3, use_cache=False, log=QUIET)  # one epoch
    tokens = concatenation(ds)
    assert sorted(ds.doc_index.tolist()) == docs.tolist()  # the epoch is a permutation of the split
    assert len(tokens) == ds.tokens_per_epoch and len(ds) == (len(tokens) - 1) // seq_len
    for j in range(len(ds)):  # window j = tokens [j*L, j*L + L + 1) of the shuffled-document concatenation
        assert ds.window(j).tolist() == tokens[j * seq_len: j * seq_len + seq_len + 1].tolist()
    assert sorted(ds.shuffle_index.tolist()) == list(range(len(ds)))
    for i in range(len(ds)):
        assert ds[i].tolist() == ds.window(int(ds.shuffle_index[i])).tolist()
    # position p is in the windows j with j*L <= p <= j*L + L (tokens are unique ids), the tail < L in none
    covered = len(ds) * seq_len + 1
    counts = np.bincount(np.concatenate([ds.window(j) for j in range(len(ds))]), minlength=tokens.max() + 1)
    expected = np.zeros_like(counts)
    for p, t in enumerate(tokens[:covered]):
        expected[t] = 2 if (p % seq_len == 0 and 0 < p < covered - 1) else 1
    assert np.array_equal(counts, expected)


def test_multiple_epochs_are_separate_permutations(tmp_path):
    indexed = IndexedDataset(make_dataset(tmp_path, n_docs=10))
    docs = np.arange(10)
    tokens_per_epoch = int(indexed.sizes.sum())
    n = 3 * tokens_per_epoch // 16 + 5
    ds = GPTDataset(indexed, docs, n, 16, seed=1, use_cache=False, log=QUIET)
    assert ds.num_epochs == num_epochs_needed(tokens_per_epoch, 16, n) == 4
    for e in range(ds.num_epochs):
        assert sorted(ds.doc_index[e * 10:(e + 1) * 10].tolist()) == list(range(10))
    tokens = concatenation(ds)
    for j in range(n):
        assert ds.window(j).tolist() == tokens[j * 16: j * 16 + 17].tolist()
    # a tiny split repeated many epochs (vectorised shuffle path)
    big = GPTDataset(indexed, np.arange(3), 2000, 64, seed=1, use_cache=False, log=QUIET)
    assert big.num_epochs >= 64 and all(len(big[i]) == 65 for i in range(0, 2000, 97))


def test_split_ranges_follow_megatron():
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.03, 0.001])
    assert parse_split("90/10") == pytest.approx([0.9, 0.1, 0.0])
    assert split_ranges(1000, parse_split("969,30,1")) == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges(7, parse_split("1,1,1")) == [(0, 3), (3, 5), (5, 7)]  # Megatron shifts by the rounding excess
    assert split_ranges(7, [0.5, 0.5, 0.0]) == [(0, 3), (3, 7), (7, 7)]  # rounds 3.5 down to 3 here, then shifts
    for n in (1, 5, 13, 1001):
        r = split_ranges(n, parse_split("80,15,5"))
        assert r[0][0] == 0 and r[-1][1] == n and all(r[i][1] == r[i + 1][0] for i in range(2))


def test_train_valid_test_use_disjoint_documents(tmp_path):
    prefix = make_dataset(tmp_path, n_docs=100)
    tr, va, te = build_train_valid_test_datasets(prefix, "80,15,5", 8, 0, (50, None, None), use_cache=False, log=QUIET)
    sets = [set(d.documents.tolist()) for d in (tr, va, te)]
    assert sets[0] | sets[1] | sets[2] == set(range(100)) and not (sets[0] & sets[1] or sets[1] & sets[2])
    assert len(tr) == 50 and len(va) == (va.tokens_per_epoch - 1) // 8
    none_test = build_train_valid_test_datasets(prefix, "80,20", 8, 0, (50, 10, 10), use_cache=False, log=QUIET)[2]
    assert none_test is None


def test_deterministic_by_seed(tmp_path):
    indexed = IndexedDataset(make_dataset(tmp_path))
    a, b, c = (GPTDataset(indexed, np.arange(40), 300, 16, seed=s, use_cache=False, log=QUIET) for s in (5, 5, 6))
    for name in ("doc_index", "sample_index", "shuffle_index"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.shuffle_index, c.shuffle_index)
    assert all(np.array_equal(a[i], b[i]) for i in range(len(a)))


def test_index_cache_is_reused_and_self_healing(tmp_path, monkeypatch):
    prefix = make_dataset(tmp_path)
    first = build_train_valid_test_datasets(prefix, "90,10", 16, 7, (300, 20, 0), log=QUIET)[0]
    assert not first.loaded_from_cache
    cached = sorted(p.name for p in (tmp_path / "index_cache").iterdir())
    assert any(n.endswith("-desc.json") for n in cached) and not any(".tmp" in n for n in cached)

    def fail(self):
        raise AssertionError("indices rebuilt instead of loaded from the cache")

    with monkeypatch.context() as m:
        m.setattr(GPTDataset, "_build", fail)
        again = build_train_valid_test_datasets(prefix, "90,10", 16, 7, (300, 20, 0), log=QUIET)[0]
    assert again.loaded_from_cache and all(np.array_equal(first[i], again[i]) for i in range(len(first)))
    assert not again.shuffle_index.flags.writeable  # memory-mapped .npy, no pickle
    # other parameters -> another entry
    other = build_train_valid_test_datasets(prefix, "90,10", 16, 8, (300, 20, 0), log=QUIET)[0]
    assert not other.loaded_from_cache
    # a corrupt entry is rebuilt, not trusted
    victim = next((tmp_path / "index_cache").glob(f"{first.cache_key}-shuffle_index.npy"))
    victim.write_bytes(b"garbage")
    logs: list = []
    healed = build_train_valid_test_datasets(prefix, "90,10", 16, 7, (300, 20, 0), log=logs.append)[0]
    assert not healed.loaded_from_cache and any("unreadable" in m for m in logs)
    assert np.array_equal(healed.shuffle_index, first.shuffle_index)
    # an unusable cache directory falls back to memory, with a message
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    logs = []
    ds = build_train_valid_test_datasets(prefix, "90,10", 16, 7, (300, 0, 0), cache_dir=str(blocker / "sub"),
                                         log=logs.append)[0]
    assert len(ds) == 300 and any("cannot write index cache" in m for m in logs)


def test_multi_sentence_documents_stay_whole(tmp_path):
    """Megatron --split-sentences data: a document's sequences are shuffled as one unit, in order."""
    prefix = str(tmp_path / "sent")
    rng = np.random.RandomState(0)
    pos, docs = 0, []
    with IndexedDatasetWriter(prefix, np.int32) as w:
        for _ in range(30):
            lens = [int(x) for x in rng.randint(0, 9, size=rng.randint(0, 4))]
            w.add_document(np.arange(pos, pos + sum(lens)), lengths=lens)
            docs.append(list(range(pos, pos + sum(lens))))
            pos += sum(lens)
        w.finalize()
    indexed = IndexedDataset(prefix)
    assert not indexed.one_sequence_per_document and indexed.num_documents == 30
    train, valid, _ = build_train_valid_test_datasets(prefix, "2,1", 5, 0, (None, None, 0), use_cache=False,
                                                      log=QUIET)
    for ds in (train, valid):
        tokens = concatenation(ds).tolist()
        split_docs = [docs[d] for d in ds.documents]
        assert ds.tokens_per_epoch == sum(map(len, split_docs)) == len(tokens)
        # the concatenation is the split's documents, each contiguous and in order, in some order
        starts = sorted((tokens.index(d[0]), tuple(d)) for d in split_docs if d)
        assert [t for _, d in starts for t in d] == tokens
        for j in range(len(ds)):
            assert ds.window(j).tolist() == tokens[j * 5: j * 5 + 6]
