"""Dispatch and combine without a host synchronisation: fixed capacity slots (MoEConfig.a2a_device_counts).

The flat path brings the per-expert counts to the host to size its uneven all-to-all; on a GPU that stalls
the stream once per MoE forward (twice with EP > 1). With a capacity C per expert the sizes are known in
advance: no rank keeps more than C assignments for one expert (capacity is decided over the replica, of
which a rank holds a share), so every (rank, expert) pair gets C fixed slots, every all-to-all has equal
splits, and the receive buffer is bounded: EP x E_local x C rows, whatever the routing. Everything below is
device tensors with shapes fixed by (S, k, E, C, EP): no `.tolist()` / `.item()`, no boolean-mask indexing,
no bincount (each of those reads values back on CUDA).

For S local sub-tokens with k choices (choice-major flat index f = j*S + i), sorted by expert (`order`):
1. Slot of each assignment: e*C + its position among this rank's assignments to e in queue order. A rank's
   kept assignments to e are a prefix of that queue (all first choices before second ones, then by token,
   and the replica's queue only cuts later entries), so kept ones have positions < C; dropped ones go to a
   trash slot E*C.
2. send[s] = x[sub-token of slot s] for the E*C slots, a zero row where no assignment landed: (E*C, d),
   expert-major, so EP rank p's experts are the rows [p*E_local*C, (p+1)*E_local*C).
3. Equal-split all-to-all: (EP*E_local*C, d) ordered (source rank, local expert, slot).
4. Regroup to (E_local, EP*C, d): each local expert's rows, and run the experts on the static counts
   [EP*C] * E_local. Empty slots are zero rows: the experts have no biases and act(0) = 0, so they give
   zero outputs and add nothing to the weight gradients.
5. Undo 4, the reverse all-to-all, then each kept assignment's output times its gate into its sub-token.
"""
from __future__ import annotations

from typing import Callable

import torch

from megatron_mhmoe.moe.gate_combine import gate_combine
from megatron_mhmoe.parallel import comm


def slots(e_flat: torch.Tensor, order: torch.Tensor, keep: torch.Tensor, num_experts: int,
          capacity: int) -> torch.Tensor:
    """(k*S,) choice-major expert ids, their stable argsort, keep mask -> (k*S,) slot of each sorted
    assignment (order[i]'s slot), E*C for a dropped one. Step 1 above."""
    e_sorted = e_flat.index_select(0, order)  # (k*S,)
    # (E,) all assignments, kept or not. Not torch.bincount: on CUDA it reads the max id back to size its output.
    counts = torch.zeros(num_experts, dtype=torch.long, device=e_sorted.device).scatter_add_(
        0, e_sorted, torch.ones_like(e_sorted))
    starts = torch.cumsum(counts, 0) - counts  # (E,)
    pos = torch.arange(e_sorted.numel(), device=e_sorted.device) - starts.index_select(0, e_sorted)  # (k*S,)
    kept = keep.index_select(0, order)
    return torch.where(kept, e_sorted * capacity + pos, torch.full_like(pos, num_experts * capacity))


def dispatch_combine(x_sub: torch.Tensor, record, run_experts: Callable, env) -> torch.Tensor:
    """x_sub (S, d), a routing.RoutingRecord with a capacity -> (S, d). Steps above; the path interface of
    moe/dispatch_env.py (env: DispatchEnv)."""
    gates, keep, order, e_flat = record.gates, record.keep, record.order, record.flat_experts
    ep_size, ep_group, num_experts, capacity = env.ctx.ep_size, env.ctx.ep_group, env.num_experts, record.capacity
    E, C = num_experts, capacity
    received = ep_size * (E // ep_size) * C  # a static bound: the buffer is this size whatever the routing
    if 0 < env.recv_budget < received:
        raise RuntimeError(
            f"model.moe.a2a_device_counts=true gives every EP rank a receive buffer of EP x E_local x capacity "
            f"= {ep_size} x {E // ep_size} x {C} = {received} rows, over model.moe.ep_recv_budget="
            f"{env.recv_budget}: lower capacity_factor, raise ep_recv_budget (0 = no budget), or turn "
            f"a2a_device_counts off")
    mark = [env.mark()]

    def tick(name: str) -> None:
        mark[0] = env.close(name, mark[0])

    S, d = x_sub.shape
    E_local = E // ep_size
    # 1.
    slot = slots(e_flat, order, keep, E, C)  # (k*S,) per sorted assignment
    src = order % S  # (k*S,) sub-token of each sorted assignment
    # 2. slot -> the row that fills it; S (a zero row appended to x) for an empty slot. Dropped assignments
    # all write the trash entry E*C, which is cut off.
    slot_row = torch.full((E * C + 1,), S, dtype=torch.long, device=x_sub.device).scatter_(0, slot, src)
    x_pad = torch.cat([x_sub, x_sub.new_zeros(1, d)])  # (S+1, d)
    send = x_pad.index_select(0, slot_row[:E * C])  # (E*C, d)
    tick("permute")
    # 3.
    splits = [E_local * C] * ep_size
    recv = comm.all_to_all(send, splits, splits, ep_group) if ep_size > 1 else send  # (EP*E_local*C, d)
    tick("all_to_all")
    # 4.
    rows = recv.view(ep_size, E_local, C, d).transpose(0, 1).reshape(E_local * ep_size * C, d)  # (E_local*EP*C, d)
    if torch.compiler.is_compiling() and hasattr(run_experts, "forward_padded"):
        # Traced: batched GEMMs over the static (E_local, EP*C, d) layout (the grouped node's Python-side
        # chunking is not traceable); eager keeps the grouped node (its results are unchanged).
        out = run_experts.forward_padded(rows.view(E_local, ep_size * C, d)).reshape(E_local * ep_size * C, d)
    else:
        out = run_experts(rows, [ep_size * C] * E_local)  # (E_local*EP*C, d)
    tick("experts")
    # 5.
    out = out.view(E_local, ep_size, C, d).transpose(0, 1).reshape(ep_size * E_local * C, d)  # (EP*E_local*C, d)
    back = comm.all_to_all(out, splits, splits, ep_group) if ep_size > 1 else out  # (E*C, d) in slot order
    tick("all_to_all")
    back = torch.cat([back, back.new_zeros(1, d)])  # (E*C+1, d): the trash slot reads zeros
    y_rows = back.index_select(0, slot)  # (k*S, d)
    weights = (gates.t().reshape(-1).index_select(0, order) * keep.index_select(0, order)).to(y_rows.dtype)
    y = gate_combine(y_rows, weights, src, S)
    tick("combine")
    env.profile.rows_sent, env.profile.rows_received = E * C, received
    env.profile.bytes_sent = E * C * d * x_sub.element_size() if ep_size > 1 else 0
    return y
