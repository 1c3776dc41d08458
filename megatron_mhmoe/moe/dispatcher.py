"""All communication of the MoE layer: TP token split/gather, replica-wide counts and sums, and the
expert-parallel all-to-all dispatch/combine of sub-tokens. EP=1 runs the same code minus the all-to-all.

Dispatch of S local sub-tokens with k choices each (choice-major flat index f = j*S + i):
1. Sort assignments by expert id (dropped ones get the sentinel id E and sort last); the counts per
   expert come to the host once: they size every split below.
2. Gather the kept rows in that order: rows for EP rank p's experts are now contiguous.
3. Exchange per-expert counts over the EP group, then all-to-all the rows with uneven splits.
4. Received rows are ordered (source rank, local expert): regroup them by local expert.
5. Run the local experts on exact counts (no padding to a capacity).
6. Undo 4, reverse the all-to-all, and add each row times its gate into its sub-token's output.
No dense [tokens x experts x capacity] tensor is built: memory is O(S*k*d), whatever E.

An EP group that spans nodes (model.moe.ep_ranks_per_node, else LOCAL_WORLD_SIZE / LOCAL_SIZE) takes
the two-level path of moe/two_level.py instead (same outputs, gradients and drops; tested against this
one), pipelined over model.moe.a2a_chunks chunks. model.moe.ep_recv_budget bounds the rows a rank
receives, on both paths.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from megatron_mhmoe.moe import padded_dispatch, two_level
from megatron_mhmoe.parallel import comm
from megatron_mhmoe.parallel.context import ParallelContext


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
    """Sub-token rows handed to the dispatch all-to-all (this rank's kept assignments)."""
    rows_received: int = 0
    """Rows the dispatch all-to-all brought to this rank's experts (what the combine sends back)."""
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


class MoEDispatcher:
    def __init__(self, ctx: ParallelContext, num_experts: int, moe=None):
        if num_experts % ctx.ep_size:
            raise ValueError(
                f"num_experts {num_experts} is not divisible by expert-parallel size {ctx.ep_size} "
                f"({num_experts} % {ctx.ep_size} = {num_experts % ctx.ep_size})")
        self.ctx = ctx
        self.num_experts = num_experts
        self.num_local_experts = num_experts // ctx.ep_size
        self.profile_enabled = True
        """Time the dispatch phases (host clock on CPU, device events on CUDA: no synchronization until read)."""
        self.profile = DispatchProfile()
        """The last forward: rows and bytes moved, seconds per phase."""
        self._since_take = DispatchProfile()  # seconds per phase over every forward since take_times()
        per_node = two_level.ranks_per_node(moe.ep_ranks_per_node if moe is not None else 0)
        self.layout = two_level.node_layout(ctx.ep_size, per_node)
        """Node of each EP rank when the EP group spans nodes (the two-level path), else None (flat)."""
        if self.layout is not None:
            ctx.ep_node_group(self.layout.per_node)  # collective: created here, on every rank alike
        self.force_flat = False
        """Take the flat path even where the layout allows two levels (benchmarks and tests compare them)."""
        self.chunks = moe.a2a_chunks if moe is not None else 1
        self.recv_budget = moe.ep_recv_budget if moe is not None else 0
        self.device_counts = bool(moe.a2a_device_counts) if moe is not None else False
        """Capacity-slot dispatch without a host sync (moe/padded_dispatch.py) when the record has a capacity."""

    def _add_time(self, name: str, seconds: float) -> None:
        if self.profile_enabled:
            self.profile.add_seconds(name, seconds)
            self._since_take.add_seconds(name, seconds)

    def _check_budget(self, rows_received: int, like: torch.Tensor) -> None:
        """Every EP rank raises the same error when any of them would receive more than ep_recv_budget rows
        (one all-reduce of one integer, only when a budget is set)."""
        if self.recv_budget <= 0:
            return
        worst = comm.all_reduce_max_int(rows_received, like, self.ctx.ep_group)
        if worst > self.recv_budget:
            raise RuntimeError(
                f"an expert-parallel rank would receive {worst} sub-token rows in one MoE forward, over its "
                f"receive budget model.moe.ep_recv_budget={self.recv_budget} (this rank: {rows_received}): raise "
                f"model.moe.ep_recv_budget (0 = no budget), set a capacity_factor, or balance the routing")

    def _padded(self, x_sub: torch.Tensor, record, run_experts: Callable) -> torch.Tensor:
        """Capacity slots, equal-split all-to-alls, no host sync (moe/padded_dispatch.py)."""
        self.profile = DispatchProfile()
        self._since_take.drain_ready()
        ep, C = self.ctx.ep_size, record.capacity
        received = ep * self.num_local_experts * C  # a static bound: the buffer is this size whatever the routing
        if 0 < self.recv_budget < received:
            raise RuntimeError(
                f"model.moe.a2a_device_counts=true gives every EP rank a receive buffer of EP x E_local x capacity "
                f"= {ep} x {self.num_local_experts} x {C} = {received} rows, over model.moe.ep_recv_budget="
                f"{self.recv_budget}: lower capacity_factor, raise ep_recv_budget (0 = no budget), or turn "
                f"a2a_device_counts off")
        mark = [self._mark(x_sub.device)]

        def tick(name: str) -> None:
            mark[0] = self._tick(name, mark[0], x_sub.device)

        y, rows = padded_dispatch.dispatch_combine(
            x_sub, record.experts, record.gates, record.keep, run_experts, C, self.num_experts,
            self.ctx.ep_group, ep, record.order, record.flat_experts, _GateCombine.apply, tick)
        self.profile.rows_sent, self.profile.rows_received = rows, received
        self.profile.bytes_sent = rows * x_sub.shape[1] * x_sub.element_size() if ep > 1 else 0
        return y

    def _two_level(self, x_sub, experts, gates, keep, run_experts) -> torch.Tensor:
        prof = self.profile
        self._internode_counts_bytes = self._internode_payload_bytes = 0
        self._internode_rows = self._rows_received = 0
        y = two_level.dispatch_combine(self, x_sub, experts, gates, keep, run_experts, self.chunks)
        prof.rows_sent = int(keep.sum()) if keep is not None else experts.numel()  # kept assignments
        prof.rows_received = self._rows_received
        prof.internode_rows = self._internode_rows
        prof.internode_bytes = self._internode_payload_bytes + self._internode_counts_bytes
        return y

    # ------------------------------------------------------------------ TP token split
    @property
    def splits_tokens(self) -> bool:
        """Without sequence parallelism the MoE input is replicated over TP: each rank takes 1/TP."""
        return not self.ctx.sequence_parallel and self.ctx.tp_size > 1

    def split_tokens(self, tokens: torch.Tensor) -> torch.Tensor:  # (N, d) -> (N/TP, d)
        if not self.splits_tokens:
            return tokens
        if tokens.shape[0] % self.ctx.tp_size:
            raise ValueError(
                f"the MoE layer splits its {tokens.shape[0]} tokens (seq x micro-batch) over "
                f"tensor-parallel size {self.ctx.tp_size}, but {tokens.shape[0]} % {self.ctx.tp_size} = "
                f"{tokens.shape[0] % self.ctx.tp_size}: make seq_len x micro_batch divisible by TP")
        return comm.scatter_to_region(tokens, 0, self.ctx.tp_group)

    def gather_tokens(self, tokens: torch.Tensor) -> torch.Tensor:  # (N/TP, d) -> (N, d)
        if not self.splits_tokens:
            return tokens
        return comm.gather_from_region(tokens, 0, self.ctx.tp_group)

    # ------------------------------------------------------------------ replica-wide reductions
    def replica_counts(self, local_counts: torch.Tensor) -> torch.Tensor:
        """(k, E) local counts -> (TP, k, E): every TP rank's counts (the replica's routing group)."""
        return comm.all_gather(local_counts.unsqueeze(0), 0, self.ctx.tp_group)

    def replica_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the TP ranks that share a replica's tokens; gradient flows back unchanged."""
        return comm.reduce_from_region(t, self.ctx.tp_group)

    @torch.no_grad()
    def replica_sum_stats(self, t: torch.Tensor) -> torch.Tensor:
        return comm.all_reduce_(t.clone(), self.ctx.tp_group)

    # ------------------------------------------------------------------ dispatch / combine
    def take_times(self) -> dict:
        """Seconds per phase summed over every forward since the previous call, then restarted.

        Waits for the device events of those forwards still running (once per call, so call it once per
        log interval). Includes forwards recomputed by activation checkpointing: their all-to-alls are
        real communication time too. Phases: permute, counts_exchange, all_to_all, experts, combine."""
        times, self._since_take = self._since_take.resolve(), DispatchProfile()
        return times

    def _mark(self, device: torch.device):
        if not self.profile_enabled:
            return None
        return _record_event(device) if _device_clock(device) else time.perf_counter()

    def _tick(self, name: str, mark, device: torch.device):
        """Close phase `name` begun at `mark`; the returned mark begins the next phase."""
        if mark is None:
            return None
        if _device_clock(device):
            end = _record_event(device)
            self.profile.add_span(name, mark, end)
            self._since_take.add_span(name, mark, end)
            return end
        now = time.perf_counter()
        self.profile.add_seconds(name, now - mark)
        self._since_take.add_seconds(name, now - mark)
        return now

    def dispatch(self, x_sub: torch.Tensor, record, run_experts: Callable) -> torch.Tensor:
        """dispatch_combine with a routing.RoutingRecord's choices, keep mask, sort and flattening."""
        if self.device_counts and record.capacity > 0:
            return self._padded(x_sub, record, run_experts)
        return self.dispatch_combine(x_sub, record.experts, record.gates, record.keep, run_experts,
                                     record.order, record.flat_experts)

    def dispatch_combine(self, x_sub: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor,
                         keep: torch.Tensor | None, run_experts: Callable,
                         order: torch.Tensor | None = None, e_flat: torch.Tensor | None = None) -> torch.Tensor:
        """x_sub (S, d_sub), experts/gates (S, k), keep (k*S,) choice-major or None -> (S, d_sub).

        run_experts(rows (n, d_sub) grouped by local expert, counts list[E_local]) -> (n, d_sub).
        order: the stable argsort of the choice-major expert ids, if the caller already has it
        (capacity.capacity_keep sorts the same ids): saves the one O(k*S log) sort here; e_flat: the
        choice-major ids experts.t().reshape(-1), likewise.
        """
        S, k = experts.shape
        E, E_local, ep = self.num_experts, self.num_local_experts, self.ctx.ep_size
        self.profile = DispatchProfile()
        self._since_take.drain_ready()
        if self.layout is not None and not self.force_flat:
            return self._two_level(x_sub, experts, gates, keep, run_experts)
        t0 = self._mark(x_sub.device)
        # 1. Kept assignments stay grouped by expert and in queue order when filtered out of the sort.
        if e_flat is None:
            e_flat = experts.t().reshape(-1)  # (k*S,) choice-major
        if order is None:
            order = torch.argsort(e_flat, stable=True)  # (k*S,)
        perm = order if keep is None else order[keep.index_select(0, order)]  # (n,) flat assignment ids
        counts = torch.bincount(e_flat.index_select(0, perm), minlength=E)  # (E,)
        counts_host = counts.tolist()  # the one host sync of the local dispatch
        n = perm.shape[0]
        src = perm % S  # (n,) sub-token of each row
        if ep == 1 and hasattr(run_experts, "forward_combine"):
            # 2, 5 and 6 as one node that gathers rows per chunk (experts.GroupedExperts.forward_combine)
            weights = gates.t().reshape(-1).index_select(0, perm)  # (n,)
            t0 = self._tick("permute", t0, x_sub.device)
            y = run_experts.forward_combine(x_sub, src, weights, counts_host, S)
            if y is not None:
                self._tick("experts", t0, x_sub.device)
                return y
        # 2.
        rows = x_sub.index_select(0, src)  # (n, d_sub)
        t0 = self._tick("permute", t0, x_sub.device)
        if ep > 1:
            # 3.
            recv_counts = comm.all_to_all_v(counts, [E_local] * ep, [E_local] * ep, self.ctx.ep_group)
            recv_counts = recv_counts.view(ep, E_local)  # (EP, E_local): from rank p for my expert e
            recv_host = recv_counts.tolist()
            send_splits = [sum(counts_host[p * E_local:(p + 1) * E_local]) for p in range(ep)]
            recv_splits = [sum(r) for r in recv_host]
            self.profile.rows_sent = n
            self.profile.rows_received = sum(recv_splits)
            self.profile.bytes_sent = n * x_sub.shape[1] * x_sub.element_size() + counts.numel() * counts.element_size()
            self._flat_internode(send_splits, recv_splits, x_sub)
            self._check_budget(self.profile.rows_received, x_sub)
            t0 = self._tick("counts_exchange", t0, x_sub.device)
            rows = comm.all_to_all(rows, recv_splits, send_splits, self.ctx.ep_group)  # (m, d_sub)
            t0 = self._tick("all_to_all", t0, x_sub.device)
            # 4.
            local_ids = torch.arange(E_local, device=rows.device).repeat(ep)  # (EP*E_local,)
            local_ids = local_ids.repeat_interleave(recv_counts.reshape(-1), output_size=rows.shape[0])  # (m,)
            regroup = torch.argsort(local_ids, stable=True)  # (m,)
            rows = rows.index_select(0, regroup)
            expert_counts = [sum(recv_host[p][e] for p in range(ep)) for e in range(E_local)]
            t0 = self._tick("permute", t0, x_sub.device)
        else:
            expert_counts = counts_host
        # 5.
        out = run_experts(rows, expert_counts)  # (m, d_sub)
        t0 = self._tick("experts", t0, x_sub.device)
        # 6.
        if ep > 1:
            inverse = torch.empty_like(regroup)
            inverse[regroup] = torch.arange(regroup.numel(), device=regroup.device)
            out = out.index_select(0, inverse)
            t0 = self._tick("permute", t0, x_sub.device)
            out = comm.all_to_all(out, send_splits, recv_splits, self.ctx.ep_group)  # (n, d_sub)
            t0 = self._tick("all_to_all", t0, x_sub.device)
        weights = gates.t().reshape(-1).index_select(0, perm).to(out.dtype)  # (n,)
        y = _GateCombine.apply(out, weights, src, S)  # (S, d_sub)
        self._tick("combine", t0, x_sub.device)
        return y

    def _flat_internode(self, send_splits: list, recv_splits: list, x_sub: torch.Tensor) -> None:
        """Inter-node rows and bytes of the flat path's step, where the node layout is known: rows to other
        nodes' ranks twice (dispatch, combine's backward), rows from them twice, E_local int64 counts each."""
        if self.layout is None:
            return
        remote = self.layout.remote_peers(self.ctx.ep_rank)
        out_rows, in_rows = sum(send_splits[q] for q in remote), sum(recv_splits[q] for q in remote)
        row = x_sub.shape[1] * x_sub.element_size()
        self.profile.internode_rows = out_rows
        self.profile.internode_bytes = 2 * (out_rows + in_rows) * row + len(remote) * self.num_local_experts * 8


class _GateCombine(torch.autograd.Function):
    """y = zeros(S, d).index_add(0, src, out * w[:, None]) as one node.

    Autograd over those ops keeps g*w and g*out as two new (n, d) tensors in backward (plus the reduction
    of the second); here dL/dout is dL/dy[src] scaled in place and dL/dw one batched dot per row."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, w: torch.Tensor, src: torch.Tensor, num_rows: int) -> torch.Tensor:
        y = out.new_zeros(num_rows, out.shape[1])  # (S, d)
        y.index_add_(0, src, out * w.unsqueeze(1))
        ctx.save_for_backward(out, w, src)
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        out, w, src = ctx.saved_tensors
        g_rows = gy.index_select(0, src)  # (n, d): a new tensor, free to scale in place
        gw = None
        if ctx.needs_input_grad[1]:
            gw = torch.bmm(g_rows.unsqueeze(1), out.unsqueeze(2)).view(-1)  # (n,) <dL/dy[src_i], out_i>
        g_out = g_rows.mul_(w.unsqueeze(1)) if ctx.needs_input_grad[0] else None
        return g_out, gw, None, None
