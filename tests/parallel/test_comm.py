"""comm.py autograd collectives: forward values, and backward = the conjugate collective.

One spawn of 4 gloo processes (TP groups {0,1},{2,3} and one EP group of all 4) runs every function
over a group of 2 and a group of 4. Each rank q feeds x_q (forward input) and w_q (the gradient that
arrives from above: loss = sum(y_q * w_q)); both are regenerated here from (rank, salt), so the parent
computes the expected y and x.grad itself:

| function                           | y on group index i            | x.grad on group index i       |
|------------------------------------|-------------------------------|-------------------------------|
| copy_to_region                     | x_i                           | sum_q w_q        (all-reduce) |
| reduce_from_region                 | sum_q x_q                     | w_i              (identity)   |
| scatter_to_region(dim)             | chunk_i(x_i)                  | cat_q w_q        (all-gather) |
| gather_from_region(dim)            | cat_q x_q                     | chunk_i(w_i)     (split)      |
| gather_from_sequence_region(dim)   | cat_q x_q                     | chunk_i(sum_q w_q) (reduce-scatter) |
| reduce_scatter_to_sequence_region  | chunk_i(sum_q x_q)            | cat_q w_q        (all-gather) |
| all_to_all (uneven, with zeros)    | rows sent to i by each q      | rows sent back   (reverse a2a)|

The last three are exact adjoints as maps of the distributed tensor, so additionally
sum_q <y_q, w_q> == sum_q <x_q, grad_q>.
"""
from __future__ import annotations

import pytest
import torch

from megatron_mhmoe.parallel import comm
from megatron_mhmoe.parallel.context import ParallelContext
from tests.distributed import run_workers

FUNCS = ["copy", "reduce", "scatter", "gather", "gather_seq", "reduce_scatter_seq", "all_to_all"]


def _data(rank: int, salt: int, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * salt + rank)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _splits(n: int) -> list[list[int]]:
    """splits[i][j]: rows group index i sends to j (uneven, some zero)."""
    return [[(i + 2 * j) % 3 for j in range(n)] for i in range(n)]


