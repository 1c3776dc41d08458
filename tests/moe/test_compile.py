"""The MoE layer under torch.compile (model/compile.py, docs/compile.md).

- With model.moe.a2a_device_counts=true and a capacity, the whole layer (routing, capacity, slot dispatch,
  experts, combine, statistics, balance losses) traces as ONE graph with static shapes: torch.compile
  (fullgraph=True) raises on any graph break, and the backend asserts that no tensor in the graph has a
  value-dependent size (an unbacked symbol: torch.bincount, boolean-mask indexing, nonzero; torch 2.13 puts
  those in a fullgraph graph rather than breaking it, but on CUDA each is a host read and CUDA graphs refuse
  it). What CUDA graphs need.
  The compiled layer gives the eager layer's outputs, statistics, losses and gradients (fp32, atol 1e-6 /
  rtol 1e-5: the traced experts run batched GEMMs over the capacity slots, eager the grouped per-expert
  node, so only the summation order differs). EP=2 is checked in tests/runtime/test_compile_train.py.
- The dropless path reads counts back to the host, and fullgraph=True refuses it (so the check is real).
- fixed_bincount (the static-shape histogram that replaced torch.bincount) equals torch.bincount.
Backend aot_eager: Dynamo and AOTAutograd trace forward and backward exactly as for inductor, without the
C++ code generation (tens of seconds per graph on the 2-core CI machine).
"""
from __future__ import annotations

import pytest
import torch

from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.moe.fixed_counts import fixed_bincount, fixed_bincount_reference
from megatron_mhmoe.moe.layer import MHMoELayer
from megatron_mhmoe.parallel.context import ParallelContext

ATOL, RTOL = 1e-6, 1e-5
CASES = {  # one case keeps the compile time small; the gelu experts compile in test_compile_train.py
    "mhmoe_h2_swiglu_seq_aux_shared": dict(num_heads=2, head_projection=True, expert_activation="swiglu",
                                           seq_aux_loss_coef=0.01, num_shared_experts=1),
}

def layer_for(capacity_factor: float, a2a_device_counts: bool, **moe) -> MHMoELayer:
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_attention_heads=4, moe=MoEConfig(
        num_experts=4, top_k=2, expert_hidden_size=16, capacity_factor=capacity_factor,
        a2a_device_counts=a2a_device_counts, **moe))
    return MHMoELayer(cfg, ParallelContext.single_process())


def fwd_bwd(layer: MHMoELayer, call, x: torch.Tensor) -> dict:
    layer.zero_grad(set_to_none=True)
    y, st = call(x)
    (y.square().sum() + st.aux_loss + st.z_loss + st.seq_aux_loss).backward()
    out = {"y": y.detach(), "aux": st.aux_loss.detach(), "z": st.z_loss.detach(), "seq_aux": st.seq_aux_loss.detach(),
           "kept": st.kept, "divergence": st.divergence, "head_counts": st.head_counts,
           "balance": st.balance_counts, "fanout_ranks": st.fanout_ranks}
    out.update({"grad " + n: p.grad.clone() for n, p in layer.named_parameters()})
    return out


class StaticShapeBackend:
    """aot_eager that records, per graph it is given, the nodes whose sizes depend on tensor values."""

    def __init__(self):
        self.graphs: list[list[str]] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        from torch._dynamo.backends.debugging import aot_eager
        self.graphs.append([n.format_node() for n in gm.graph.nodes
                            if free_unbacked_symbols(n.meta.get("example_value"))])
        return aot_eager(gm, example_inputs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_device_counts_layer_compiles_fullgraph_and_matches_eager(case):
    torch._dynamo.reset()
    layer = layer_for(1.0, True, **CASES[case])
    x = torch.randn(8, 2, 32, generator=torch.Generator().manual_seed(1))
    eager = fwd_bwd(layer, layer, x)
    backend = StaticShapeBackend()
    compiled = torch.compile(layer, backend=backend, fullgraph=True, dynamic=False)
    got = fwd_bwd(layer, compiled, x)
    assert len(backend.graphs) == 1 and backend.graphs[0] == [], backend.graphs  # one graph, static shapes
    assert eager.keys() == got.keys()
    for name in eager:
        torch.testing.assert_close(got[name], eager[name], atol=ATOL, rtol=RTOL, msg=f"{case}: {name}")


def test_dropless_layer_is_refused_by_fullgraph():
    torch._dynamo.reset()
    layer = layer_for(0.0, False, num_heads=2, head_projection=True)  # dropless: counts sized on the host
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=False)
    with pytest.raises(Exception, match="(?i)graph break|data-dependent"):
        compiled(torch.randn(8, 2, 32))


def test_fixed_bincount_equals_bincount():
    g = torch.Generator().manual_seed(0)
    for size, n in ((1, 0), (5, 0), (7, 40), (64, 1000)):
        ids = torch.randint(0, size, (n,), generator=g)
        keep = torch.rand(n, generator=g) < 0.6
        assert torch.equal(fixed_bincount(ids, size), torch.bincount(ids, minlength=size))
        assert torch.equal(fixed_bincount(ids, size, keep), fixed_bincount_reference(ids, size, keep))
        assert torch.equal(fixed_bincount(ids, size, keep), torch.bincount(ids[keep], minlength=size))


def test_docs_page_states_the_tested_tolerances():
    import os

    from tests.runtime.test_compile_train import LOSS_RTOL, STEPS
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "docs", "compile.md")) as f:
        page = " ".join(f.read().split())
    def num(x: float) -> str:  # 1e-06 -> 1e-6, as the page writes it
        return f"{x:.0e}".replace("e-0", "e-")
    assert f"atol {num(ATOL)} / rtol {num(RTOL)}" in page
    assert f"{STEPS} training steps give the eager losses within a relative {num(LOSS_RTOL)} per step" in page
