"""benchmarks/collective_latency.py runs end to end on 2 gloo processes (a few calls) and reports every
payload and mode, with the step estimate its docs quote."""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import collective_latency  # noqa: E402


def test_reports_both_payloads_both_modes_and_the_step_estimate(capsys):
    collective_latency.main(["--calls", "3", "--step_ms", "100"])
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert set(report["results"]) == {f"{p} | {m}" for p in collective_latency.PAYLOADS
                                      for m in ("back to back", "between compute")}
    for r in report["results"].values():
        assert len(r["mean_per_rank"]) == 2 and r["last_rank"] > 0
        assert r["last_rank"] <= min(r["mean_per_rank"]) + 1e-9  # the per-call minimum over ranks
    assert 0 < report["step_floor_ms"] <= report["step_mean_ms"]
    assert "of a 100 ms step" in out
