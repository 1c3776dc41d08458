"""Rail-aligned two-level expert-parallel dispatch and combine, for EP groups that span nodes (the flat
path in dispatcher.py is the reference it is tested against).

Layout: EP rank p is local rank l = p % L of node a = p // L (L ranks per node, N = EP / L nodes). The
ranks with one local index l, one per node, form rail l (ParallelContext.ep_rail_group). On a
rail-optimised cluster each GPU has its own NIC and rail l's NICs meet in one switch, so (a, l) -> (b, l)
is the one inter-node path that needs no hop inside a node before the link (DeepEP's internode kernels
and Megatron-core's HybridEP send a token the same way). Every NIC carries its own rank's traffic: under
uniform routing 1/L of its node's.

A packet is one sub-token row bound for one node: [x_i | gates of i's choices on that node (0 elsewhere) |
ids] (width d_sub + k + c), ids the node-local expert index of each of those choices (-1 elsewhere) as
int8 (int32 above 127 experts per node) bytes packed into c columns (pack_ids). A sub-token whose kept
choices fall on two experts of one node makes one packet for that node, so the row crosses the link once
per destination node, not once per choice.

Dispatch of one chunk of S local sub-tokens (kept assignments only), on rank (a, l):
1. Build the packets, grouped by destination node, in sub-token order within a node.
2. Rail exchange: the packets for node b go to rank (b, l), node a's to (a, l) itself, over rail l's group
   (one all-to-all of N ranks; nothing passes through another rank of node a first).
3. Fan out within the node: each packet held expands to its (row, expert) assignments, sent to the
   expert's owner over the node's group (ParallelContext.ep_node_group: NVLink on a GPU node).
4. The owner regroups its rows by local expert and runs the experts on exact counts.
Combine (the reverse; autograd makes the backward the reverse of that again):
5. Undo 4 and 3: the outputs return to the packet's holder, which adds each times its gate into one
   partial row per packet (the reduction over the choices on that node happens before the link).
6. Undo 2: the partial rows return over the same rail to the source rank, which adds them into its
   sub-tokens.

Only steps 2 and 6 (and the small traffic vectors) cross nodes. Before step 2 every rank sends every rank
one traffic vector per chunk (its packets per node, its assignments per rank), all chunks' in one
exchange: the one host sync of the forward, from which each rank derives what it receives in 2 and 3
(NodeLayout.receive_splits). Exchanges per fwd+bwd step: 1 + 8 per chunk (2, 3 and their returns, and the
four conjugates in the backward).

Overlap: with C chunks (model.moe.a2a_chunks) each chunk runs as a coroutine that yields after starting
its inter-node exchange (2, and the return of 6) asynchronously; the chunks are advanced in turn, so one
chunk's exchange is in flight while another's experts run. The backward mirrors it: each exchange's
conjugate starts where the forward waited and completes where it started (comm.all_to_all_start / _wait),
and autograd runs another chunk's backward in between.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from megatron_mhmoe.moe.gate_combine import gate_combine
from megatron_mhmoe.parallel import comm


def ranks_per_node(configured: int, env=None) -> int:
    """model.moe.ep_ranks_per_node, else the launcher's LOCAL_WORLD_SIZE (torchrun) or LOCAL_SIZE (the
    deepspeed launcher), else 0 (unknown: flat)."""
    if configured > 0:
        return configured
    env = os.environ if env is None else env
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        try:
            if int(env.get(name, "0")) > 0:
                return int(env[name])
        except ValueError:
            pass
    return 0


@dataclass(frozen=True)
class NodeLayout:
    """Which node each EP rank is on (EP ranks are consecutive global ranks, node-aligned)."""

    ep_size: int
    per_node: int
    """L: EP ranks per node."""

    @property
    def num_nodes(self) -> int:
        return self.ep_size // self.per_node

    def node(self, p: int) -> int:
        return p // self.per_node

    def local(self, p: int) -> int:
        """Local index of EP rank p on its node: its rail."""
        return p % self.per_node

    def rail_peer(self, p: int, b: int) -> int:
        """The EP rank on node b on EP rank p's rail: where p's packets for node b go (step 2)."""
        return b * self.per_node + p % self.per_node

    def remote_peers(self, p: int) -> list[int]:
        return [q for q in range(self.ep_size) if self.node(q) != self.node(p)]

    def ranks_of(self, a: int) -> range:
        return range(a * self.per_node, (a + 1) * self.per_node)

    def receive_splits(self, traffic: list, me: int) -> tuple[list[int], list[int]]:
        """Rows EP rank `me` receives in step 2 (from each node over its rail: index = node) and step 3
        (from each rank of its node: index = local rank), from every rank's traffic:
        traffic[s] = (u, a) with u[b] = packets of rank s for node b, a[q] = its kept assignments to rank q.

        2. (B, l) sends its packets for node A to (A, l).
        3. Holder (A, l') holds the packets of every (B, l') for node A: it sends rank q of A the
           assignments of those ranks to q."""
        N, A, L = self.num_nodes, self.node(me), self.per_node
        u = [t[0] for t in traffic]
        a = [t[1] for t in traffic]
        recv2 = [u[self.rail_peer(me, B)][A] for B in range(N)]
        recv3 = [sum(a[B * L + l][me] for B in range(N)) for l in range(L)]
        return recv2, recv3


def create_groups(ctx, layout: NodeLayout) -> None:
    """The process groups the two-level path uses (collective: every rank calls it, in the same order)."""
    ctx.ep_node_group(layout.per_node)
    ctx.ep_rail_group(layout.per_node)


def node_layout(ep_size: int, per_node: int) -> NodeLayout | None:
    """The two-level layout, or None for the flat path (layout unknown, or the EP group fits in one node)."""
    if per_node <= 0 or ep_size <= per_node:
        return None
    if ep_size % per_node:
        raise ValueError(
            f"expert-parallel size {ep_size} spans nodes of {per_node} ranks but is not a multiple of it "
            f"({ep_size} % {per_node} = {ep_size % per_node}): the two-level all-to-all needs whole nodes; set "
            f"model.moe.ep_ranks_per_node (0 = LOCAL_WORLD_SIZE) or choose EP from multiples of {per_node}")
    return NodeLayout(ep_size, per_node)


def id_dtype(experts_per_node: int) -> torch.dtype:
    """Node-local expert ids travel as int8 when they fit (gloo has no int16), else int32; -1 = none."""
    return torch.int8 if experts_per_node <= 127 else torch.int32


def id_columns(k: int, id_size: int, itemsize: int) -> int:
    """Payload columns that hold a packet's k ids of id_size bytes, bit-packed (pack_ids)."""
    return -(-k * id_size // itemsize)


def pack_ids(ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(U, k) integer ids -> (U, c) columns of `dtype` holding their bytes (not their values), so that they
    cross the link in the rows' own exchange at id_size bytes each (rounded up to whole columns)."""
    b = ids.contiguous().view(torch.uint8)  # (U, k * id_size)
    it = torch.empty((), dtype=dtype).element_size()
    pad = (-b.shape[1]) % it
    if pad:
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], 1)  # (U, c * itemsize)
    return b.view(dtype)  # (U, c)