def _shapes(fn: str, n: int, i: int):
    """(x shape, y shape) on group index i of a group of n."""
    return {
        "copy": ((4, 8), (4, 8)),
        "reduce": ((4, 8), (4, 8)),
        "scatter": ((4, 8), (4, 8 // n)),
        "gather": ((4, 2), (4, 2 * n)),
        "gather_seq": ((2, 3), (2 * n, 3)),
        "reduce_scatter_seq": ((2 * n, 3), (2, 3)),
        "all_to_all": ((sum(_splits(n)[i]), 3), (sum(row[i] for row in _splits(n)), 3)),
    }[fn]


def _apply(fn: str, x: torch.Tensor, group, n: int, i: int) -> torch.Tensor:
    if fn == "copy":
        return comm.copy_to_region(x, group)
    if fn == "reduce":
        return comm.reduce_from_region(x, group)
    if fn == "scatter":
        return comm.scatter_to_region(x, 1, group)
    if fn == "gather":
        return comm.gather_from_region(x, 1, group)
    if fn == "gather_seq":
        return comm.gather_from_sequence_region(x, 0, group)
    if fn == "reduce_scatter_seq":
        return comm.reduce_scatter_to_sequence_region(x, 0, group)
    splits = _splits(n)
    return comm.all_to_all(x, out_splits=[row[i] for row in splits], in_splits=splits[i], group=group)


def _worker(rank: int, world: int) -> dict:
    ctx = ParallelContext.from_world(tp_size=2, ep_size=4)
    out = {"groups": {"tp": ctx.tp_ranks, "ep": ctx.ep_ranks}}
    for gname, group, members in [("tp", ctx.tp_group, ctx.tp_ranks), ("ep", ctx.ep_group, ctx.ep_ranks)]:
        n, i = len(members), members.index(rank)
        for salt, fn in enumerate(FUNCS):
            xs, ys = _shapes(fn, n, i)
            x = _data(rank, 2 * salt, xs).requires_grad_()
            y = _apply(fn, x, group, n, i)
            (y * _data(rank, 2 * salt + 1, ys)).sum().backward()
            out[(gname, fn)] = (y.detach(), x.grad)
    # Raw helpers: an indivisible split names the arithmetic; gloo's reduce-scatter fallback is right.
    try:
        comm.split(torch.zeros(5), 0, ctx.tp_group)
        out["split_error"] = None
    except ValueError as e:
        out["split_error"] = str(e)
    out["reduce_scatter_raw"] = comm.reduce_scatter(_data(rank, 99, (4, 2)), 0, ctx.ep_group)
    return out


@pytest.fixture(scope="module")
def results():
    return run_workers(_worker, 4)


def _expected(fn: str, members: list[int], rank: int):
    n, i = len(members), members.index(rank)
    salt = FUNCS.index(fn)
    xs = {q: _data(q, 2 * salt, _shapes(fn, n, members.index(q))[0]) for q in members}
    ws = {q: _data(q, 2 * salt + 1, _shapes(fn, n, members.index(q))[1]) for q in members}
    if fn != "all_to_all":  # same shapes on every rank
        x_sum, w_sum = sum(xs.values()), sum(ws.values())
    if fn == "copy":
        return xs[rank], w_sum
    if fn == "reduce":
        return x_sum, ws[rank]
    if fn == "scatter":
        return xs[rank].chunk(n, 1)[i], torch.cat([ws[q] for q in members], 1)
    if fn == "gather":
        return torch.cat([xs[q] for q in members], 1), ws[rank].chunk(n, 1)[i]
    if fn == "gather_seq":
        return torch.cat([xs[q] for q in members], 0), w_sum.chunk(n, 0)[i]
    if fn == "reduce_scatter_seq":
        return x_sum.chunk(n, 0)[i], torch.cat([ws[q] for q in members], 0)
    splits = _splits(n)
    # block of x_q's rows addressed to j: rows [sum(splits[q][:j]), + splits[q][j])
    def block(t, row, j):
        start = sum(row[:j])
        return t[start:start + row[j]]
    y = torch.cat([block(xs[q], splits[members.index(q)], i) for q in members], 0)
    # w_q's rows came from each sender in order; the rows from i go back to i
    grad = torch.cat([block(ws[q], [row[members.index(q)] for row in splits], i) for q in members], 0)
    return y, grad


@pytest.mark.parametrize("gname", ["tp", "ep"])
@pytest.mark.parametrize("fn", FUNCS)
def test_forward_and_backward(results, gname, fn):
    for rank, res in enumerate(results):
        members = res["groups"][gname]
        y, grad = res[(gname, fn)]
        y_ref, grad_ref = _expected(fn, members, rank)
        torch.testing.assert_close(y, y_ref, msg=f"{fn} forward, rank {rank}, group {members}")
        torch.testing.assert_close(grad, grad_ref, msg=f"{fn} backward, rank {rank}, group {members}")


@pytest.mark.parametrize("gname", ["tp", "ep"])
@pytest.mark.parametrize("fn", ["gather_seq", "reduce_scatter_seq", "all_to_all"])
def test_backward_is_the_adjoint(results, gname, fn):
    """<A x, w> == <x, A^T w> summed over ranks, for the maps that are exact adjoint pairs."""
    salt = FUNCS.index(fn)
    lhs = rhs = 0.0
    for rank, res in enumerate(results):
        members = res["groups"][gname]
        n, i = len(members), members.index(rank)
        y, grad = res[(gname, fn)]
        xs, ys = _shapes(fn, n, i)
        lhs += float((y * _data(rank, 2 * salt + 1, ys)).sum())
        rhs += float((_data(rank, 2 * salt, xs) * grad).sum())
    assert lhs == pytest.approx(rhs, rel=1e-12)


def test_groups(results):
    assert [r["groups"]["tp"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert all(r["groups"]["ep"] == [0, 1, 2, 3] for r in results)


def test_raw_helpers(results):
    assert results[0]["split_error"] == "cannot split dim 0 of size 5 over 2 ranks (5 % 2 = 1)"
    total = sum(_data(q, 99, (4, 2)) for q in range(4))
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["reduce_scatter_raw"], total.chunk(4, 0)[rank])


def test_identity_without_group():
    """Size-1 groups are None: every function is the identity, forward and backward."""
    x = torch.randn(4, 6, requires_grad=True)
    for fn in FUNCS:
        y = _apply(fn, x, None, 1, 0)
        assert y is x, fn
    assert comm.group_size(None) == 1 and comm.group_rank(None) == 0
