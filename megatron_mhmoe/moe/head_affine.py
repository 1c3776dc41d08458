"""Head-affine expert placement (model.moe.head_groups): an MH-MoE-only routing rule and its node layout.

A token arrives as h sub-tokens (heads). With G head groups the E experts form G contiguous groups of E/G
(group g holds experts g E/G .. (g+1) E/G - 1) and sub-token j of a token (head j) routes its top-k only
among the experts of group j mod G. Placed on an EP group of N nodes with G a multiple of N, group g lies
on node g // (G/N) (experts are contiguous per rank and ranks per node, so no re-placement is needed): the
node every sub-token goes to is fixed by its head, whatever the router decides. The cross-node exchange
then has fixed sizes (h/N of a token's sub-tokens per node), carries each sub-token once whatever k, and
loads every node alike; only the fan-out inside a node depends on the routing (moe/head_affine_dispatch.py).

G = 0 or 1 is off (the shared pool; the layer is bit-identical to one without the option). 'nodes' = the
EP group's node count (1 when the EP group fits one node or the layout is unknown: off).
"""
from __future__ import annotations

import torch


def resolve(setting, layout) -> int:
    """model.moe.head_groups (an int, or 'nodes') -> G (>= 1) for an EP group of `layout`
    (two_level.NodeLayout, or None when the EP group fits one node or the layout is unknown)."""
    if setting == "nodes":
        return layout.num_nodes if layout is not None else 1
    return max(1, int(setting))


def check_placement(G: int, layout, num_experts: int) -> None:
    """ValueError with the arithmetic when the G groups cannot each lie on one node of the EP group.

    Group g is experts g E/G .. (g+1) E/G - 1; node b holds experts b E/N .. (b+1) E/N - 1 (E/EP per rank,
    L ranks per node). Every group lies inside one node exactly when N divides G (then node b holds
    groups b G/N .. (b+1) G/N - 1, on its L ranks)."""
    if G <= 1 or layout is None:
        return
    N, L, ep = layout.num_nodes, layout.per_node, layout.ep_size
    if G % N:
        raise ValueError(
            f"model.moe.head_groups={G} does not place on the EP group's {N} nodes of {L} ranks: group g must lie "
            f"on one node, which needs G a multiple of the nodes ({G} % {N} = {G % N}); node b holds experts "
            f"b*E/N .. (b+1)*E/N - 1 = {num_experts // N} of E={num_experts} (E/EP = {num_experts // ep} on each "
            f"of its {L} ranks), group g holds E/G = {num_experts // G}. Set head_groups to 'nodes' ({N}) or a "
            f"multiple of {N} that divides num_heads")


def node_of_group(G: int, num_nodes: int) -> list[int]:
    """Node of each of the G groups (G a multiple of num_nodes): group g on node g // (G/N)."""
    return [g // (G // num_nodes) for g in range(G)]


def head_group(S: int, heads: int, G: int, first_index: int = 0, device=None) -> torch.Tensor:
    """(S,) group of each of S token-major sub-tokens whose indices start at first_index (a multiple of h):
    sub-token i is head i mod h, routed in group (i mod h) mod G."""
    i = torch.arange(first_index, first_index + S, device=device)
    return (i % heads) % G


def affine_scores(select: torch.Tensor, heads: int, G: int, first_index: int = 0) -> torch.Tensor:
    """(S, E) selection scores -> the same with every expert outside its sub-token's head group at -inf, so
    that a top-k of the result stays inside the group."""
    S, E = select.shape
    per = E // G
    allowed = head_group(S, heads, G, first_index, select.device)[:, None] == \
        torch.arange(E, device=select.device)[None, :] // per  # (S, E)
    return select.masked_fill(~allowed, float("-inf"))


def affine_reference(select: torch.Tensor, heads: int, G: int, k: int) -> torch.Tensor:
    """Slow reference of head-affine top-k: (S, k) expert ids by loops over sub-tokens and their group."""
    S, E = select.shape
    per = E // G
    out = torch.empty(S, k, dtype=torch.long)
    for i in range(S):
        g = (i % heads) % G
        pool = range(g * per, (g + 1) * per)
        out[i] = torch.tensor(sorted(pool, key=lambda e: -float(select[i, e]))[:k])
    return out


def debug_in_groups(debug: torch.Tensor, heads: int, G: int, num_experts: int, first_index: int = 0) -> torch.Tensor:
    """(S, k) debug choices drawn over E/G experts -> the same ids inside each sub-token's head group (so
    'skew' puts the skewed first choices on each group's first expert)."""
    group = head_group(debug.shape[0], heads, G, first_index, debug.device)  # (S,)
    return debug + (group * (num_experts // G))[:, None]
