"""The dispatcher's phase timer: exact sums on the host clock (CPU), and on the device-event path (CUDA,
driven here by fake events) no synchronization until the times are read, each span counted once."""
from __future__ import annotations

import time
import types

import pytest
import torch

import megatron_mhmoe.moe.dispatcher as D
from megatron_mhmoe.moe.dispatcher import MoEDispatcher
from megatron_mhmoe.moe.routing import dispatch_record
from megatron_mhmoe.parallel.context import ParallelContext
from tests.distributed import run_workers

E, S, K, DSUB = 4, 10, 2, 8


def run_experts(rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """A plain function (no forward_combine): the dispatcher takes its general gather/experts/combine path."""
    return rows * 2.0


def dispatch(d: MoEDispatcher, x, experts, gates, keep, run_experts):
    """The dispatcher's one entry point, from bare routing tensors."""
    return d.dispatch(x, dispatch_record(experts, gates, keep), run_experts)


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, DSUB, generator=g)
    experts = torch.randint(0, E, (S, K), generator=g)
    gates = torch.rand(S, K, generator=g)
    return x, experts, gates


class TickClock:
    """perf_counter that advances by one second per call: each closed phase lasts exactly 1 s."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now


def test_host_clock_sums_each_phase_exactly(monkeypatch):
    monkeypatch.setattr(D, "time", TickClock())
    d = MoEDispatcher(ParallelContext.single_process(), E)
    dispatch(d, *inputs(), None, run_experts)
    assert d.profile.times == {"permute": 1.0, "experts": 1.0, "combine": 1.0}
    assert d.profile.seconds("permute") == 1.0 and d.profile.seconds("all_to_all") == 0.0
    dispatch(d, *inputs(1), None, run_experts)
    # profile is the last forward only; take_times() sums every forward since the previous take.
    assert d.profile.times == {"permute": 1.0, "experts": 1.0, "combine": 1.0}
    assert d.take_times() == {"permute": 2.0, "experts": 2.0, "combine": 2.0}
    assert d.take_times() == {}


def test_real_clock_phases_fit_inside_the_call():
    d = MoEDispatcher(ParallelContext.single_process(), E)
    t0 = time.perf_counter()
    y = dispatch(d, *inputs(), None, run_experts)
    wall = time.perf_counter() - t0
    times = d.profile.times
    assert set(times) == {"permute", "experts", "combine"}
    assert all(v >= 0.0 for v in times.values())
    assert sum(times.values()) <= wall  # consecutive phases inside one call
    assert y.shape == (S, DSUB)


def test_profiling_off_records_nothing(monkeypatch):
    d = MoEDispatcher(ParallelContext.single_process(), E)
    d.profile_enabled = False
    monkeypatch.setattr(D, "_record_event", lambda device: pytest.fail("no event may be recorded when off"))
    dispatch(d, *inputs(), None, run_experts)
    assert d.profile.times == {} and d.take_times() == {}


class FakeGPU:
    """Events on a fake device clock (2 ms per recorded event) that complete only when the 'GPU' runs.

    Mirrors torch.cuda.Event on one stream: elapsed_time raises on an event not yet complete, synchronize
    waits for it and for the work queued before it (here: completes them and counts the wait)."""

    def __init__(self):
        self.clock_ms = 0.0
        self.events: list = []
        self.syncs = 0

    def record(self, device):
        self.clock_ms += 2.0
        ev = types.SimpleNamespace(t=self.clock_ms, done=False)
        gpu = self

        def synchronize():  # one stream: everything recorded before it is done too
            gpu.syncs += 1
            for e in gpu.events:
                e.done = e.done or e.t <= ev.t

        def elapsed_time(other):
            if not (ev.done and other.done):
                raise RuntimeError("Both events must be completed before calculating elapsed time.")
            return other.t - ev.t

        ev.synchronize, ev.elapsed_time, ev.query = synchronize, elapsed_time, (lambda: ev.done)
        self.events.append(ev)
        return ev

    def run_all(self):
        for ev in self.events:
            ev.done = True


@pytest.fixture
def fake_gpu(monkeypatch):
    gpu = FakeGPU()
    monkeypatch.setattr(D, "_device_clock", lambda device: True)
    monkeypatch.setattr(D, "_record_event", gpu.record)
    return gpu


def test_device_events_wait_only_when_read(fake_gpu):
    d = MoEDispatcher(ParallelContext.single_process(), E)
    dispatch(d, *inputs(), None, run_experts)
    assert fake_gpu.syncs == 0, "the forward must not synchronize"
    assert len(fake_gpu.events) == 4  # one start mark + one end per phase (each end starts the next)
    times = d.profile.times  # the read waits on the end events
    assert times == pytest.approx({"permute": 0.002, "experts": 0.002, "combine": 0.002})
    assert fake_gpu.syncs == 3
    # A second read reuses the resolved values: no new waits, nothing counted twice.
    assert d.profile.times == pytest.approx({"permute": 0.002, "experts": 0.002, "combine": 0.002})
    assert fake_gpu.syncs == 3


def test_take_times_drains_finished_spans_without_waiting(fake_gpu):
    d = MoEDispatcher(ParallelContext.single_process(), E)
    dispatch(d, *inputs(), None, run_experts)
    fake_gpu.run_all()  # the first forward's kernels finish while the host queues the second
    dispatch(d, *inputs(1), None, run_experts)
    assert fake_gpu.syncs == 0
    assert len(d._since_take._pending) == 3, "finished spans are folded in at the next forward, unwaited"
    times = d.take_times()
    assert times == pytest.approx({"permute": 0.004, "experts": 0.004, "combine": 0.004})
    assert fake_gpu.syncs == 3  # only the second forward's end events were waited on
    assert d.take_times() == {}


def _ep_worker(rank: int, world: int) -> dict:
    D.time = TickClock()
    d = MoEDispatcher(ParallelContext.from_world(1, world), E)
    x, experts, gates = inputs(rank)
    dispatch(d, x, experts, gates, None, run_experts)
    return dict(profile=dict(d.profile.times), taken=d.take_times())


def test_expert_parallel_phases_on_gloo():
    for r in run_workers(_ep_worker, 2, timeout_s=120):
        # Three permutes (filter and count, gathers, regroup: nothing to regroup from one peer), counts exchange,
        # both all-to-alls (started, then waited on: 2 each); experts and combine twice (the home rows during
        # each exchange, then the others).
        expected = {"permute": 3.0, "counts_exchange": 1.0, "all_to_all": 4.0, "experts": 2.0, "combine": 2.0}
        assert r["profile"] == expected
        assert r["taken"] == expected
