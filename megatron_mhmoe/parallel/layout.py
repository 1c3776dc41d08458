"""Pure rank arithmetic for the two layouts that share one world of ranks.

Dense layout: world = TP x DP, TP fastest (a TP group is consecutive ranks, so it sits inside a node).
MoE layout ("parallel folding"): the same ranks re-read as EP x EDP, EP fastest (an EP group is
consecutive ranks, intra-node first). EP only has to divide the world, so EP may exceed DP.

Nothing here touches torch.distributed: these functions are tested without processes.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RankLayout:
    """Coordinates of one rank in both layouts."""

    rank: int
    world_size: int
    tp_size: int
    """Tensor-parallel group size (attention heads, dense FFN, vocab are split over it)."""
    ep_size: int
    """Expert-parallel group size (experts are split over it)."""

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tp_size

    @property
    def edp_size(self) -> int:
        return self.world_size // self.ep_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def edp_rank(self) -> int:
        return self.rank // self.ep_size


def validate_sizes(world_size: int, tp_size: int, ep_size: int) -> None:
    """Raise ValueError, with the arithmetic, when TP or EP cannot tile the world."""
    if world_size < 1 or tp_size < 1 or ep_size < 1:
        raise ValueError(
            f"world_size={world_size}, tp_size={tp_size}, ep_size={ep_size}: all must be >= 1")
    if world_size % tp_size:
        raise ValueError(
            f"tensor-parallel size {tp_size} does not divide world size {world_size} "
            f"({world_size} % {tp_size} = {world_size % tp_size}); world = TP x DP, so choose a TP "
            f"from the divisors of {world_size}: {divisors(world_size)}")
    if world_size % ep_size:
        raise ValueError(
            f"expert-parallel size {ep_size} does not divide world size {world_size} "
            f"({world_size} % {ep_size} = {world_size % ep_size}); world = EP x EDP, so choose an EP "
            f"from the divisors of {world_size}: {divisors(world_size)}")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tp_groups(world_size: int, tp_size: int) -> list[list[int]]:
    """Consecutive blocks of tp_size ranks."""
    return [list(range(start, start + tp_size)) for start in range(0, world_size, tp_size)]


def dp_groups(world_size: int, tp_size: int) -> list[list[int]]:
    """Ranks with the same TP rank, one from each TP group."""
    return [list(range(tp_rank, world_size, tp_size)) for tp_rank in range(tp_size)]


def ep_groups(world_size: int, ep_size: int) -> list[list[int]]:
    """Consecutive blocks of ep_size ranks."""
    return tp_groups(world_size, ep_size)


def edp_groups(world_size: int, ep_size: int) -> list[list[int]]:
    """Ranks that hold the same experts: one from each EP group."""
    return dp_groups(world_size, ep_size)


def group_of(rank: int, groups: list[list[int]]) -> list[int]:
    for group in groups:
        if rank in group:
            return group
    raise AssertionError(f"rank {rank} is in none of {groups}")


def tp_place_in_ep(tp_size: int, ep_size: int) -> str:
    """How a TP group and an EP group overlap (for the printed layout).

    Both are consecutive blocks starting at multiples of their size, so one always nests in the other.
    """
    if ep_size % tp_size == 0:
        return f"each EP group of {ep_size} holds {ep_size // tp_size} whole TP group(s)"
    return f"each TP group of {tp_size} holds {tp_size // ep_size} whole EP group(s)" if tp_size % ep_size == 0 \
        else f"TP={tp_size} and EP={ep_size} groups cross each other"


def describe(world_size: int, tp_size: int, ep_size: int) -> str:
    """A human-readable table of both layouts."""
    validate_sizes(world_size, tp_size, ep_size)
    lines = [
        f"world {world_size} = TP {tp_size} x DP {world_size // tp_size} (dense layout, TP fastest)",
        f"world {world_size} = EP {ep_size} x EDP {world_size // ep_size} (MoE layout, EP fastest); "
        + tp_place_in_ep(tp_size, ep_size),
        f"  TP groups:  {tp_groups(world_size, tp_size)}",
        f"  DP groups:  {dp_groups(world_size, tp_size)}",
        f"  EP groups:  {ep_groups(world_size, ep_size)}",
        f"  EDP groups: {edp_groups(world_size, ep_size)}",
    ]
    return "\n".join(lines)
