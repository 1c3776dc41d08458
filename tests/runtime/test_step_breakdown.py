"""The step breakdown (runtime/step_breakdown.py, step_spans.py, benchmarks/train_throughput.py --breakdown).

- Aggregation rules on a hand-made trace with known times: ranges, the dispatcher's phase markers and the
  gaps between its ops, backward nodes mapped to their forward op's category by sequence number, the
  backward's own bookkeeping, the step's Python outside every range; the categories add up to the step.
- A tiny real run (one process, a 2-layer MH-MoE GPT, SGD): every MoE category gets forward time, the
  differentiable ones backward time too (mapped through autograd's sequence numbers), and the categories
  add up to the profiled step time.
- Outside profile mode the ranges cost nothing: span() is one shared null context.
"""
from __future__ import annotations

import pytest
import torch

from megatron_mhmoe import step_spans
from megatron_mhmoe.runtime.step_breakdown import Ev, aggregate, format_table, from_profiler


def trace() -> list[Ev]:
    """One step of 100 us (module docstring of step_breakdown for the rules)."""
    E = Ev
    return [
        E("mhmoe/step", 0, 100, 5),
        E("mhmoe/moe/router", 0, 20, 10, parent=0),
        E("aten::linear", 2, 12, 10, seq=7, parent=1),
        E("mhmoe/moe/dispatcher", 20, 60, 12, parent=0),
        E("aten::index_select", 22, 30, 8, parent=3),
        E("mhmoe/phase_end/permute", 30, 30, 0, parent=3),
        E("_AllToAllV", 35, 45, 10, seq=8, parent=3),
        E("mhmoe/phase_end/all_to_all", 45, 45, 0, parent=3),
        E("aten::mm", 46, 56, 10, parent=3),
        E("mhmoe/phase_end/experts", 56, 56, 0, parent=3),
        E("mhmoe/backward", 60, 95, 13, parent=0),
        E("autograd::engine::evaluate_function: MmBackward0", 61, 71, 2, seq=7, parent=10),
        E("aten::mm", 62, 70, 8, parent=11),
        E("autograd::engine::evaluate_function: _AllToAllVBackward", 72, 80, 8, seq=8, parent=10),
        E("autograd::engine::evaluate_function: torch::autograd::AccumulateGrad", 81, 85, 4, parent=10),
        E("aten::add", 200, 210, 10),  # outside every step: not counted
    ]


def test_aggregation_rules_on_a_known_trace():
    r = aggregate(trace(), steps=1)
    assert r.pop("total") == 100
    assert r == {"moe/router": [20, 10],  # its range's own time and the linear; the linear's backward node
                 "moe/permute": [10, 0],  # index_select and the 2 us gap before it
                 "moe/dispatch": [19, 8],  # all-to-all, the 5 us gap before it, the dispatcher's 4 us tail
                 "moe/experts": [11, 0],  # mm and the 1 us gap before it
                 "backward": [17, 0],  # the backward call's own time and AccumulateGrad (no forward op)
                 "rest": [5, 0]}  # the step's Python outside every range
    assert sum(f + b for f, b in r.values()) == 100
    halved = aggregate(trace(), steps=2)
    assert halved["total"] == 50 and halved["moe/router"] == [10, 5]


def _tiny_run(steps: int) -> dict:
    from megatron_mhmoe.config import ModelConfig, MoEConfig
    from megatron_mhmoe.model.gpt import GPTModel
    from megatron_mhmoe.parallel.context import ParallelContext
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                      max_seq_len=16, moe=MoEConfig(num_experts=4, top_k=2, num_heads=2, expert_hidden_size=16,
                                                    moe_every=1))
    model = GPTModel(cfg, ParallelContext.single_process())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tokens = torch.randint(0, 64, (2, 17))
    step_spans.enable(True)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                with step_spans.span("step"):
                    out = model(tokens[:, :-1], labels=tokens[:, 1:])
                    with step_spans.span("backward"):
                        out.loss.backward()
                    with step_spans.span("optimizer"):
                        opt.step()
                        opt.zero_grad()
    finally:
        step_spans.enable(False)
    return aggregate(from_profiler(prof.events()), steps)


@pytest.mark.slow  # the profiler's first start takes seconds
def test_tiny_run_attributes_forward_and_backward_of_every_moe_part():
    r = _tiny_run(steps=1)
    for cat in ("moe/projection", "moe/router", "moe/permute", "moe/dispatch", "moe/experts", "moe/combine",
                "moe/statistics", "moe/losses", "attention", "embed_output", "optimizer", "backward"):
        assert r.get(cat, [0, 0])[0] > 0, (cat, r)
    for cat in ("moe/projection", "moe/router", "moe/experts", "moe/combine", "attention", "embed_output"):
        assert r[cat][1] > 0, (cat, r)  # their backward nodes found through the sequence numbers
    parts = sum(f + b for k, (f, b) in ((k, v) for k, v in r.items() if k != "total"))
    assert parts == pytest.approx(r["total"], rel=1e-6)
    table = format_table({"mhmoe": r})
    assert "moe/experts" in table and table.splitlines()[-1].startswith("total")


def test_spans_are_free_outside_profile_mode():
    assert not step_spans.enabled()
    assert step_spans.span("moe/router") is step_spans.span("attention")