def unpack_ids(cols: torch.Tensor, k: int, id_type: torch.dtype) -> torch.Tensor:
    """Inverse of pack_ids: (U, c) columns -> (U, k) ids of id_type."""
    size = torch.empty((), dtype=id_type).element_size()
    return cols.detach().contiguous().view(torch.uint8)[:, :k * size].contiguous().view(id_type)  # (U, k)


def internode_formula(packets_out: int, packets_in: int, d_sub: int, k: int, itemsize: int, id_size: int,
                      ep_size: int, per_node: int, chunks: int = 1) -> int:
    """Bytes one rank sends to other nodes in one fwd+bwd step of the two-level path (`chunks` chunks).

    packets_out / packets_in: packets this rank sends to / receives from other nodes in step 2, each
    (d_sub + k + c) x itemsize: the row, its k gates and c = id_columns(k, id_size, itemsize) columns of
    bit-packed ids. forward: step 2 sends packets_out of them; the combine returns packets_in partial rows
    (d_sub x itemsize). backward: the combine's conjugate sends packets_out gradient rows (d_sub), step 2's
    conjugate packets_in payload gradients (d_sub + k + c). Plus, per chunk, the traffic vector (N + EP
    int64, receive_splits) to every rank of another node."""
    payload = (d_sub + k + id_columns(k, id_size, itemsize)) * itemsize
    rows = d_sub * itemsize
    counts = chunks * (ep_size - per_node) * (ep_size // per_node + ep_size) * 8
    return (packets_out + packets_in) * (payload + rows) + counts


class _Route:
    """One exchange over `group`: rows to group ranks `dest`, remembered so that `back` returns rows the
    same way."""

    def __init__(self, env, group, dest: torch.Tensor, recv: list[int], remote: list[int]):
        """group: the process group (None: this rank alone); dest (n,) group rank of each row; recv: rows
        from each group rank (receive_splits: no count exchange per step); remote: the group ranks on other
        nodes (for the byte counts)."""
        self.env, self.group, self.recv, self.remote = env, group, recv, remote
        self.order = torch.argsort(dest, stable=True)  # (n,) rows grouped by destination rank
        self.send = torch.bincount(dest, minlength=len(recv)).tolist()

    def remote_rows(self, splits: list[int]) -> int:
        return sum(splits[q] for q in self.remote)

    def start(self, rows: torch.Tensor):
        """Send rows (n, w) asynchronously (autograd: the backward returns their gradients): `finish` waits."""
        rows = rows.index_select(0, self.order)  # (n, w) grouped by destination
        return comm.all_to_all_start(rows, self.recv, self.send, self.group)

    def finish(self, out, pending) -> torch.Tensor:
        t = self.env.mark()
        out = comm.all_to_all_wait(out, pending)  # (m, w) ordered by source rank
        self.env.close("all_to_all", t)
        return out

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.finish(*self.start(rows))

    def back_start(self, rows: torch.Tensor):
        """Return rows (m, w) received by `forward` to where they came from (asynchronously)."""
        return comm.all_to_all_start(rows, self.send, self.recv, self.group)

    def back_finish(self, out, pending) -> torch.Tensor:
        t = self.env.mark()
        out = comm.all_to_all_wait(out, pending)  # (n, w) in `order`
        self.env.close("all_to_all", t)
        inverse = torch.empty_like(self.order)
        inverse[self.order] = torch.arange(self.order.numel(), device=self.order.device)
        return out.index_select(0, inverse)  # (n, w) in the caller's row order

    def back(self, rows: torch.Tensor) -> torch.Tensor:
        return self.back_finish(*self.back_start(rows))


def experts_in_node(env, held, a_h, a_j, a_local, recv3: list, d_sub: int, k: int, run_experts,
                    path: str) -> torch.Tensor:
    """Steps 3-5 of a packet path, in the node that holds the packets `held` (H, d_sub + k + c): assignment
    (packet a_h, choice a_j) goes to the owner of its node-local expert a_local over the node's group (this
    rank receives recv3 rows from each node-mate), the experts run on exact counts, and the outputs return to
    the holder, which adds each times the gate its packet carried into one partial row per packet (H, d_sub)."""
    E_local, L = env.num_local_experts, env.layout.per_node
    env.profile.rows_received += sum(recv3)
    env.check_budget(sum(recv3), held)  # before the owner's receive buffer exists
    if E_local > 256 and held.dtype != torch.float32:
        raise ValueError(f"{E_local} experts per rank do not fit the {held.dtype} id column of the {path} "
                         f"fan-out (at most 256 below fp32): use fp32, more EP ranks or the flat path")
    fan = _Route(env, env.ctx.ep_node_group(L), a_local // E_local, recv3, [])
    local_col = (a_local % E_local).to(held.dtype).view(-1, 1)  # (A, 1) the owner's local expert, exact
    rows = fan.forward(torch.cat([held[:, :d_sub].index_select(0, a_h), local_col], 1))  # (m, d_sub + 1)
    local = rows[:, d_sub].detach().long()  # (m,)
    rows = rows[:, :d_sub]  # (m, d_sub)
    # 4. Regroup by local expert, run the experts.
    regroup = torch.argsort(local, stable=True)  # (m,)
    counts = torch.bincount(local, minlength=E_local).tolist()
    t = env.mark()  # device events on CUDA (the experts' kernels run asynchronously there)
    out = run_experts(rows.index_select(0, regroup), counts)  # (m, d_sub)
    env.close("experts", t)
    inverse = torch.empty_like(regroup)
    inverse[regroup] = torch.arange(regroup.numel(), device=held.device)
    out = out.index_select(0, inverse)  # (m, d_sub) in arrival order
    # 5. Back to the holder, weighted by the gates carried in the packet: one partial row per packet.
    out = fan.back(out)  # (A, d_sub)
    return gate_combine(out, held[:, d_sub:d_sub + k][a_h, a_j], a_h, held.shape[0])  # (H, d_sub)


def chunk_coroutine(env, x_sub, experts, gates, keep, run_experts, result: list):
    """Steps 1-6 for one chunk; yields while its inter-node exchanges are in flight; result[0] = (S, d_sub)."""
    S, k = experts.shape
    d_sub = x_sub.shape[1]
    layout, ep, me = env.layout, env.ctx.ep_size, env.ctx.ep_rank
    L, N, E_local = layout.per_node, layout.num_nodes, env.num_local_experts
    E_node = E_local * L
    my_node = layout.node(me)
    idt = id_dtype(E_node)
    dev = x_sub.device
    # 1. Kept assignments (choice-major flat index f = j*S + i), then one packet per (node, sub-token).
    e_flat = experts.t().reshape(-1)  # (k*S,)
    f = torch.arange(k * S, device=dev) if keep is None else keep.nonzero().view(-1)  # (n,)
    e = e_flat.index_select(0, f)  # (n,)
    tok, j = f % S, f // S  # (n,), (n,)
    node = e // E_node  # (n,)
    keys, inv = torch.unique(node * S + tok, sorted=True, return_inverse=True)  # (U,), (n,) node-major
    U = keys.numel()
    pk_tok, pk_node = keys % S, keys // S  # (U,)
    w = gates.t().reshape(-1).index_select(0, f).to(x_sub.dtype)  # (n,)
    pk_gates = w.new_zeros(U * k).index_add(0, inv * k + j, w).view(U, k)  # (U, k), differentiable
    pk_ids = torch.full((U * k,), -1, dtype=idt, device=dev)
    pk_ids[inv * k + j] = (e % E_node).to(idt)
    pk_ids = pk_ids.view(U, k)  # (U, k) node-local expert ids, -1 = none
    # The traffic of every rank (packets per node, assignments per rank) sizes every exchange below. The
    # scheduler (dispatch_combine) exchanges every chunk's vector at once and sends back every rank's.
    traffic = torch.cat([torch.bincount(pk_node, minlength=N),
                         torch.bincount(e // E_local, minlength=ep)])  # (N + EP,)
    everyone = yield traffic  # (EP, N + EP) nested lists
    recv2, recv3 = layout.receive_splits([(row[:N], row[N:]) for row in everyone], me)
    # 2. Packets for node b to (b, l) over rail l (group rank = node); node a's stay (a self split).
    ids2 = pack_ids(pk_ids, x_sub.dtype)  # (U, c) the ids' bytes, packed
    rail = _Route(env, env.ctx.ep_rail_group(L), pk_node, recv2, [b for b in range(N) if b != my_node])
    packets_out = rail.remote_rows(rail.send)
    packets_in = rail.remote_rows(rail.recv)
    env.profile.internode_rows += packets_out
    env.profile.internode_bytes += (packets_out + packets_in) * (2 * d_sub + k + ids2.shape[1]) * x_sub.element_size()
    payload = torch.cat([x_sub.index_select(0, pk_tok), pk_gates, ids2], 1)  # (U, d_sub + k + c)
    out2, pend2 = rail.start(payload)
    yield
    held = rail.finish(out2, pend2)  # (H, d_sub + k + c) packets for this node, by source node
    ids = unpack_ids(held[:, d_sub + k:], k, idt)  # (H, k) node-local expert ids, -1 = none
    # 3. Expand to (packet, choice) assignments and send each row to its expert's owner on this node.
    a_h, a_j = (ids >= 0).nonzero(as_tuple=True)  # (A,), (A,) packet-major
    a_local = ids[a_h, a_j].long()  # (A,) node-local expert id
    partial = experts_in_node(env, held, a_h, a_j, a_local, recv3, d_sub, k, run_experts, "two-level")  # (H, d_sub)
    # 6. Partial rows back over the same rail, then into the sub-tokens.
    back, pend = rail.back_start(partial)
    yield
    partial = rail.back_finish(back, pend)  # (U, d_sub) in packet order
    result[0] = partial.new_zeros(S, d_sub).index_add(0, pk_tok, partial)  # (S, d_sub)


def advance_in_turn(coros: list) -> None:
    """Run chunk coroutines to the end, one step of each in turn: one chunk's exchange is in flight while the
    next chunk works. Every rank advances its chunks in the same order, so the collectives match across ranks."""
    live = list(coros)
    while live:
        nxt = []
        for co in live:
            try:
                next(co)
                nxt.append(co)
            except StopIteration:
                pass
        live = nxt


def start_chunks(chunk_coroutine, env, x_sub: torch.Tensor, record, bounds: list, run_experts) -> tuple[list, list]:
    """One coroutine per chunk [bounds[c], bounds[c+1]) of consecutive sub-tokens, and the one-element lists
    their outputs land in; counts the kept assignments into env.profile.rows_sent. Shared by the two-level
    and head-affine paths, whose chunk coroutines differ."""
    experts, gates, keep = record.experts, record.gates, record.keep
    S, k = experts.shape
    env.profile.rows_sent = int(keep.sum()) if keep is not None else experts.numel()  # kept assignments
    keep2 = keep.view(k, S) if keep is not None else None  # (k, S) choice-major
    results, coros = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        res = [None]
        kc = keep2[:, lo:hi].reshape(-1) if keep2 is not None else None  # (k*(hi-lo),) choice-major
        coros.append(chunk_coroutine(env, x_sub[lo:hi], experts[lo:hi], gates[lo:hi], kc, run_experts, res))
        results.append(res)
    return coros, results


def dispatch_combine(x_sub: torch.Tensor, record, run_experts, env) -> torch.Tensor:
    """x_sub (S, d_sub), a routing.RoutingRecord -> (S, d_sub), in env.chunks pipelined chunks of
    consecutive sub-tokens (each chunk's outputs depend only on its own sub-tokens). The path interface of
    moe/dispatch_env.py."""
    S, chunks = record.experts.shape[0], env.chunks
    bounds = [S * c // chunks for c in range(chunks + 1)]
    coros, results = start_chunks(chunk_coroutine, env, x_sub, record, bounds, run_experts)
    # Step 1 of every chunk, then one exchange of all their traffic vectors (the one host sync).
    traffic = torch.stack([next(co) for co in coros])  # (C, N + EP)
    width = traffic.numel()
    t = env.mark()
    everyone = comm.all_to_all_v(traffic.reshape(-1).repeat(env.ctx.ep_size), [width] * env.ctx.ep_size,
                                 [width] * env.ctx.ep_size, env.ctx.ep_group)  # (EP * C * (N + EP),)
    everyone = everyone.view(env.ctx.ep_size, *traffic.shape).transpose(0, 1).tolist()  # (C, EP, N + EP)
    env.close("counts_exchange", t)
    env.profile.internode_bytes += width * 8 * len(env.layout.remote_peers(env.ctx.ep_rank))
    for co, mine in zip(coros, everyone):
        co.send(mine)  # runs the chunk up to its first inter-node exchange
    advance_in_turn(coros)
    return torch.cat([r[0] for r in results], 0)  # (S, d_sub)
