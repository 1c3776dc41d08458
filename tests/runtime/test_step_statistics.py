"""Statistics off the hot path and host reads per training step (moe/routing_stats.py, runtime/trainer.py).

One spawned job at world 4 (TP=2 x EP=2, so DP=2), two MoE layers, two micro-batches per step:
- the statistics logged at a log step (every moe/ and routing/ value of the log line) are exactly those
  of the reference path, which computes them in every forward and sums them over TP per layer
  (Trainer.stats_reference: the layers' stats_mode 'eager'), for a dropless model and for one with a
  capacity that drops (a2a_device_counts); the losses of every step agree too (statistics never feed training);
- host reads: every Python-level way a tensor value reaches the host (tolist, item, bool, int, float,
  index, cpu, numpy, nonzero) is counted during whole train_steps and attributed to the MoE code
  (a megatron_mhmoe/moe frame nearest on the stack), torch's optimizer (torch/optim: AdamW keeps its step
  counters on the host on purpose, so reading them never waits for the device) or the rest of the step.
  Dropless: exactly one per MoE layer per forward (the dispatch counts, one read for this rank's and the
  received ones); with a2a_device_counts: none in the MoE code. The rest of the step: exactly REST_READS,
  on an unlogged and on a logged step alike (a logged step's statistics are read by the log line, after
  the step).
- collectives: a logged step makes one all-reduce over TP and one over DP more than an unlogged one.
These see Python-level reads only; the C++ ones (boolean masks, bincount on CUDA) are checked on a GPU
with torch.cuda.set_sync_debug_mode (docs/step-throughput.md).
"""
from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

from tests.distributed import run_workers

pytestmark = pytest.mark.slow  # four spawned DeepSpeed engines (left out of `make test-fast`)

SEQ, MB, ACCUM, VOCAB = 8, 2, 2, 64
LAYERS = 2  # MoE layers (moe_every=1)
REST_READS = 2
"""Host reads a train step makes outside the MoE code and the optimizer: the DP-mean loss sums and the
global gradient norm, both read every step by the non-finite guard (runtime/trainer.NonFiniteGuard)."""
READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero")


@contextlib.contextmanager
def count_all_reduces(counts: dict, ctx):
    """counts['tp'] / counts['dp'] += 1 for each all-reduce over the TP / DP group (any caller)."""
    import torch.distributed as dist
    real = dist.all_reduce

    def counted(tensor, *a, **k):
        group = k.get("group", a[1] if len(a) > 1 else None)
        for name, g in (("tp", ctx.tp_group), ("dp", ctx.dp_group)):
            if group is g:
                counts[name] = counts.get(name, 0) + 1
        return real(tensor, *a, **k)
    dist.all_reduce = counted
    try:
        yield counts
    finally:
        dist.all_reduce = real


@contextlib.contextmanager
def count_host_reads(counts: dict):
    """counts[where] += 1 for each Python-level host read; where: 'moe' or 'optimizer' by the nearest
    megatron_mhmoe/moe or torch/optim frame on the stack, else 'rest'."""
    places = {"moe": os.sep + os.path.join("megatron_mhmoe", "moe") + os.sep,
              "optimizer": os.sep + os.path.join("torch", "optim") + os.sep}
    saved = {n: getattr(torch.Tensor, n) for n in READS}

    def wrap(name, real):
        def counted(self, *a, **k):
            f, where = sys._getframe(1), "rest"
            while f is not None and where == "rest":
                where = next((p for p, d in places.items() if d in f.f_code.co_filename), "rest")
                f = f.f_back
            counts[where] = counts.get(where, 0) + 1
            return real(self, *a, **k)
        return counted
    try:
        for n, f in saved.items():
            setattr(torch.Tensor, n, wrap(n, f))
        yield counts
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def _batches(ctx, steps: int):
    for step in range(steps):
        b = torch.randint(0, VOCAB, (MB * ACCUM * ctx.dp_size, SEQ + 1), generator=torch.Generator().manual_seed(step))
        for m in range(ACCUM):
            x = b[(ctx.dp_rank * ACCUM + m) * MB:(ctx.dp_rank * ACCUM + m + 1) * MB]
            yield {"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": torch.ones(MB, SEQ)}


