"""The arithmetic of head-affine routing (model.moe.head_groups), without torch: config validation and the
launch-side checks import it before any torch import (moe/head_affine.py holds the routing itself)."""
from __future__ import annotations


def check_routing(G: int, heads: int, num_experts: int, top_k: int, where: str = "moe.head_groups") -> None:
    """ValueError with the arithmetic when G head groups cannot hold the routing (G > 1)."""
    if G <= 1:
        return
    if heads % G:
        raise ValueError(f"{where}={G} head groups do not divide num_heads={heads} ({heads} % {G} = {heads % G}): "
                         f"head j routes in group j mod G, and every group must get h/G heads of each token; "
                         f"pick G from {[g for g in range(1, heads + 1) if heads % g == 0]}")
    if num_experts % G:
        raise ValueError(f"{where}={G} head groups do not divide num_experts={num_experts} "
                         f"({num_experts} % {G} = {num_experts % G}): each group holds E/G contiguous experts")
    if top_k > num_experts // G:
        raise ValueError(f"{where}={G}: a group holds E/G = {num_experts}/{G} = {num_experts // G} experts, fewer "
                         f"than top_k={top_k}: a head chooses its k experts inside its group; lower G or top_k")
