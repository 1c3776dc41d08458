"""train.compile: each transformer block under torch.compile.

Per block, not the whole model: the blocks are where the time goes, and a block's graph is the same for
every layer, so a deep model compiles one graph shape (reused across layers with the same shapes) rather
than one huge graph. `nn.Module.compile` compiles in place, so parameter names, the state dict and
checkpoints are those of the eager model, and activation checkpointing still wraps each block.
Static shapes (dynamic=False): training batches all have one shape; another shape (evaluation with
another micro-batch) compiles once more.

What traces as one graph (no graph break): the attention, norms and dense MLP, and the MoE layer with
model.moe.a2a_device_counts=true and a capacity (tests/moe/test_compile.py asserts it with fullgraph=True):
its shapes are fixed by the config and nothing reads values back to the host. The count-sized MoE paths
(dropless, or a2a_device_counts=false) read per-expert counts back to size the expert GEMMs: traced, each
new set of counts would recompile, so their dispatch runs eagerly (torch.compiler.disable, in
MoEDispatcher.path) between two compiled graphs: correct, with a graph break on each side.
"""
from __future__ import annotations

import torch.nn as nn


def available_backends() -> list[str]:
    import torch._dynamo
    return sorted(torch._dynamo.list_backends(exclude_tags=()))


def check_backend(backend: str) -> None:
    """A clear error for a backend torch.compile does not know (instead of a failure at the first step)."""
    known = available_backends()
    if backend not in known:
        raise ValueError(f"train.compile_backend={backend!r} is not a torch.compile backend; known: {known} "
                         f"(or set train.compile=false)")


def compile_blocks(model: nn.Module, backend: str = "inductor", dynamic: bool = False) -> int:
    """Compile every transformer block of `model` (a GPTModel: model.layers) in place; returns how many."""
    check_backend(backend)
    for block in model.layers:
        block.compile(backend=backend, dynamic=dynamic)
    return len(model.layers)


def compiled_blocks(model: nn.Module) -> list[bool]:
    """Per block: whether its calls go through torch.compile (tests, logs)."""
    return [getattr(block, "_compiled_call_impl", None) is not None for block in model.layers]
