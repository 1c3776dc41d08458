"""One metered fwd+bwd of an MoE layer on the path under test or the flat one, for the tests that compare
dispatch paths (two-level, head-affine) with the flat path."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))
from a2a_meter import A2AMeter  # noqa: E402


def step(layer, x, flat: bool, per_node: int) -> dict:
    """Outputs, input and parameter gradients, drops, the all-to-all meter, and the dispatcher's counts: bytes
    to other nodes, kept assignments (sent + home rows) and rows the rank's experts ran (received + home)."""
    layer.dispatcher.force_flat = flat
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with A2AMeter(per_node=per_node) as meter:
        y, st = layer(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    prof = layer.dispatcher.profile
    return dict(y=y.detach(), gx=x.grad, grads=grads, dropped=st.dropped, meter=meter, calls=meter.calls,
                counted=prof.internode_bytes, sent=prof.rows_sent + prof.rows_home,
                received=prof.rows_received + prof.rows_home)
