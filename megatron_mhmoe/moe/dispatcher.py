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
With EP > 1 the rows for a rank's own experts skip the all-to-alls: they run through the experts while
the other rows are exchanged, and their backward while the conjugate exchange is (measured on the main
job: docs/step-throughput.md).
No dense [tokens x experts x capacity] tensor is built: memory is O(S*k*d), whatever E.

Every path has one signature, path(x_sub, record, run_experts, env) (moe/dispatch_env.py): this flat
one (flat_dispatch_combine), the capacity-slot one without host reads (moe/padded_dispatch.py,
model.moe.a2a_device_counts) and the two-level one for EP groups that span nodes (moe/two_level.py;
model.moe.ep_ranks_per_node, else LOCAL_WORLD_SIZE / LOCAL_SIZE; same outputs, gradients and drops, tested
against this one), and with head-affine placement (model.moe.head_groups) the head-affine path, whose
cross-node exchange has fixed sizes (moe/head_affine_dispatch.py; tested against this one).
model.moe.ep_recv_budget bounds the rows a rank receives, on every path.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from megatron_mhmoe.moe import (ep_cost, head_affine, head_affine_dispatch, head_groups_check, padded_dispatch,
                                path_tuner, two_level)
from megatron_mhmoe.moe.dispatch_env import (  # noqa: F401  (_device_clock, _record_event: patched by tests)
    DispatchEnv, DispatchProfile, _device_clock, _record_event, _span_seconds)
from megatron_mhmoe.moe.gate_combine import gate_combine
from megatron_mhmoe.moe.routing import RoutingRecord
from megatron_mhmoe.parallel import comm
from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.step_spans import phase_end


def flat_dispatch_combine(x_sub: torch.Tensor, record: RoutingRecord, run_experts: Callable,
                          env: DispatchEnv) -> torch.Tensor:
    """x_sub (S, d_sub) -> (S, d_sub): one all-to-all of rows over the EP group each way (steps 1-6 above)."""
    experts, gates, keep = record.experts, record.gates, record.keep
    order, e_flat = record.order, record.flat_experts
    S, k = experts.shape
    E, E_local, ep = env.num_experts, env.num_local_experts, env.ctx.ep_size
    t0 = env.mark()
    # 1. Kept assignments stay grouped by expert and in queue order when filtered out of the sort.
    perm = order if keep is None else order[keep.index_select(0, order)]  # (n,) flat assignment ids
    counts = torch.bincount(e_flat.index_select(0, perm), minlength=E)  # (E,)
    if ep > 1:
        # 3 (counts). Exchanged before the host read, so that one read brings both to the host.
        t0 = env.close("permute", t0)
        recv_counts = comm.all_to_all_v(counts, [E_local] * ep, [E_local] * ep, env.ctx.ep_group)  # (EP*E_local,)
        host = torch.cat([counts, recv_counts]).tolist()  # the one host sync of the dispatch
        counts_host = host[:E]
        recv_host = [host[E + p * E_local:E + (p + 1) * E_local] for p in range(ep)]  # from rank p for my expert e
        t0 = env.close("counts_exchange", t0)
    else:
        counts_host = counts.tolist()  # the one host sync of the dispatch
    if ep > 1:
        return _exchange_around_home_experts(x_sub, gates, perm, counts_host, recv_host, run_experts, env, t0)
    src = perm % S  # (n,) sub-token of each row
    weights = gates.t().reshape(-1).index_select(0, perm)  # (n,) gate of each row
    if hasattr(run_experts, "forward_combine"):
        # 2, 5 and 6 as one node that gathers rows per chunk (experts.GroupedExperts.forward_combine)
        t0 = env.close("permute", t0)
        y = run_experts.forward_combine(x_sub, src, weights, counts_host, S)
        if y is not None:
            env.close("experts", t0)
            return y
    # 2.
    rows = x_sub.index_select(0, src)  # (n, d_sub)
    t0 = env.close("permute", t0)
    # 5.
    out = run_experts(rows, counts_host)  # (n, d_sub)
    t0 = env.close("experts", t0)
    # 6.
    y = gate_combine(out, weights.to(out.dtype), src, S)  # (S, d_sub)
    env.close("combine", t0)
    return y


