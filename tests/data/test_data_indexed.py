"""The .bin/.idx format: our writer/reader round trip and byte compatibility with Megatron's layout."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from megatron_mhmoe.data.errors import DataError
from megatron_mhmoe.data.indexed import (IndexedDataset, IndexedDatasetWriter, merge_datasets, optimal_dtype,
                                         read_meta)

MEGATRON_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
                  8: np.uint16}


def write_by_hand(prefix: str, docs: list[list[int]], dtype=np.uint16, code: int = 8) -> None:
    """An index written with struct/numpy straight from the published layout (Megatron's _IndexWriter)."""
    with open(prefix + ".bin", "wb") as f:
        for d in docs:
            f.write(np.array(d, dtype=dtype).tobytes())
    sizes = [len(d) for d in docs]
    pointers, p = [], 0
    for n in sizes:
        pointers.append(p)
        p += n * np.dtype(dtype).itemsize
    doc_idx = list(range(len(docs) + 1))
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(np.array(sizes, dtype=np.int32).tobytes(order="C"))
        f.write(np.array(pointers, dtype=np.int64).tobytes(order="C"))
        f.write(np.array(doc_idx, dtype=np.int64).tobytes(order="C"))


def read_by_hand(prefix: str) -> tuple[type, list[np.ndarray], np.ndarray]:
    """Parse our files the way Megatron's _IndexReader / _MMapBinReader do."""
    with open(prefix + ".idx", "rb") as stream:
        assert stream.read(9) == b"MMIDIDX\x00\x00"
        assert struct.unpack("<Q", stream.read(8))[0] == 1
        dtype = MEGATRON_CODES[struct.unpack("<B", stream.read(1))[0]]
        seq_count = struct.unpack("<Q", stream.read(8))[0]
        doc_count = struct.unpack("<Q", stream.read(8))[0]
        offset = stream.tell()
    buf = open(prefix + ".idx", "rb").read()
    sizes = np.frombuffer(buf, dtype=np.int32, count=seq_count, offset=offset)
    pointers = np.frombuffer(buf, dtype=np.int64, count=seq_count, offset=offset + sizes.nbytes)
    doc_idx = np.frombuffer(buf, dtype=np.int64, count=doc_count, offset=offset + sizes.nbytes + pointers.nbytes)
    assert len(buf) == offset + sizes.nbytes + pointers.nbytes + doc_idx.nbytes
    # Megatron's IndexedDataset asserts these after loading.
    assert sizes.shape[0] == doc_idx[-1] == seq_count
    data = open(prefix + ".bin", "rb").read()
    seqs = [np.frombuffer(data, dtype=dtype, count=int(n), offset=int(p)) for n, p in zip(sizes, pointers)]
    return dtype, seqs, doc_idx


DOCS = [[5, 6, 7], [1], [], [65000, 2, 3, 4], [9] * 10]


def test_round_trip_writer_reader(tmp_path):
    prefix = str(tmp_path / "ds")
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d in DOCS:
            w.add_document(d)
        w.finalize({"vocab_size": 65001})
    ds = IndexedDataset(prefix)
    assert len(ds) == len(DOCS) and ds.num_documents == len(DOCS) and ds.dtype == np.uint16
    assert [ds[i].tolist() for i in range(len(ds))] == DOCS
    assert ds.get(3, offset=1, length=2).tolist() == [2, 3]
    assert ds.num_tokens == sum(map(len, DOCS)) and ds.max_token_id() == 65000
    assert read_meta(prefix)["vocab_size"] == 65001


def test_our_reader_reads_hand_written_megatron_files(tmp_path):
    prefix = str(tmp_path / "megatron")
    write_by_hand(prefix, DOCS)
    ds = IndexedDataset(prefix)
    assert [x.tolist() for x in ds] == DOCS and ds.doc_idx.tolist() == list(range(len(DOCS) + 1))
    write_by_hand(prefix, [[70000, 1], [2**31 - 1]], dtype=np.int32, code=4)
    assert [x.tolist() for x in IndexedDataset(prefix)] == [[70000, 1], [2**31 - 1]]


def test_hand_written_megatron_reader_reads_our_files(tmp_path):
    prefix = str(tmp_path / "ours")
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d in DOCS:
            w.add_document(d)
        w.finalize()
    dtype, seqs, doc_idx = read_by_hand(prefix)
    assert dtype is np.uint16 and [s.tolist() for s in seqs] == DOCS
    assert doc_idx.tolist() == list(range(len(DOCS) + 1))
    # byte for byte what the published layout gives
    ref = str(tmp_path / "ref")
    write_by_hand(ref, DOCS)
    for ext in (".bin", ".idx"):
        assert open(prefix + ext, "rb").read() == open(ref + ext, "rb").read()


def test_multi_sequence_documents_and_merge(tmp_path):
    a, b, out = (str(tmp_path / n) for n in ("a", "b", "ab"))
    with IndexedDatasetWriter(a, np.int32) as w:
        w.add_document([1, 2, 3, 4, 5], lengths=[2, 3])  # one document, two sentences (Megatron --split-sentences)
        w.add_document([70000])
        w.finalize({"vocab_size": 80000, "max_token_id": 70000})
    with IndexedDatasetWriter(b, np.int32) as w:
        w.add_documents(np.array([7, 8, 9]), np.array([1, 2]))
        w.finalize({"vocab_size": 80000, "max_token_id": 9})
    merge_datasets([a, b], out)
    ds = IndexedDataset(out)
    assert [x.tolist() for x in ds] == [[1, 2], [3, 4, 5], [70000], [7], [8, 9]]
    assert ds.doc_idx.tolist() == [0, 2, 3, 4, 5]
    assert ds.meta["max_token_id"] == 70000 and ds.meta["num_tokens"] == 9
    _, seqs, doc_idx = read_by_hand(out)
    assert doc_idx.tolist() == [0, 2, 3, 4, 5]


def test_optimal_dtype_follows_megatron():
    assert optimal_dtype(8000) == np.uint16 and optimal_dtype(65499) == np.uint16
    assert optimal_dtype(65500) == np.int32 and optimal_dtype(128000) == np.int32


def test_writer_refuses_ids_that_overflow_the_dtype(tmp_path):
    with IndexedDatasetWriter(str(tmp_path / "x"), np.uint16) as w:
        with pytest.raises(DataError, match="do not fit uint16"):
            w.add_document(np.array([1, 70000]))


def test_interrupted_writer_leaves_no_dataset(tmp_path):
    prefix = str(tmp_path / "x")
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            w.add_document([1, 2])
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_empty_dataset_opens(tmp_path):
    prefix = str(tmp_path / "empty")
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        w.finalize()
    ds = IndexedDataset(prefix)
    assert len(ds) == 0 and ds.num_tokens == 0 and ds.max_token_id() == -1
