"""Count what this rank hands to torch.distributed.all_to_all_single: the measured side of the bytes check.

Every all-to-all of the project goes through dist.all_to_all_single (parallel/comm.py all_to_all_v),
forward and backward alike. The meter wraps that one function for the duration of a `with` block and
records, per call, the bytes this rank sends in total and to other ranks (its own split stays local).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist


@dataclass
class A2AMeter:
    calls: int = 0
    bytes_total: int = 0
    """Bytes handed to the collective (including the split this rank sends to itself)."""
    bytes_off_rank: int = 0
    """Bytes that leave this rank."""
    per_call: list = field(default_factory=list)
    per_node: int = 0
    """Ranks per node (group ranks p // per_node share a node); 0 = one node."""
    bytes_off_node: int = 0
    """Bytes sent to ranks of other nodes (counted when per_node > 0; node of global rank g = g // per_node)."""
    bytes_off_rail: int = 0
    """Of bytes_off_node, those sent to a rank whose local index (g % per_node) differs from this rank's: on a
    rail-optimised cluster they would cross to another rail's switch."""
    _orig: object = None

    def __enter__(self) -> "A2AMeter":
        self._orig = dist.all_to_all_single
        meter = self

        def metered(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            # Splits count rows of dim 0: a row is everything after it (1 value for the counts vector).
            row_bytes = (input.numel() // input.shape[0] if input.shape[0] else 0) * input.element_size()
            world = dist.get_world_size(group)
            splits = list(input_split_sizes) if input_split_sizes else [input.shape[0] // world] * world
            me = dist.get_rank(group)
            ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))  # global
            total = sum(splits) * row_bytes
            meter.calls += 1
            meter.bytes_total += total
            meter.bytes_off_rank += total - splits[me] * row_bytes
            off_rail = off_node = 0
            if meter.per_node:
                L, g = meter.per_node, ranks[me]
                off = [(n, ranks[q]) for q, n in enumerate(splits) if ranks[q] // L != g // L]
                off_rail = row_bytes * sum(n for n, r in off if r % L != g % L)
                off_node = row_bytes * sum(n for n, _ in off)
                meter.bytes_off_node += off_node
                meter.bytes_off_rail += off_rail
            meter.per_call.append(dict(rows=sum(splits), row_bytes=row_bytes, bytes=total,
                                       floating=input.is_floating_point(), off_rail=off_rail,
                                       off_node=off_node))
            return meter._orig(output, input, output_split_sizes=output_split_sizes,
                               input_split_sizes=input_split_sizes, group=group, async_op=async_op)

        dist.all_to_all_single = metered
        return self

    def __exit__(self, *exc) -> None:
        dist.all_to_all_single = self._orig


def formula_bytes(sub_tokens: int, k: int, d_sub: int, itemsize: int, num_experts: int,
                  rows_received: int, rows_sent: int | None = None) -> dict:
    """Bytes one rank hands to the all-to-alls of one MoE layer fwd+bwd step.

    dispatch: rows_sent of d_sub values (the kept assignments for other ranks' experts on the flat path,
    whose rows for this rank's own experts never enter an exchange; None = all S * k assignments), plus the
    per-expert counts (E int64) exchanged once before it. The combine sends back the rows this rank's
    experts received (rows_received: data-dependent). The backward runs both all-to-alls in the other
    direction: the combine's conjugate sends rows_sent rows again, the dispatch's conjugate rows_received.
    """
    rows_sent = sub_tokens * k if rows_sent is None else rows_sent
    dispatch = rows_sent * d_sub * itemsize
    counts = num_experts * 8
    back = rows_received * d_sub * itemsize
    return {"dispatch": dispatch, "counts": counts, "combine": back, "total": 2 * dispatch + 2 * back + counts}
