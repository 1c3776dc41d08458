"""Rank arithmetic of the two layouts (layout.py): pure functions, no processes."""
from __future__ import annotations

import pytest

from megatron_mhmoe.parallel import layout as L
from megatron_mhmoe.parallel.context import ParallelContext

# (world, tp, ep): dense layout TP x DP and MoE layout EP x EDP over the same ranks.
SIZES = [(1, 1, 1), (2, 2, 1), (2, 1, 2), (4, 2, 2), (4, 1, 4), (4, 4, 2), (8, 2, 4), (8, 4, 8), (8, 8, 1),
         (16, 2, 16), (16, 8, 4)]


def test_groups_worked_example():
    """world 8, TP 2 (DP 4), EP 4 (EDP 2): the groups by hand."""
    assert L.tp_groups(8, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert L.dp_groups(8, 2) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert L.ep_groups(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert L.edp_groups(8, 4) == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_parallel_folding_ep_larger_than_dp():
    """world 8 = TP 4 x DP 2, but EP 8: experts are spread over ranks that split attention heads."""
    world, tp, ep = 8, 4, 8
    coords = [L.RankLayout(r, world, tp, ep) for r in range(world)]
    assert coords[0].dp_size == 2 and coords[0].ep_size == 8 and coords[0].edp_size == 1
    assert L.ep_groups(world, ep) == [list(range(8))]
    assert L.edp_groups(world, ep) == [[r] for r in range(8)]
    assert L.dp_groups(world, tp) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert [c.ep_rank for c in coords] == list(range(8))
    assert [c.tp_rank for c in coords] == [0, 1, 2, 3] * 2
    assert "each EP group of 8 holds 2 whole TP group(s)" in L.describe(world, tp, ep)


@pytest.mark.parametrize("world,tp,ep", SIZES)
def test_groups_partition_the_world_and_match_coordinates(world, tp, ep):
    for groups, size, count in [(L.tp_groups(world, tp), tp, world // tp), (L.dp_groups(world, tp), world // tp, tp),
                                (L.ep_groups(world, ep), ep, world // ep), (L.edp_groups(world, ep), world // ep, ep)]:
        assert len(groups) == count and all(len(g) == size for g in groups)
        assert sorted(r for g in groups for r in g) == list(range(world))  # each rank exactly once
    for r in range(world):
        c = L.RankLayout(r, world, tp, ep)
        tp_g, dp_g = L.group_of(r, L.tp_groups(world, tp)), L.group_of(r, L.dp_groups(world, tp))
        ep_g, edp_g = L.group_of(r, L.ep_groups(world, ep)), L.group_of(r, L.edp_groups(world, ep))
        # a rank's coordinate is its index in its group; TP and EP groups are consecutive ranks
        assert tp_g.index(r) == c.tp_rank and dp_g.index(r) == c.dp_rank
        assert ep_g.index(r) == c.ep_rank and edp_g.index(r) == c.edp_rank
        assert tp_g == list(range(tp_g[0], tp_g[0] + tp)) and ep_g == list(range(ep_g[0], ep_g[0] + ep))
        assert r == c.dp_rank * tp + c.tp_rank == c.edp_rank * ep + c.ep_rank
        # a TP group and a DP group meet in exactly this rank
        assert set(tp_g) & set(dp_g) == {r}
        assert set(ep_g) & set(edp_g) == {r}


@pytest.mark.parametrize("tp,ep,text", [(2, 4, "each EP group of 4 holds 2 whole TP group(s)"),
                                        (4, 2, "each TP group of 4 holds 2 whole EP group(s)"),
                                        (2, 2, "each EP group of 2 holds 1 whole TP group(s)")])
def test_tp_place_in_ep(tp, ep, text):
    assert L.tp_place_in_ep(tp, ep) == text


def test_describe_lists_groups():
    text = L.describe(4, 2, 4)
    assert "world 4 = TP 2 x DP 2" in text and "world 4 = EP 4 x EDP 1" in text
    assert "TP groups:  [[0, 1], [2, 3]]" in text and "EDP groups: [[0], [1], [2], [3]]" in text


def test_group_of_unknown_rank_is_an_internal_error():
    with pytest.raises(AssertionError):
        L.group_of(9, L.tp_groups(4, 2))


def test_single_process_context():
    ctx = ParallelContext.single_process()
    assert (ctx.world_size, ctx.tp_size, ctx.dp_size, ctx.ep_size, ctx.edp_size) == (1, 1, 1, 1, 1)
    assert ctx.tp_group is None and ctx.dp_group is None and not ctx.sequence_parallel
    assert ParallelContext.from_world().world_size == 1  # no torch.distributed: the single-process context
