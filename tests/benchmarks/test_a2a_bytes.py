"""Benchmarks that must stay honest, checked without timing anything.

1. The bytes each rank hands to the expert-parallel all-to-alls in one fwd+bwd step equal the formula
   exactly (benchmarks/a2a_meter.py wraps dist.all_to_all_single), on 2 and 4 gloo processes:
   dispatch = sent rows*(d/h)*itemsize, where the sent rows are the kept assignments (S*k dropless) less
   those for the rank's own experts (which stay home: as many as its routing put on them), counts = E*8,
   step = 2*dispatch + 2*received*(d/h)*itemsize + counts, and the ranks receive what they send.
2. `benchmarks/moe_layer.py --quick` runs and prints every ratio (ours/floor, ours/DeepSpeed, memory).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.moe.layer import MHMoELayer
from megatron_mhmoe.parallel.context import ParallelContext
from tests.distributed import run_workers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from a2a_meter import A2AMeter, formula_bytes  # noqa: E402

D, E, TOKENS = 32, 8, 12
# (h, k, capacity factor, dtype)
CASES = [(1, 2, 0.0, torch.float32), (4, 2, 0.0, torch.float32), (4, 1, 0.0, torch.bfloat16),
         (2, 2, 1.0, torch.float32)]


def worker(rank: int, world: int) -> list[dict]:
    ctx = ParallelContext.from_world(1, world)
    out = []
    for h, k, cf, dtype in CASES:
        cfg = ModelConfig(hidden_size=D, num_attention_heads=4, moe=MoEConfig(
            num_experts=E, top_k=k, num_heads=h, head_projection=h > 1, expert_hidden_size=16,
            capacity_factor=cf, gate="softmax"))
        layer = MHMoELayer(cfg, ctx).to(dtype)
        torch.manual_seed(rank)
        x = torch.randn(TOKENS, D, dtype=dtype, requires_grad=True)
        layer.dispatcher.profile_enabled = True
        with A2AMeter() as meter:
            y, st = layer(x)
            (y.float().square().sum() + st.aux_loss).backward()
        prof = layer.dispatcher.profile
        S = TOKENS * h
        f = formula_bytes(S, k, D // h, x.element_size(), E, prof.rows_received, prof.rows_sent)
        floats = [c for c in meter.per_call if c["floating"]]
        E_local = E // world
        mine = int(st.kept[rank * E_local:(rank + 1) * E_local].sum())  # kept assignments to this rank's experts
        out.append(dict(case=(h, k, cf, str(dtype)), S=S, rows_sent=prof.rows_sent, rows_received=prof.rows_received,
                        rows_home=prof.rows_home, mine=mine, kept=int(st.kept.sum()),
                        dropped=st.dropped, formula=f, total=meter.bytes_total,
                        dispatch=floats[0]["bytes"], counts=sum(c["bytes"] for c in meter.per_call if not c["floating"]),
                        profile_bytes=prof.bytes_sent))
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_all_to_all_bytes_equal_formula(world):
    per_rank = run_workers(worker, world, timeout_s=180)
    for i, (h, k, cf, _) in enumerate(CASES):
        results = [r[i] for r in per_rank]
        for rank, r in enumerate(results):
            where = f"case {r['case']} rank {rank}"
            f = r["formula"]
            # Rows for the rank's own experts stay home; every other kept assignment is sent (dropless: all S*k).
            assert r["rows_home"] == r["mine"], where
            assert r["rows_sent"] + r["rows_home"] == (r["S"] * k if cf <= 0 else r["kept"]), where
            row = (D // h) * torch.empty((), dtype=CASES[i][3]).element_size()
            assert r["dispatch"] == r["rows_sent"] * row, where
            assert r["dispatch"] == f["dispatch"], where
            assert r["counts"] == f["counts"] == E * 8, where
            assert r["total"] == f["total"], f"{where}: measured {r['total']} != formula {f['total']}"
            assert r["profile_bytes"] == f["dispatch"] + f["counts"], where
        # What the ranks send, the ranks receive.
        assert sum(r["rows_sent"] for r in results) == sum(r["rows_received"] for r in results)
    assert any(r[-1]["dropped"] > 0 for r in per_rank), "the capacity case should drop something"


def test_moe_layer_quick_prints_all_ratios():
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "moe_layer.py"), "--quick"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    points = [json.loads(line[5:]) for line in proc.stdout.splitlines() if line.startswith("JSON ")]
    assert {p["shape"] for p in points} == {"smoe", "mhmoe"}
    for p in points:
        for key in ("ours/floor", "ours/deepspeed", "mem ours/deepspeed"):
            assert p["ratios"][key] is not None and p["ratios"][key] > 0, (key, p["ratios"])
        assert p["max_abs_diff_vs_deepspeed"] < 1e-4, "DeepSpeed must route exactly like ours"
    header = next(line for line in proc.stdout.splitlines() if "ours/floor" in line and not line.startswith("JSON"))
    assert "ours/ds" in header and "mem ours/ds" in header
