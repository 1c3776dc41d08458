"""Short form of benchmarks/soak.py (the full 2000-step run is a manual benchmark): a 200-step 2-rank EP=2 CPU
run whose per-rank RSS after warm-up stays flat (growth within 10 %, twice the benchmark's 5 % for noise)."""
from __future__ import annotations

import importlib.util
import os

from tests.runtime.test_train_launch import ROOT, byte_data  # noqa: F401


def test_soak_short(byte_data, tmp_path):
    spec = importlib.util.spec_from_file_location("soak", os.path.join(ROOT, "benchmarks", "soak.py"))
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    out = tmp_path / "soak.json"
    code = soak.main(["--steps", "200", "--warmup-steps", "50", "--interval", "0.25", "--log-interval", "10",
                      "--eval-interval", "100", "--save-interval", "100", "--max-growth", "0.10",
                      "--data-prefix", byte_data, "--run-dir", str(tmp_path / "run"), "--json", str(out)])
    import json
    res = json.loads(out.read_text())
    assert res["returncode"] == 0, res.get("error")
    assert sorted(res["ranks"]) == ["0", "1"] and res["samples"] >= 5
    for r, v in res["ranks"].items():
        assert 100 < v["rss_after_warmup_mb"] < 4000 and v["end_sample_step"] > v["warmup_sample_step"], v
    assert code == 0, res["ranks"]  # flat
