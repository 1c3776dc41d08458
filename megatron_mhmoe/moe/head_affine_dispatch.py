"""The expert-parallel path that knows head-affine placement: the cross-node exchange has fixed sizes.

With model.moe.head_groups = G placed on N nodes (moe/head_affine.py), every choice of sub-token i (head
j = i mod h) lies on node b(j) = ((j mod G) // (G/N)): h/N of every token's sub-tokens go to each node,
whatever the router decides. So, for this rank's S sub-tokens (every EP rank routes the same S per forward:
fixed micro-batch shapes, as ep_dispatch='auto' also needs):

1. One packet per sub-token (the row, its k gates, its k node-local expert ids bit-packed; dropped
   choices: gate 0, id -1), grouped by destination node: S/N packets for each node.
2. Rank (a, l) sends node b's packets to (b, l) over rail l (ep_rail_group), and receives S/N from each
   node's rank of its rail: the splits are known without any exchange of counts.
3. The holder expands its packets into (packet, choice) assignments and sends each row to its expert's
   owner inside the node (ep_node_group). Only this part depends on the routing: its counts are exchanged
   inside the node (L integers), never across nodes.
4. The owners run their experts; the rows return to the holder, which adds them times their gates into one
   partial row per packet (5), and returns it over the same rail (6).
Cross-node: S (N-1)/N packets each way per forward, each sub-token once whatever k (flat: S k (N-1)/N
rows; the rail-aligned two-level path: a packet per (sub-token, remote node) with a choice there, and a
traffic vector to every rank per chunk). Every rank sends and receives the same bytes over its NIC, so no
node or rail is busier than another, however skewed the routing. Packets whose every choice was dropped by
the capacity still travel (the splits stay fixed). model.moe.a2a_chunks pipelines chunks of whole tokens,
each chunk's rail exchanges asynchronous (as two_level.py).

Reference: the flat path (dispatcher.flat_dispatch_combine) on the same routing; tests/moe/
test_head_affine_dispatch.py checks outputs, gradients and drops equal.
"""
from __future__ import annotations

import torch

from megatron_mhmoe.moe import head_affine
from megatron_mhmoe.moe.two_level import (_Route, advance_in_turn, experts_in_node, id_dtype, pack_ids, start_chunks,
                                          unpack_ids)
from megatron_mhmoe.parallel import comm


def node_of_sub_tokens(S: int, heads: int, G: int, num_nodes: int, device=None) -> torch.Tensor:
    """(S,) node of each token-major sub-token (S a multiple of h): its head's group's node."""
    return head_affine.head_group(S, heads, G, 0, device) // (G // num_nodes)


def chunk_coroutine(env, x_sub, experts, gates, keep, run_experts, result: list):
    """Steps 1-6 for one chunk of whole tokens; yields while its rail exchanges are in flight."""
    S, k = experts.shape
    d_sub = x_sub.shape[1]
    layout, me = env.layout, env.ctx.ep_rank
    L, N, E_local = layout.per_node, layout.num_nodes, env.num_local_experts
    E_node = E_local * L
    my_node = layout.node(me)
    idt = id_dtype(E_node)
    dev = x_sub.device
    # 1. One packet per sub-token, to its head's node.
    node = node_of_sub_tokens(S, env.num_heads, env.head_groups, N, dev)  # (S,)
    kept = keep.view(k, S).t() if keep is not None else torch.ones(S, k, dtype=torch.bool, device=dev)  # (S, k)
    if not bool((experts // E_node == node[:, None]).all()):
        raise RuntimeError(f"the head-affine path got a choice off its head's node (head_groups="
                           f"{env.head_groups}, {N} nodes of {E_node} experts): the routing did not follow "
                           f"model.moe.head_groups; route with the layer's router, or take the flat path")
    pk_gates = torch.where(kept, gates.to(x_sub.dtype), gates.new_zeros((), dtype=x_sub.dtype))  # (S, k)
    pk_ids = torch.where(kept, experts % E_node, torch.full_like(experts, -1)).to(idt)  # (S, k), -1 = dropped
    payload = torch.cat([x_sub, pk_gates, pack_ids(pk_ids, x_sub.dtype)], 1)  # (S, d_sub + k + c)
    # 2. Fixed splits: S/N packets to and from every node over this rank's rail.
    per = S // N
    rail = _Route(env, env.ctx.ep_rail_group(L), node, [per] * N, [b for b in range(N) if b != my_node])
    packets_out, packets_in = rail.remote_rows(rail.send), rail.remote_rows(rail.recv)
    env.profile.internode_rows += packets_out
    # forward: packets out, partial rows in; backward: partial-row gradients out, packet gradients in.
    env.profile.internode_bytes += (packets_out + packets_in) * (payload.shape[1] + d_sub) * x_sub.element_size()
    out2, pend2 = rail.start(payload)
    yield
    held = rail.finish(out2, pend2)  # (S, d_sub + k + c) packets for this node, by source node
    ids = unpack_ids(held[:, d_sub + k:], k, idt)  # (S, k)
    # 3. Assignments to the experts' owners in this node; their counts are exchanged inside the node only.
    a_h, a_j = (ids >= 0).nonzero(as_tuple=True)  # (A,), (A,) packet-major
    a_e = ids[a_h, a_j].long()  # (A,) node-local expert id
    owner = a_e // E_local  # (A,) local rank of the owner
    node_group = env.ctx.ep_node_group(L)
    send3 = torch.bincount(owner, minlength=L)  # (L,)
    recv3 = comm.all_to_all_v(send3, [1] * L, [1] * L, node_group).tolist() if L > 1 else send3.tolist()
    partial = experts_in_node(env, held, a_h, a_j, a_e, recv3, d_sub, k, run_experts, "head-affine")  # (S, d_sub)
    # 6. Over the same rail, back to the sub-token (one packet each: back_finish restores their order).
    back, pend = rail.back_start(partial)
    yield
    result[0] = rail.back_finish(back, pend)  # (S, d_sub)


def dispatch_combine(x_sub: torch.Tensor, record, run_experts, env) -> torch.Tensor:
    """x_sub (S, d_sub), a routing.RoutingRecord -> (S, d_sub), in env.chunks chunks of whole tokens. The
    path interface of moe/dispatch_env.py; env.head_groups and env.num_heads give the placement."""
    S, h = record.experts.shape[0], env.num_heads
    if S % h:
        raise ValueError(f"{S} sub-tokens are not whole tokens of h={h} sub-tokens ({S} % {h} = {S % h})")
    n = S // h
    chunks = max(1, min(env.chunks, n))
    bounds = [h * (n * c // chunks) for c in range(chunks + 1)]  # token-aligned: every node gets h/N per token
    coros, results = start_chunks(chunk_coroutine, env, x_sub, record, bounds, run_experts)
    advance_in_turn(coros)
    return torch.cat([r[0] for r in results], 0)  # (S, d_sub)
