"""Where a training step's time goes, from a torch.profiler trace of the step_spans ranges.

Every op's self time (time in it, not in the ops it calls) goes to exactly one category, so the categories
add up to the step's wall time:
1. Forward: the innermost 'mhmoe/<category>' range (megatron_mhmoe/step_spans.py) around the op.
2. Inside the dispatcher's range 'mhmoe/moe/dispatcher' the paths time phases with mark/close; a direct
   child op takes the phase of the next 'mhmoe/phase_end/<phase>' marker after it (one thread, in order),
   and the dispatcher's own time between children goes to the phase of the child that follows.
3. Backward: autograd runs node X under 'autograd::engine::evaluate_function: X', which carries the
   sequence number of the forward op that made X: the node's time goes to that op's forward category,
   counted as backward. Nodes whose forward op lies outside every range (AccumulateGrad, leaf copies)
   go to the innermost range around the backward call ('backward').
4. Anything else inside a 'mhmoe/step' range goes to its innermost range; the step range's own time
   (Python outside every range) is 'rest'. Events outside every step range are not counted.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from megatron_mhmoe.step_spans import PHASE_END, PREFIX

STEP = PREFIX + "step"
DISPATCHER = PREFIX + "moe/dispatcher"
BACKWARD_NODE = "autograd::engine::evaluate_function: "
PHASES = {"permute": "moe/permute", "counts_exchange": "moe/dispatch", "all_to_all": "moe/dispatch",
          "experts": "moe/experts", "combine": "moe/combine"}
"""Dispatcher phase -> category (any other phase, e.g. the two-level path's, is 'moe/dispatch')."""
ORDER = ("embed_output", "attention", "ffn", "moe/projection", "moe/router", "moe/permute", "moe/dispatch",
         "moe/experts", "moe/combine", "moe/statistics", "moe/losses", "backward", "optimizer", "step_reduce",
         "rest")
"""Categories in print order (an unknown range prints after them)."""


@dataclass
class Ev:
    """One profiler event: times in microseconds, parent the index of the enclosing event or -1."""
    name: str
    start: float
    end: float
    self_us: float
    seq: int = -1
    parent: int = -1


def from_profiler(events) -> list[Ev]:
    """torch.profiler's FunctionEvents (prof.events()) -> Ev list with parent indices, in start order."""
    events = sorted(events, key=lambda e: e.time_range.start)
    index = {id(e): i for i, e in enumerate(events)}
    return [Ev(e.name, e.time_range.start, e.time_range.end, e.self_cpu_time_total, getattr(e, "sequence_nr", -1),
               index.get(id(e.cpu_parent), -1) if e.cpu_parent is not None else -1) for e in events]


def _range_category(name: str) -> Optional[str]:
    if name == STEP:
        return "rest"
    if name.startswith(PREFIX) and not name.startswith(PHASE_END):
        return name[len(PREFIX):]
    return None


def _dispatcher_phases(evs: Sequence[Ev], children: list) -> tuple[dict, dict]:
    """2. Direct children of a dispatcher range: the phase of the next marker; gaps go to the next child.
    Returns ({child index: phase}, {child index: us between it and the previous child})."""
    phase_of: dict[int, str] = {}
    gap_us: dict[int, float] = {}
    for i, e in enumerate(evs):
        if e.name != DISPATCHER:
            continue
        pending, prev_end = [], e.start
        for c in children[i]:
            gap_us[c] = max(0.0, evs[c].start - prev_end)
            prev_end = max(prev_end, evs[c].end)
            if evs[c].name.startswith(PHASE_END):
                phase = PHASES.get(evs[c].name[len(PHASE_END):], "moe/dispatch")
                for p in pending + [c]:
                    phase_of[p] = phase
                pending = []
            else:
                pending.append(c)
        for p in pending:
            phase_of[p] = "moe/dispatch"
    return phase_of, gap_us


def aggregate(evs: Sequence[Ev], steps: int) -> dict:
    """{category: [forward us, backward us]} per step, and {'total': us per step}, from events in start order.

    Step-level ranges ('backward', 'optimizer', ...) count as forward: they are outside the model's forward."""
    children: list[list[int]] = [[] for _ in evs]
    for i, e in enumerate(evs):
        if e.parent >= 0:
            children[e.parent].append(i)
    phase_of, gap_us = _dispatcher_phases(evs, children)
    # Forward op sequence numbers -> their category (1.), for 3.
    fwd_cat: dict[int, str] = {}
    resolved: dict[int, tuple[Optional[str], bool, bool]] = {}  # index -> (category, backward?, in a step)

    def resolve(i: int) -> tuple[Optional[str], bool, bool]:
        chain = []
        cat, bwd, in_step = None, False, False
        j = i
        while j >= 0:
            if j in resolved:
                pc, pb, ps = resolved[j]
                cat, bwd, in_step = (cat, bwd, ps) if cat is not None else (pc, pb, ps)
                break
            chain.append(j)
            e = evs[j]
            if e.name == STEP:
                in_step = True
            if cat is None:
                if j in phase_of:
                    cat = phase_of[j]
                elif e.name.startswith(BACKWARD_NODE) and e.seq in fwd_cat:
                    cat, bwd = fwd_cat[e.seq], True
                else:
                    cat = _range_category(e.name)
            j = e.parent
        # Only the first event of the chain is cached with the full answer; its ancestors resolve themselves.
        resolved[i] = (cat, bwd, in_step)
        return resolved[i]

    out: dict[str, list[float]] = {}
    total = 0.0
    for i, e in enumerate(evs):
        cat, bwd, in_step = resolve(i)
        if not in_step:
            continue
        if e.name == STEP:
            total += e.end - e.start
        if cat is not None and not bwd and e.seq >= 0 and not e.name.startswith(BACKWARD_NODE):
            fwd_cat.setdefault(e.seq, cat)
        own = e.self_us
        if e.name == DISPATCHER:  # its time after the last child (the gaps before children are counted below)
            own, cat = max(0.0, e.self_us - sum(gap_us.get(c, 0.0) for c in children[i])), "moe/dispatch"
        for c in children[i]:
            if c in gap_us:
                pc = phase_of.get(c, "moe/dispatch")
                out.setdefault(pc, [0.0, 0.0])[0] += gap_us[c]
        if cat is None:
            cat = "rest"
        out.setdefault(cat, [0.0, 0.0])[1 if bwd else 0] += own
    per = max(steps, 1)
    res = {k: [v[0] / per, v[1] / per] for k, v in out.items()}
    res["total"] = total / per
    return res


def profile_steps(trainer, batches, steps: int, warmup: int = 3, log: bool = False) -> dict:
    """aggregate() of `steps` train steps of a built Trainer, after `warmup` unprofiled ones. log=False
    profiles the steps the loop does not log (all but one in log_interval); log=True the logged kind."""
    from torch.profiler import ProfilerActivity, profile

    from megatron_mhmoe import step_spans
    for _ in range(warmup):
        trainer.train_step(batches, log=log)
    step_spans.enable(True)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                with step_spans.span("step"):
                    trainer.train_step(batches, log=log)
    finally:
        step_spans.enable(False)
    return aggregate(from_profiler(prof.events()), steps)


def time_steps(trainer, batches, steps: int, log: bool = False) -> dict:
    """Unprofiled steps: wall and CPU seconds per step of this process. CPU time leaves out what the
    process spends waiting (for its peers in a collective, for a core on a loaded machine), so the ratio
    of two models' CPU times is the steadier measure of their work where the machine is shared."""
    import time
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        trainer.train_step(batches, log=log)
    return {"wall_s": (time.perf_counter() - wall) / max(steps, 1), "cpu_s": (time.process_time() - cpu) / max(steps, 1)}


def categories(results: Iterable[dict]) -> list[str]:
    seen = {k for r in results for k in r if k not in ("total", "timed")}
    return [c for c in ORDER if c in seen] + sorted(seen - set(ORDER))


def format_table(results: dict) -> str:
    """{model: aggregate()} -> a table of ms per step (forward + backward, and backward alone) per category,
    with 'mhmoe - dense' when both are there."""
    names = list(results)
    cats = categories(results.values())
    diff = "mhmoe" in results and "dense" in results
    head = f"{'category':16s}" + "".join(f" {n + ' ms':>11s} {'(bwd)':>8s}" for n in names)
    head += f" {'mhmoe-dense':>12s}" if diff else ""
    lines = [head]

    def ms(r: dict, c: str) -> tuple[float, float]:
        f, b = r.get(c, [0.0, 0.0])
        return (f + b) / 1e3, b / 1e3

    for c in cats + ["total"]:
        row = f"{c:16s}"
        for n in names:
            if c == "total":
                row += f" {results[n]['total'] / 1e3:11.2f} {'':>8s}"
            else:
                a, b = ms(results[n], c)
                row += f" {a:11.2f} {b:8.2f}"
        if diff:
            get = (lambda n: results[n]["total"] / 1e3) if c == "total" else (lambda n: ms(results[n], c)[0])
            row += f" {get('mhmoe') - get('dense'):+12.2f}"
        lines.append(row)
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    """torchrun ... -m megatron_mhmoe.runtime.step_breakdown --out F [--steps N --warmup W --log] --config C
    [--a.b=v ...]: build the main job's Trainer, profile N steps, time N more unprofiled (time_steps, under
'timed'); rank 0 writes aggregate() as JSON to F. train.train_steps must be at least W + 2 N."""
    import argparse
    import os

    from megatron_mhmoe.parallel import comm
    from megatron_mhmoe.runtime import engine
    from megatron_mhmoe.launch.cli import parse_args, resolve_config
    from megatron_mhmoe.runtime.trainer import Trainer

    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--log", action="store_true", help="profile logged steps (routing statistics on)")
    mine, rest = ap.parse_known_args(argv)
    args, overrides = parse_args(rest)
    cfg = resolve_config(args.config, overrides)
    cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
    engine.init_distributed(cfg.parallel.timeout_s)
    trainer = Trainer(cfg)
    trainer.build()
    batches = trainer._batches(trainer.train_ds, cfg.train.grad_accum_steps, 0)
    res = profile_steps(trainer, batches, mine.steps, mine.warmup, mine.log)
    res["timed"] = time_steps(trainer, batches, mine.steps, mine.log)
    if trainer.ctx.rank == 0:
        with open(mine.out, "w") as f:
            json.dump(res, f)
    comm.leave_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
