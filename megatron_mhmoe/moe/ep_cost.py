"""Which expert-parallel path a layout should take (model.moe.ep_dispatch = 'auto'): a cost model.

Per rank and fwd+bwd step of one MoE layer, for S local sub-tokens with k choices of d_sub values
(itemsize bytes each), E experts, EP = N nodes x L ranks, routing assumed uniform:

  seconds = exchanges x alpha + NIC bytes / NIC bandwidth + node bytes / node bandwidth

- flat: 5 exchanges (counts, dispatch, combine, and the two conjugates in the backward). A rank sends
  S k (N-1)/N of its rows to other nodes, each over its own NIC, 4 times per step (dispatch, combine's
  return, and both in the backward): NIC bytes 4 S k (N-1)/N d_sub itemsize; node bytes
  4 S k (L-1)/(N L) d_sub itemsize (rows for the other ranks of its node).
- two-level (rail-aligned, moe/two_level.py): 1 + 8 C exchanges (C = a2a_chunks). A rank sends one packet
  per (sub-token, remote node) with a kept choice there, q = 1 - C(E - E/N, k) / C(E, k) of the S per
  remote node, over its own NIC: NIC bytes S (N-1) q (2 (d_sub + k + c) + 2 d_sub) itemsize (packet and
  its gradient, partial row and its gradient; two_level.internode_formula), c = id columns. Node bytes:
  the fan-out, 4 S k (L-1)/L d_sub itemsize (every kept choice, received over a rail, goes to one of the
  node's L ranks).
- head-affine (model.moe.head_groups placed on the nodes, moe/head_affine_dispatch.py): per chunk 5
  exchanges forward (rail, the fan-out's counts inside the node, fan-out, its return, rail back; 4 without
  a node-mate) and 4 backward. Every sub-token is one packet to its head's node, S (N-1)/N of them to
  other nodes, whatever the routing: NIC bytes S (N-1)/N (2 (d_sub + k + c) + 2 d_sub) itemsize; node
  bytes as two-level's.
Full duplex: what a rank sends equals what it receives (uniform routing), so sent bytes time the link.
`auto` picks the cheaper path (flat on a tie, and whenever the EP group fits in one node). Bytes scale
with S and exchanges do not, so the two-level path wins on slow NICs and large batches and loses where
the per-exchange latency dominates (fast links, few tokens). The constants are MoEConfig fields:
ep_nic_gbps, ep_node_gbps, ep_exchange_us (defaults: a 400 Gbit/s NIC per GPU, NVLink, 30 us).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_mhmoe.moe.two_level import NodeLayout, id_columns, id_dtype


@dataclass(frozen=True)
class Link:
    """The per-rank network the model prices."""

    nic_gbps: float
    """Each rank's own NIC, Gbit/s per direction."""
    node_gbps: float
    """Between ranks of one node, Gbit/s per direction per rank."""
    exchange_us: float
    """alpha: fixed cost of one all-to-all (launch, synchronisation, the slowest peer's latency), microseconds."""


@dataclass(frozen=True)
class PathCost:
    exchanges: int
    nic_bytes: float
    node_bytes: float
    seconds: float


def _cost(exchanges: int, nic: float, node: float, link: Link) -> PathCost:
    sec = exchanges * link.exchange_us * 1e-6 + nic * 8 / (link.nic_gbps * 1e9) + node * 8 / (link.node_gbps * 1e9)
    return PathCost(exchanges, nic, node, sec)


def packet_share(num_experts: int, k: int, num_nodes: int) -> float:
    """q: probability that a sub-token's k distinct uniform choices include one on a given node."""
    per = num_experts // num_nodes
    k = min(k, num_experts)
    return 1.0 - math.comb(num_experts - per, k) / math.comb(num_experts, k)


def flat_cost(S: int, k: int, E: int, d_sub: int, itemsize: int, layout: NodeLayout, link: Link) -> PathCost:
    N, L = layout.num_nodes, layout.per_node
    row = d_sub * itemsize
    return _cost(5, 4 * S * k * (N - 1) / N * row, 4 * S * k * (L - 1) / (N * L) * row, link)


def two_level_cost(S: int, k: int, E: int, d_sub: int, itemsize: int, layout: NodeLayout, chunks: int,
                   link: Link) -> PathCost:
    N, L = layout.num_nodes, layout.per_node
    c = id_columns(k, 1 if id_dtype(E // N) == torch.int8 else 4, itemsize)
    packets = S * (N - 1) * packet_share(E, k, N)
    nic = packets * (2 * (d_sub + k + c) + 2 * d_sub) * itemsize
    return _cost(1 + 8 * chunks, nic, 4 * S * k * (L - 1) / L * d_sub * itemsize, link)


def head_affine_cost(S: int, k: int, E: int, d_sub: int, itemsize: int, layout: NodeLayout, chunks: int,
                     link: Link) -> PathCost:
    N, L = layout.num_nodes, layout.per_node
    c = id_columns(k, 1 if id_dtype(E // N) == torch.int8 else 4, itemsize)
    nic = S * (N - 1) / N * (2 * (d_sub + k + c) + 2 * d_sub) * itemsize
    return _cost((9 if L > 1 else 8) * chunks, nic, 4 * S * k * (L - 1) / L * d_sub * itemsize, link)


def choose(setting: str, S: int, k: int, E: int, d_sub: int, itemsize: int, layout: NodeLayout | None,
           chunks: int, link: Link, head_groups: int = 1) -> str:
    """'flat', 'two_level' or 'head_affine' for model.moe.ep_dispatch = setting ('auto', 'flat',
    'two_level'). With head-affine placement (head_groups > 1, placed on the nodes) the node-aware path is
    the head-affine one: 'two_level' takes it, 'auto' compares it with flat."""
    if layout is None or setting == "flat":
        return "flat"
    node_aware, cost = ("head_affine", head_affine_cost) if head_groups > 1 else ("two_level", two_level_cost)
    if setting == "two_level":
        return node_aware
    flat = flat_cost(S, k, E, d_sub, itemsize, layout, link)
    other = cost(S, k, E, d_sub, itemsize, layout, chunks, link)
    return node_aware if other.seconds < flat.seconds else "flat"

