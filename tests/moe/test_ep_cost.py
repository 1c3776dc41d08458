"""model.moe.ep_dispatch: the cost model of moe/ep_cost.py on layouts (no processes), and its config checks.

The model's byte terms are the formulas the multi-process tests measure (two_level.internode_formula;
the flat path's remote rows); `auto` picks the two-level path exactly when it is cheaper, which happens
where bytes dominate (slow NICs, many sub-tokens, more nodes) and never inside one node."""
from __future__ import annotations

import math

import pytest

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.moe import ep_cost, two_level
from megatron_mhmoe.moe.ep_cost import Link, choose, flat_cost, two_level_cost
from megatron_mhmoe.moe.two_level import NodeLayout

CLUSTER = Link(400.0, 3600.0, 30.0)  # the defaults: one 400 Gbit/s NIC per GPU, NVLink


def test_packet_share_is_the_complement_of_missing_a_node():
    assert ep_cost.packet_share(32, 2, 2) == pytest.approx(1 - math.comb(16, 2) / math.comb(32, 2))
    assert ep_cost.packet_share(8, 1, 4) == pytest.approx(0.25)
    assert ep_cost.packet_share(8, 8, 2) == 1.0  # every node gets a choice


def test_byte_terms_equal_the_measured_formulas():
    lay, S, k, E, d_sub = NodeLayout(4, 2), 4096, 2, 32, 128
    two = two_level_cost(S, k, E, d_sub, 4, lay, 1, CLUSTER)
    packets = S * (lay.num_nodes - 1) * ep_cost.packet_share(E, k, lay.num_nodes)
    counts = 1 * (4 - 2) * (2 + 4) * 8  # the formula's traffic vectors, left out of the model
    assert two.nic_bytes == pytest.approx(two_level.internode_formula(packets, packets, d_sub, k, 4, 1, 4, 2) - counts)
    assert two.exchanges == 1 + 8 and two_level_cost(S, k, E, d_sub, 4, lay, 3, CLUSTER).exchanges == 25
    flat = flat_cost(S, k, E, d_sub, 4, lay, CLUSTER)
    assert flat.exchanges == 5 and flat.nic_bytes == 4 * S * k / 2 * d_sub * 4


def test_choose_on_layouts():
    args = dict(E=256, d_sub=128, itemsize=2, chunks=1, link=CLUSTER)
    plan = NodeLayout(32, 8)  # E=256 over 4 nodes of 8 GPUs
    assert choose("auto", 8192, 8, layout=None, **args) == "flat"  # one node (or unknown): always flat
    assert choose("two_level", 8192, 8, layout=None, **args) == "flat"
    assert choose("flat", 8192, 8, layout=plan, **args) == "flat"
    assert choose("two_level", 4, 2, layout=plan, **args) == "two_level"
    # k=8 (DeepSeek-V3's): 2.7 packets per sub-token cross instead of 6 rows: two-level once bytes dominate.
    assert choose("auto", 8192, 8, layout=plan, **args) == "two_level"
    assert choose("auto", 64, 8, layout=plan, **args) == "flat"  # 9 exchanges' latency dominates
    assert [choose("auto", S, 8, layout=plan, **args) for S in (2048, 4096)] == ["flat", "two_level"]  # docs/cross-node.md
    # k=2: 1.31 packets instead of 1.5 rows save 11% of the NIC bytes, about what the fan-out costs on
    # NVLink: flat up to 64k sub-tokens per rank.
    assert all(choose("auto", 2 ** i, 2, layout=plan, **args) == "flat" for i in range(4, 17))
    # One crossover in S: flat below, two-level above.
    picks = [choose("auto", 2 ** i, 8, layout=plan, **args) for i in range(4, 20)]
    assert picks == sorted(picks) and picks[0] == "flat" and picks[-1] == "two_level", picks
    # Slower NICs move the crossover down; more chunks (more exchanges) move it up.
    first = {}
    for name, link, chunks in (("cluster", CLUSTER, 1), ("slow", Link(100.0, 3600.0, 30.0), 1),
                               ("chunks4", CLUSTER, 4)):
        a = dict(args, link=link, chunks=chunks)
        first[name] = next(2 ** i for i in range(4, 24) if choose("auto", 2 ** i, 8, layout=plan, **a) == "two_level")
    assert first["slow"] < first["cluster"] < first["chunks4"], first


def test_simulated_two_node_benchmark_layout():
    """benchmarks/moe_two_node.py's shape (2 x 2 ranks, E=32, k=2, h=4 of d=512, 1024 tokens per rank, fp32,
    2 chunks) priced with the simulator's links over the exchange costs its runs measured (0.7-3.4 ms):
    two-level on 100 Mbit/s NICs, flat unlimited; at 1 Gbit/s the 1.95 MB a NIC saves (15.6 ms, less the
    fan-out's node-link time) pay for the 12 extra exchanges only below 1.28 ms each."""
    lay, S, args = NodeLayout(4, 2), 4096, dict(k=2, E=32, d_sub=128, itemsize=4, chunks=2)
    for alpha in (700.0, 1000.0, 2000.0, 3400.0):
        assert choose("auto", S, layout=lay, link=Link(0.1, 100.0, alpha), **args) == "two_level"
        assert choose("auto", S, layout=lay, link=Link(100.0, 100.0, alpha), **args) == "flat"
    assert choose("auto", S, layout=lay, link=Link(1.0, 100.0, 1200.0), **args) == "two_level"
    assert choose("auto", S, layout=lay, link=Link(1.0, 100.0, 1400.0), **args) == "flat"


@pytest.mark.parametrize("bad,match", [(dict(ep_dispatch="rails"), "ep_dispatch"),
                                       (dict(ep_nic_gbps=0.0), "ep_nic_gbps"),
                                       (dict(ep_node_gbps=-1.0), "ep_node_gbps"),
                                       (dict(ep_exchange_us=-1.0), "ep_exchange_us")])
def test_config_checks(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(hidden_size=32, num_attention_heads=4, moe=MoEConfig(**bad)).validate()
