"""What every dispatch path receives besides the routing, and what it reports: the one path interface.

A path is a function path(x_sub, record, run_experts, env) -> y:
  x_sub (S, d_sub) this rank's sub-tokens; record a routing.RoutingRecord (choices, gates, keep mask,
  choice-major flattening and its sort, capacity); run_experts(rows grouped by local expert, counts) ->
  outputs; env a DispatchEnv; y (S, d_sub) the gate-weighted sum of each sub-token's expert outputs.
The flat path (dispatcher.py), the capacity-slot path (padded_dispatch.py), the two-level path
(two_level.py) and the head-affine path (head_affine_dispatch.py) all have it; the dispatcher picks one per forward. A path times its phases with env.mark /
env.close (device events on CUDA, the host clock on CPU) and fills env.profile's public counters; it
never reaches into the dispatcher.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


def _device_clock(device: torch.device) -> bool:
    """Whether phases on `device` are timed with device events: CUDA kernels are asynchronous, so a host
    clock around them measures the launch, not the work (and synchronizing to fix that would stall the
    stream every phase). CPU ops are synchronous: the host clock is exact there."""
    return device.type == "cuda"


def _record_event(device: torch.device):
    """A timing event recorded on the current stream of `device` (where the phase's kernels run)."""
    ev = torch.cuda.Event(enable_timing=True)
    ev.record(torch.cuda.current_stream(device))
    return ev


def _span_seconds(start, end) -> float:
    # elapsed_time refuses events that have not completed. Both were recorded on one stream, start
    # first, so once the end event is done the start is too: waiting on the end is enough.
    end.synchronize()
    return start.elapsed_time(end) / 1000.0


@dataclass
class DispatchProfile:
    """What a forward moved and where its time went (seconds per phase).

    Phase times are host-clock durations on CPU and device-event spans on CUDA. Event spans are kept
    unresolved until read: `times`, `seconds(name)` and `resolve()` wait for the recorded end events,
    so reading is the only synchronization profiling adds. Read once per log interval (or use
    `MoEDispatcher.take_times()`), not after every micro-batch."""

    rows_sent: int = 0
    """Sub-token rows handed to the dispatch all-to-all (this rank's kept assignments; on the flat path with
    EP > 1 those for other ranks' experts: the rest are rows_home)."""
    rows_received: int = 0
    """Rows the dispatch all-to-all brought to this rank's experts (what the combine sends back)."""
    rows_home: int = 0
    """Flat path, EP > 1: this rank's kept assignments to its own experts, which never enter an all-to-all
    (rows_sent + rows_home are its kept assignments; rows_received + rows_home the rows its experts run)."""
    internode_bytes: int = 0
    """Bytes this rank sends to ranks of other nodes in the whole fwd+bwd step of this forward (rows, ids,
    gates and counts; known where the node layout is known, 0 otherwise): both paths count it from their
    splits (two_level.internode_formula for the two-level path)."""
    internode_rows: int = 0
    """Rows this rank's forward dispatch sends to other nodes (per choice flat; per packet two-level)."""
    bytes_sent: int = 0
    """Bytes handed to the forward dispatch all-to-alls: rows_sent * d_sub * itemsize + the counts (E int64).
    A whole fwd+bwd step sends (2 rows_sent + 2 rows_received) * d_sub * itemsize + E * 8: the combine
    returns the received rows and the backward runs both all-to-alls in the other direction."""
    _resolved: dict = field(default_factory=dict, repr=False)
    _pending: list = field(default_factory=list, repr=False)  # (name, start event, end event)

    def add_seconds(self, name: str, seconds: float) -> None:
        self._resolved[name] = self._resolved.get(name, 0.0) + seconds

    def add_span(self, name: str, start, end) -> None:
        self._pending.append((name, start, end))

    def drain_ready(self) -> None:
        """Fold in the spans whose events have completed, without waiting: keeps the pending list as
        short as the GPU is behind the host when nobody reads for a long while."""
        if not self._pending:
            return
        waiting = []
        for name, start, end in self._pending:
            if end.query():
                self.add_seconds(name, start.elapsed_time(end) / 1000.0)
            else:
                waiting.append((name, start, end))
        self._pending = waiting

    def resolve(self) -> dict:
        """Seconds per phase (name -> float), waiting for any span still running on the device."""
        pending, self._pending = self._pending, []
        for name, start, end in pending:
            self.add_seconds(name, _span_seconds(start, end))
        return self._resolved

    @property
    def times(self) -> dict:
        """Seconds per phase; reading it resolves pending device spans (see `resolve`)."""
        return self.resolve()

    def seconds(self, name: str) -> float:
        return self.resolve().get(name, 0.0)


@dataclass
class DispatchEnv:
    """The dispatcher's side of one forward, handed to the path it picked."""

    ctx: Any
    """The ParallelContext (ep_group, ep_rank, ep_size, ep_node_group, ep_rail_group)."""
    num_experts: int
    num_local_experts: int
    profile: DispatchProfile
    """This forward's counters (fresh per forward): the path adds its rows and bytes."""
    mark: Callable[[], Any]
    """Begins a timed phase: returns its start mark (None when profiling is off)."""
    close: Callable[[str, Any], Any]
    """close(name, mark) ends phase `name` begun at `mark` and returns a mark that begins the next one."""
    check_budget: Callable[[int, torch.Tensor], None]
    """check_budget(rows_received, like): every EP rank raises when one is over model.moe.ep_recv_budget."""
    recv_budget: int = 0
    """model.moe.ep_recv_budget (0 = none), for paths whose receive buffer has a static size."""
    layout: Any = None
    """two_level.NodeLayout of the EP group when known (inter-node byte counts; the two-level path), else None."""
    chunks: int = 1
    """model.moe.a2a_chunks: pipelined chunks of the two-level and head-affine paths."""
    head_groups: int = 1
    """G of head-affine placement (model.moe.head_groups resolved; 1 = off): the head-affine path's nodes."""
    num_heads: int = 1
    """h: sub-tokens per token (token-major rows), for the head-affine path."""
