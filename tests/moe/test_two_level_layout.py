"""The two-level path's rank arithmetic without processes: layout from the config or LOCAL_WORLD_SIZE, the
receive splits every rank derives from the traffic vectors (against a packet-by-packet walk of the rail
exchange and the fan-out, also for 3 and 4 nodes), the bit-packing of ids and the config checks."""
from __future__ import annotations

import random

import pytest
import torch

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.moe import two_level
from megatron_mhmoe.moe.two_level import NodeLayout, node_layout, pack_ids, ranks_per_node, unpack_ids


def test_layout_from_config_or_env():
    assert ranks_per_node(2, env={"LOCAL_WORLD_SIZE": "8"}) == 2  # the config wins
    assert ranks_per_node(0, env={"LOCAL_WORLD_SIZE": "8"}) == 8
    assert ranks_per_node(0, env={"LOCAL_SIZE": "4"}) == 4  # the deepspeed launcher's name
    assert ranks_per_node(0, env={}) == 0 and ranks_per_node(0, env={"LOCAL_WORLD_SIZE": "x"}) == 0
    assert node_layout(4, 2) == NodeLayout(4, 2) and node_layout(4, 2).num_nodes == 2
    assert node_layout(4, 4) is None and node_layout(2, 4) is None and node_layout(4, 0) is None
    with pytest.raises(ValueError, match="ep_ranks_per_node"):
        node_layout(6, 4)


def walk(layout: NodeLayout, packets: dict) -> list[list[list[int]]]:
    """Move every packet through steps 2-3 one by one: recv[step][me][sender] rows, sender as the
    exchange's group rank (step 2: the node of the rail peer; step 3: the local rank of the holder).

    packets[s] = list of (node b, {rank q on b: assignments}) of source s."""
    P = layout.ep_size
    recv = [[[0] * P for _ in range(P)] for _ in range(2)]
    for s, pks in packets.items():
        for b, assign in pks:
            h = b * layout.per_node + s % layout.per_node  # 2. over s's rail to node b
            assert layout.rail_peer(s, b) == h
            recv[0][h][layout.node(s)] += 1
            for q, n in assign.items():  # 3. the holder fans out inside node b
                recv[1][q][h % layout.per_node] += n
    return recv


@pytest.mark.parametrize("ep,per_node", [(4, 2), (6, 2), (8, 2), (8, 4), (4, 1)])
def test_receive_splits_equal_a_packet_walk(ep, per_node):
    layout = NodeLayout(ep, per_node)
    rng = random.Random(ep * 10 + per_node)
    packets = {}
    for s in range(ep):
        pks = []
        for _ in range(rng.randint(0, 12)):
            b = rng.randrange(layout.num_nodes)
            ranks = list(layout.ranks_of(b))
            pks.append((b, {q: rng.randint(1, 2) for q in rng.sample(ranks, rng.randint(1, len(ranks)))}))
        packets[s] = pks
    traffic = []
    for s in range(ep):
        u = [sum(1 for b, _ in packets[s] if b == n) for n in range(layout.num_nodes)]
        a = [sum(assign.get(q, 0) for _, assign in packets[s]) for q in range(ep)]
        traffic.append((u, a))
    walked = walk(layout, packets)
    for me in range(ep):
        r2, r3 = layout.receive_splits(traffic, me)
        assert r2 == walked[0][me][:layout.num_nodes] and sum(walked[0][me]) == sum(r2), me
        assert r3 == walked[1][me][:per_node] and sum(walked[1][me]) == sum(r3), me


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("id_type", [torch.int8, torch.int32])
def test_ids_bit_packed_into_row_columns(dtype, id_type):
    ids = torch.tensor([[-1, 5, 127], [3, -1, 0]], dtype=id_type)
    cols = pack_ids(ids, dtype)
    assert cols.dtype == dtype and cols.shape[1] == two_level.id_columns(3, ids.element_size(), cols.element_size())
    assert torch.equal(unpack_ids(torch.cat([torch.ones(2, 4, dtype=dtype), cols], 1)[:, 4:], 3, id_type), ids)


def test_config_checks():
    for bad in (dict(ep_ranks_per_node=-1), dict(ep_recv_budget=-1), dict(a2a_chunks=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ModelConfig(hidden_size=32, num_attention_heads=4, moe=MoEConfig(**bad)).validate()


def test_one_path_interface_without_import_cycle():
    """Flat, capacity-slot and two-level paths share one signature; the path modules never import the
    dispatcher (which imports them), so none can reach into its private state."""
    import inspect
    from megatron_mhmoe.moe import dispatcher, padded_dispatch
    sigs = {f.__module__: list(inspect.signature(f).parameters)
            for f in (dispatcher.flat_dispatch_combine, padded_dispatch.dispatch_combine, two_level.dispatch_combine)}
    assert len({tuple(v) for v in sigs.values()}) == 1, sigs
    # Every module the path modules import, transitively (static: the import statements of the package).
    import ast
    import importlib.util
    seen, todo = set(), ["megatron_mhmoe.moe.two_level", "megatron_mhmoe.moe.padded_dispatch"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse(open(importlib.util.find_spec(name).origin).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron_mhmoe"):
                todo += [f"{node.module}.{a.name}" if importlib.util.find_spec(f"{node.module}.{a.name}") else node.module
                         for a in node.names] if importlib.util.find_spec(node.module).submodule_search_locations \
                    else [node.module]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.startswith("megatron_mhmoe")]
    assert "megatron_mhmoe.moe.dispatcher" not in seen, "a path module imports the dispatcher"
    assert "megatron_mhmoe.moe.gate_combine" in seen  # the walk does follow the imports