def _exchange_around_home_experts(x_sub: torch.Tensor, gates: torch.Tensor, perm: torch.Tensor, counts_host: list,
                                  recv_host: list, run_experts: Callable, env: DispatchEnv, t0) -> torch.Tensor:
    """Steps 2-6 for EP > 1. The rows for this rank's own experts ("home" rows) never enter the all-to-alls:
    they run through the experts while the exchange of the other rows is in flight, and in the backward while
    its conjugate is (comm.all_to_all_start / all_to_all_wait), so a rank that waits for a peer has work to
    do meanwhile. The received rows come from the other ranks only, ordered (source rank, local expert); at
    EP=2 that is one rank, so they arrive grouped by expert and step 4 has nothing to regroup."""
    S, ep, me, E_local = x_sub.shape[0], env.ctx.ep_size, env.ctx.ep_rank, env.num_local_experts
    group = env.ctx.ep_group
    send_splits = [sum(counts_host[p * E_local:(p + 1) * E_local]) for p in range(ep)]
    recv_splits = [sum(r) for r in recv_host]
    n = perm.shape[0]
    env.profile.rows_home = send_splits[me]  # == recv_splits[me]: this rank's rows for its own experts
    env.profile.rows_sent = n - send_splits[me]
    env.profile.rows_received = sum(recv_splits) - recv_splits[me]
    env.profile.bytes_sent = env.profile.rows_sent * x_sub.shape[1] * x_sub.element_size() + len(counts_host) * 8
    _flat_internode(send_splits, recv_splits, x_sub, env)
    env.check_budget(sum(recv_splits), x_sub)  # every row its experts run, home rows included
    # 2. perm is grouped by expert, hence by destination rank: this rank's own block is perm[a:b].
    a = sum(send_splits[:me])
    b = a + send_splits[me]
    home, away = perm[a:b], torch.cat([perm[:a], perm[b:]])  # (n_home,), (n - n_home,) flat assignment ids
    src_home, src_away = home % S, away % S  # their sub-tokens
    send_away = [0 if p == me else c for p, c in enumerate(send_splits)]
    recv_away = [0 if p == me else c for p, c in enumerate(recv_splits)]
    flat_gates = gates.t().reshape(-1)  # (k*S,) choice-major, like perm's ids
    rows_away = x_sub.index_select(0, src_away)  # (n - n_home, d_sub)
    t0 = env.close("permute", t0)
    # 3. The exchange starts; the home rows run through the experts (5) meanwhile.
    buf, pending = comm.all_to_all_start(rows_away, recv_away, send_away, group)  # (m - m_home, d_sub)
    # Its own phase, so that the breakdown files the backward's wait for the conjugate under the exchange.
    t0 = env.close("all_to_all", t0)
    out_home = run_experts(x_sub.index_select(0, src_home), counts_host[me * E_local:(me + 1) * E_local])
    t0 = env.close("experts", t0)
    rows = comm.all_to_all_wait(buf, pending)
    t0 = env.close("all_to_all", t0)
    # 4. Regroup the received rows by local expert (from (source rank, local expert) order), unless one rank sent them.
    peers = [p for p in range(ep) if p != me]
    expert_counts = [sum(recv_host[p][e] for p in peers) for e in range(E_local)]
    regroup = None
    if len(peers) > 1:
        counts_in = torch.tensor([recv_host[p][e] for p in peers for e in range(E_local)], device=rows.device)
        local_ids = torch.arange(E_local, device=rows.device).repeat(len(peers))  # ((EP-1)*E_local,)
        local_ids = local_ids.repeat_interleave(counts_in, output_size=rows.shape[0])  # (m - m_home,)
        regroup = torch.argsort(local_ids, stable=True)  # (m - m_home,)
        rows = rows.index_select(0, regroup)
    t0 = env.close("permute", t0)
    # 5.
    out = run_experts(rows, expert_counts)  # (m - m_home, d_sub)
    t0 = env.close("experts", t0)
    # 6. The away rows' outputs go back; the home rows are weighted and summed meanwhile.
    if regroup is not None:
        inverse = torch.empty_like(regroup)
        inverse[regroup] = torch.arange(regroup.numel(), device=regroup.device)
        out = out.index_select(0, inverse)
    buf, pending = comm.all_to_all_start(out, send_away, recv_away, group)  # (n - n_home, d_sub)
    t0 = env.close("all_to_all", t0)
    y = gate_combine(out_home, flat_gates.index_select(0, home).to(out_home.dtype), src_home, S)  # (S, d_sub)
    t0 = env.close("combine", t0)
    back = comm.all_to_all_wait(buf, pending)
    t0 = env.close("all_to_all", t0)
    y = y + gate_combine(back, flat_gates.index_select(0, away).to(back.dtype), src_away, S)  # (S, d_sub)
    env.close("combine", t0)
    return y