def _trainer(ctx, capacity: float, device_counts: bool, reference: bool):
    from megatron_mhmoe.config import ModelConfig, MoEConfig
    from megatron_mhmoe.model.gpt import GPTModel
    from megatron_mhmoe.runtime.engine import Engine
    from megatron_mhmoe.runtime.run_config import RunConfig
    from megatron_mhmoe.runtime.trainer import Trainer

    rc = RunConfig(model=ModelConfig(
        vocab_size=VOCAB, hidden_size=32, num_layers=LAYERS, num_attention_heads=4, ffn_hidden_size=64,
        max_seq_len=SEQ, moe=MoEConfig(num_experts=4, top_k=2, num_heads=2, expert_hidden_size=16, moe_every=1,
                                       capacity_factor=capacity, a2a_device_counts=device_counts)))
    rc.parallel.tp, rc.parallel.ep = ctx.tp_size, ctx.ep_size
    rc.train.micro_batch_size, rc.train.global_batch_size, rc.train.seq_len = MB, MB * ACCUM * ctx.dp_size, SEQ
    rc.train.log_interval = 2
    rc.validate(ctx.world_size)
    tr = Trainer(rc)
    tr.attach(ctx, Engine(GPTModel(rc.model, ctx), rc, ctx, lambda s: 1.0))
    tr.stats_reference = reference
    tr.flops_per_token, tr.peak_tflops, tr.threshold = 1.0, None, 0.5
    return tr


def _logged(tr, r) -> dict:
    from megatron_mhmoe.runtime.trainer import _Window
    w = _Window()
    w.add(1)
    return {k: v for k, v in tr._metrics(r, w).items() if k.startswith(("moe/", "routing/"))}


def worker(rank: int, world: int) -> dict:
    os.environ["DS_ACCELERATOR"] = "cpu"
    from megatron_mhmoe.parallel.context import ParallelContext
    from megatron_mhmoe.runtime.engine import init_distributed
    init_distributed(120)
    ctx = ParallelContext.from_world(2, 2)
    out = {}
    for name, capacity, device_counts in (("dropless", 0.0, False), ("device_counts", 1.0, True)):
        runs = {}
        for reference in (True, False):
            tr, batches = _trainer(ctx, capacity, device_counts, reference), _batches(ctx, 2)
            losses, reads, all_reduces = [], [], []
            for log in (False, True):  # an unlogged step, then a logged one
                counts, reduces = {"moe": 0, "optimizer": 0, "rest": 0}, {"tp": 0, "dp": 0}
                with count_host_reads(counts), count_all_reduces(reduces, ctx):
                    r = tr.train_step(batches, log=log)
                losses.append(r["loss"])
                reads.append(dict(counts, log=log))
                all_reduces.append(reduces)
            runs[reference] = dict(losses=losses, logged=_logged(tr, r), reads=reads, all_reduces=all_reduces,
                                   dropped=sum(st.dropped for st in r["moe_stats"]))
        out[name] = runs
    return out


def test_deferred_statistics_log_the_reference_values_and_host_reads_are_counted():
    results = run_workers(worker, 4, timeout_s=400)
    for rank, out in enumerate(results):
        drops = {}
        for name, runs in out.items():
            ref, new = runs[True], runs[False]
            where = f"rank {rank}, {name}"
            assert new["losses"] == ref["losses"], f"{where}: {new['losses']} != {ref['losses']}"
            assert ref["logged"] and new["logged"].keys() == ref["logged"].keys(), where
            bad = {k: (new["logged"][k], v) for k, v in ref["logged"].items() if new["logged"][k] != v}
            assert not bad, f"{where}: logged statistics differ from the reference (new, ref): {bad}"
            drops[name] = new["dropped"]
            forwards = LAYERS * ACCUM
            for r in new["reads"]:
                expect = 0 if name == "device_counts" else forwards
                assert r["moe"] == expect, f"{where}: {r['moe']} host reads in the MoE code, expected {expect}: {r}"
                assert r["rest"] == REST_READS, f"{where}: {r['rest']} host reads outside MoE code and optimizer: {r}"
            # The logged step adds one all-reduce over TP (every layer's and micro-batch's statistics) and one
            # over DP (the step's kept and routed counts; an unlogged step without a routing bias has none).
            unlogged, logged = new["all_reduces"]
            assert logged == {"tp": unlogged["tp"] + 1, "dp": unlogged["dp"] + 1}, f"{where}: {new['all_reduces']}"
        assert drops["dropless"] == 0  # both regimes ran (rank 0 holds the replica's counts)
    assert max(r["device_counts"][False]["dropped"] for r in results) > 0
