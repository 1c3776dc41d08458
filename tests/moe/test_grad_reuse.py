"""Large CPU weight gradients reuse a free earlier storage (grouped_ffn.REUSE_GRAD_MIN_BYTES).

The threshold is lowered so that tiny experts take the path. Asserted: a step after `.grad = None` writes
its gradient into the previous step's storage (no fresh block) with the same values as a fresh allocation;
a gradient still held anywhere (kept by the caller, or the .grad being accumulated into) is never reused,
so accumulation and held gradients keep their values; release_kept_grads frees the kept storage.
"""
from __future__ import annotations

import pytest
import torch

from megatron_mhmoe.moe import grouped_ffn as gf

E, D, F, COUNTS = 4, 16, 32, [10, 0, 20, 10]  # an expert without rows: its gradient must be exactly 0


@pytest.fixture
def reuse_small(monkeypatch):
    monkeypatch.setattr(gf, "REUSE_GRAD_MIN_BYTES", 1024)
    gf.release_kept_grads()
    yield
    gf.release_kept_grads()


def _setup():
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(E, D, F, generator=g).requires_grad_()
    w2 = torch.randn(E, F, D, generator=g).requires_grad_()
    rows = torch.randn(sum(COUNTS), D, generator=g).requires_grad_()
    return rows, w1, w2


def _backward(rows, w1, w2):
    gf.grouped_ffn(rows, w1, w2, None, COUNTS, False).square().sum().backward()


def test_freed_gradient_storage_is_reused_with_the_same_values(reuse_small, monkeypatch):
    rows, w1, w2 = _setup()
    _backward(rows, w1, w2)
    first = (w1.grad.data_ptr(), w2.grad.data_ptr())
    expect1, expect2 = w1.grad.clone(), w2.grad.clone()
    w1.grad.fill_(7.0)  # stale values in the storage the next step reuses
    w2.grad.fill_(7.0)
    w1.grad = w2.grad = rows.grad = None
    _backward(rows, w1, w2)
    assert (w1.grad.data_ptr(), w2.grad.data_ptr()) == first  # reused, not a fresh block
    assert torch.equal(w1.grad, expect1) and torch.equal(w2.grad, expect2)
    assert w1.grad[1].abs().max() == 0 and w2.grad[1].abs().max() == 0  # the empty expert: exactly 0


def test_held_or_accumulated_gradients_are_never_reused(reuse_small):
    rows, w1, w2 = _setup()
    _backward(rows, w1, w2)
    once = w1.grad.clone()
    _backward(rows, w1, w2)  # accumulates into the live .grad: a second storage, not the .grad's own
    torch.testing.assert_close(w1.grad, 2 * once)
    held = w1.grad
    w1.grad = None
    _backward(rows, w1, w2)  # `held` is alive: its storage must not be written
    assert held.data_ptr() != w1.grad.data_ptr()
    torch.testing.assert_close(held, 2 * once)
    torch.testing.assert_close(w1.grad, once)
    gf.release_kept_grads()
    assert gf._kept_grads == {}