def _flat_internode(send_splits: list, recv_splits: list, x_sub: torch.Tensor, env: DispatchEnv) -> None:
    """Inter-node rows and bytes of the flat path's step, where the node layout is known: rows to other
    nodes' ranks twice (dispatch, combine's backward), rows from them twice, E_local int64 counts each."""
    if env.layout is None:
        return
    remote = env.layout.remote_peers(env.ctx.ep_rank)
    out_rows, in_rows = sum(send_splits[q] for q in remote), sum(recv_splits[q] for q in remote)
    row = x_sub.shape[1] * x_sub.element_size()
    env.profile.internode_rows = out_rows
    env.profile.internode_bytes = 2 * (out_rows + in_rows) * row + len(remote) * env.num_local_experts * 8


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
            two_level.create_groups(ctx, self.layout)  # collective: created here, on every rank alike
        setting = moe.head_groups if moe is not None else 0
        self.head_groups = head_affine.resolve(setting, self.layout)
        """G of head-affine routing (model.moe.head_groups resolved on this layout; 1 = off)."""
        if moe is not None:
            head_groups_check.check_routing(self.head_groups, moe.num_heads, num_experts, moe.top_k,
                                      where=f"model.moe.head_groups={setting!r} ->")
        head_affine.check_placement(self.head_groups, self.layout, num_experts)
        self.num_heads = moe.num_heads if moe is not None else 1
        self.force_flat = False
        """Take the flat path whatever ep_dispatch says (benchmarks and tests compare the paths)."""
        self.ep_dispatch = moe.ep_dispatch if moe is not None else "auto"
        """model.moe.ep_dispatch: 'auto', 'flat' or 'two_level' (where the layout spans nodes)."""
        self.link = ep_cost.Link(moe.ep_nic_gbps, moe.ep_node_gbps, moe.ep_exchange_us) if moe is not None \
            else ep_cost.Link(400.0, 3600.0, 30.0)
        """What ep_dispatch='auto' prices (moe/ep_cost.py)."""
        self._auto: dict = {}  # sub-tokens per forward -> the path the cost model prices cheaper
        self.tuner = path_tuner.PathTuner(moe.ep_tune_forwards if moe is not None else 0, ctx.ep_group)
        """'auto' measures both paths for its first forwards (moe/path_tuner.py) and keeps the faster."""
        self.chunks = moe.a2a_chunks if moe is not None else 1
        self.recv_budget = moe.ep_recv_budget if moe is not None else 0
        self.device_counts = bool(moe.a2a_device_counts) if moe is not None else False
        """Capacity-slot dispatch without a host sync (moe/padded_dispatch.py) when the record has a capacity."""

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

    # ------------------------------------------------------------------ timing
    def take_times(self) -> dict:
        """Seconds per phase summed over every forward since the previous call, then restarted.

        Waits for the device events of those forwards still running (once per call, so call it once per
        log interval). Includes forwards recomputed by activation checkpointing: their all-to-alls are
        real communication time too. Phases: permute, counts_exchange, all_to_all, experts, combine."""
        times, self._since_take = self._since_take.resolve(), DispatchProfile()
        return times

    def _mark(self, device: torch.device):
        # Under torch.compile the phases are fused into one graph with no host clock between them: a
        # timestamp would time the tracing, and calling the clock is a graph break.
        if not self.profile_enabled or torch.compiler.is_compiling():
            return None
        return _record_event(device) if _device_clock(device) else time.perf_counter()

    def _tick(self, name: str, mark, device: torch.device):
        """Close phase `name` begun at `mark`; the returned mark begins the next phase."""
        phase_end(name)  # the profiler breakdown's marker (step_spans; nothing outside profile mode)
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

    # ------------------------------------------------------------------ dispatch / combine
    def choose(self, S: int, k: int, d_sub: int, itemsize: int) -> str:
        """'flat', 'two_level' or 'head_affine' for a forward of S sub-tokens (model.moe.ep_dispatch and
        head_groups; moe/ep_cost.py)."""
        key = (S, k, d_sub, itemsize)
        if key not in self._auto:
            self._auto[key] = ep_cost.choose(self.ep_dispatch, S, k, self.num_experts, d_sub, itemsize,
                                             self.layout, self.chunks, self.link, self.head_groups)
        return self._auto[key]

    def _shape_key(self, record: RoutingRecord, x_sub: torch.Tensor) -> tuple:
        return (*record.experts.shape, x_sub.shape[1], x_sub.element_size())

    def path(self, record: RoutingRecord, x_sub: torch.Tensor) -> Callable:
        """The path this record takes: capacity slots (a2a_device_counts with a capacity), two-level (an EP
        group over nodes where ep_dispatch picks it, unless force_flat), else flat. All share one signature
        (moe/dispatch_env.py). With ep_dispatch='auto' and ep_tune_forwards > 0, call it once per forward:
        the first forwards of each shape alternate the two paths (moe/path_tuner.py)."""
        if self.device_counts and record.capacity > 0:
            return padded_dispatch.dispatch_combine
        if self.layout is None or self.force_flat:
            path = flat_dispatch_combine
        else:
            key = self._shape_key(record, x_sub)
            picked = self.choose(*key)
            if self.ep_dispatch == "auto" and not torch.compiler.is_compiling():
                node_path = "head_affine" if self.head_groups > 1 else "two_level"
                picked = self.tuner.pick(key, picked, ("flat", node_path))
            path = {"head_affine": head_affine_dispatch.dispatch_combine,
                    "two_level": two_level.dispatch_combine}.get(picked, flat_dispatch_combine)
        # The count-sized paths read counts back and size everything by them: traced, every new set of
        # counts would be a recompilation (then eager after torch's recompile limit). Run them eagerly.
        return torch.compiler.disable(path) if torch.compiler.is_compiling() else path

    def dispatch(self, x_sub: torch.Tensor, record: RoutingRecord, run_experts: Callable) -> torch.Tensor:
        """x_sub (S, d_sub) and its routing record -> (S, d_sub): each sub-token's gate-weighted expert outputs.

        run_experts(rows (n, d_sub) grouped by local expert, counts list[E_local]) -> (n, d_sub)."""
        self.profile = DispatchProfile()
        self._since_take.drain_ready()
        dev = x_sub.device
        env = DispatchEnv(ctx=self.ctx, num_experts=self.num_experts, num_local_experts=self.num_local_experts,
                          profile=self.profile, mark=lambda: self._mark(dev),
                          close=lambda name, mark: self._tick(name, mark, dev), check_budget=self._check_budget,
                          recv_budget=self.recv_budget, layout=self.layout, chunks=self.chunks,
                          head_groups=self.head_groups, num_heads=self.num_heads)
        run = self.path(record, x_sub)
        if self.layout is None or self.force_flat or run is padded_dispatch.dispatch_combine \
                or torch.compiler.is_compiling():
            return run(x_sub, record, run_experts, env)
        return self.tuner.timed(self._shape_key(record, x_sub), lambda x: run(x, record, run_experts, env), x_sub)

