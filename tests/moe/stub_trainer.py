"""A Trainer whose engine is the bare model on one process: train_step's own logic (micro-batches, running
counts, bias updates) without DeepSpeed. For single-process tests of what train_step does around the model."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from megatron_mhmoe.parallel.context import ParallelContext


def stub_trainer(model, grad_accum: int, skipped: bool = False):
    """(trainer, outs): outs collects every micro-batch's model output; `skipped` makes every step a
    skipped (non-finite) one."""
    from megatron_mhmoe.runtime.trainer import Trainer

    outs = []

    class Engine:
        device = torch.device("cpu")

        def to_device(self, b):
            return b

        def __call__(self, tokens, **kw):
            outs.append(model(tokens, **kw))
            return outs[-1]

        def backward(self, loss):
            loss.backward()

        def step(self):
            return SimpleNamespace(grad_norm=0.0, skipped=skipped)

    tr = object.__new__(Trainer)
    tr.cfg = SimpleNamespace(train=SimpleNamespace(grad_accum_steps=grad_accum))
    tr.engine, tr.module, tr.ctx, tr.callbacks, tr.device_guard = (Engine(), model, ParallelContext.single_process(),
                                                                   [], False)
    return tr, outs


def token_batches(vocab: int, n: int, batch: int = 2, seq: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return iter([{"tokens": t, "labels": t, "loss_mask": torch.ones(batch, seq)}
                 for t in (torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n))])
