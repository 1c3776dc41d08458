"""Measured choice between the flat and the two-level expert-parallel paths (model.moe.ep_tune_forwards).

The cost model (moe/ep_cost.py) prices the network only. Where the host or the kernels around the
exchanges matter as much (a CPU cluster, small batches, a NIC slower or faster than configured) it can
pick the slower path: on the two-node simulator with one NIC per node at 1 Gbit/s it picked two-level,
measured 1.13x flat. So 'auto' takes the model's pick as a prior and then measures:

1. For each forward shape (sub-tokens, k, d_sub, dtype), the first 2 (n + 1) forwards that build a graph
   alternate prior, other, prior, other, ... (n = ep_tune_forwards); the first of each path is a warm-up
   (a process group's first use sets up its connections).
2. Each measured forward is timed with its backward: the clock starts when the dispatch starts and stops
   when it returns, and again from the moment the output's gradient arrives to the moment the input's
   gradient leaves (two identity autograd functions). The device is synchronised at each of these four
   points, during the trial only.
3. At the next forward of that shape every rank all-reduces (MAX) its per-path minima over the EP group
   (the least disturbed sample: other work on the host or the network only ever adds time): the slowest
   rank decides, and every rank takes the same path from then on (their collectives must
   match). If some backward did not run (forwards without a backward, e.g. activation checkpointing's
   first pass), forward times alone decide, on every rank alike.

Forwards under torch.no_grad (evaluation) take the prior and do not count. Both paths give the same
outputs and gradients within fp32 rounding (tests/moe/test_two_level.py), so the trial changes nothing
but the time of its first few steps.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from megatron_mhmoe.parallel import comm

PATHS = ("flat", "two_level")
"""The default pair; a dispatcher whose node-aware path is another (head-affine) passes its own."""


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU), whatever the device type."""
    if device.type != "cpu":
        getattr(torch, device.type).synchronize()


@dataclass
class Trial:
    """Timings of one forward shape while both paths are tried."""

    prior: str
    paths: tuple = PATHS
    """(flat, the node-aware path)."""
    calls: int = 0
    current: tuple = (-1, "")
    """(index, path) of the forward picked last."""
    device: torch.device = torch.device("cpu")
    """Where the sub-tokens are: the decision's all-reduce runs there (NCCL takes no host tensors)."""
    forward: dict = field(default_factory=dict)
    """Seconds of each measured forward, per path."""
    backward: dict = field(default_factory=dict)
    """Seconds of the backward of those forwards, per path, appended as they run."""

    def __post_init__(self):
        self.forward = {p: [] for p in self.paths}
        self.backward = {p: [] for p in self.paths}


class _Clock(torch.autograd.Function):
    """Identity; its backward calls `on_backward()` (starts or stops the backward clock)."""

    @staticmethod
    def forward(ctx, x, on_backward):
        ctx.on_backward = on_backward
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.on_backward(g.device)
        return g, None


class PathTuner:
    """Owns the trial state of one dispatcher: which path each forward takes while 'auto' measures."""

    def __init__(self, forwards: int, group=None, clock=time.perf_counter):
        self.clock = clock
        """Seconds (time.perf_counter; tests pass a fake)."""
        self.forwards = forwards
        """Measured forwards per path (after one warm-up each); 0 = the cost model alone decides."""
        self.group = group
        """The EP group the decision is all-reduced over (None: one process)."""
        self._trials: dict = {}  # shape key -> Trial, until decided
        self.decided: dict = {}
        """shape key -> {'picked', 'flat_ms', 'two_level_ms', 'with_backward'} once measured."""

    def pick(self, key, prior: str, paths: tuple = PATHS) -> str:
        """The path of this forward among `paths` (call once per forward, in the same order on every rank)."""
        if key in self.decided:
            return self.decided[key]["picked"]
        if self.forwards <= 0 or not torch.is_grad_enabled():
            return prior
        trial = self._trials.setdefault(key, Trial(prior, tuple(paths)))
        if trial.calls < 2 * (self.forwards + 1):
            order = (prior, paths[1 - paths.index(prior)])
            trial.current = (trial.calls, order[trial.calls % 2])
            trial.calls += 1
            return trial.current[1]
        return self._decide(key, trial)

    def timed(self, key, run, x_sub: torch.Tensor) -> torch.Tensor:
        """run(x_sub) -> y, timed forward and backward when the forward just picked is a measured one."""
        trial = self._trials.get(key)
        if trial is None or not torch.is_grad_enabled():
            return run(x_sub)
        n, path = trial.current
        trial.current, trial.device = (-1, ""), x_sub.device
        if n < 2:  # the warm-up of each path (or no pick for this forward)
            return run(x_sub)
        dev = x_sub.device
        bwd = {}

        def start(device):
            _sync(device)
            bwd["t"] = self.clock()

        def stop(device):
            _sync(device)
            if "t" in bwd:
                trial.backward[path].append(self.clock() - bwd["t"])

        _sync(dev)
        t = self.clock()
        x_in = _Clock.apply(x_sub, stop) if x_sub.requires_grad else x_sub
        y = run(x_in)
        _sync(dev)
        trial.forward[path].append(self.clock() - t)
        return _Clock.apply(y, start) if y.requires_grad else y

    def _decide(self, key, trial: Trial) -> str:
        # 3. One all-reduce: per path the fastest forward and forward + backward, and whether every
        # measured forward had its backward (as -1/0 under MAX, i.e. the minimum over ranks).
        paths = trial.paths
        fwd = [min(trial.forward[p]) for p in paths]
        full = [min(f + b for f, b in zip(trial.forward[p], trial.backward[p]))
                if len(trial.backward[p]) == len(trial.forward[p]) else 0.0 for p in paths]
        complete = all(len(trial.backward[p]) == len(trial.forward[p]) for p in paths)
        vec = torch.tensor(fwd + full + [-float(complete)], dtype=torch.float64, device=trial.device)
        if self.group is not None:
            vec = comm.all_reduce_(vec, self.group, op="max")
        vec = vec.cpu()  # the one host read of the trial
        with_backward = bool(vec[4] < -0.5)
        times = vec[2:4] if with_backward else vec[0:2]
        picked = paths[1] if times[1] < times[0] else paths[0]
        self.decided[key] = {"picked": picked, f"{paths[0]}_ms": float(times[0]) * 1e3,
                             f"{paths[1]}_ms": float(times[1]) * 1e3, "with_backward": with_backward}
        del self._trials[key]
        return picked
