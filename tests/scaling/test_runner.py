"""The runner with a stub run function: resume skipping, results.jsonl records, failures, report, plots."""
import json
import os

from megatron_mhmoe.runtime.run_config import RunConfig, load_config_file
from megatron_mhmoe.scaling import plots, report, results
from megatron_mhmoe.scaling.runner import Sweep
from megatron_mhmoe.scaling.spec import load_sweep


def _fake_train(run, config_path, log_path, fail=()):
    """Writes what train.py leaves in the run folder (metrics.jsonl, moe_stats.json)."""
    cfg = load_config_file(config_path)
    if run.name in fail:
        return 1
    rd = cfg["run_dir"]
    E = run.model.moe.num_experts if run.model.moe else 0
    with open(os.path.join(rd, "metrics.jsonl"), "w") as f:
        for step, tps in ((10, 100.0), (20, 200.0), (30, 300.0)):
            f.write(json.dumps({"step": step, "tokens_per_s": tps, "lm_loss": 5.0,
                                **({"moe/activation_ratio": 0.5, "moe/effective_experts": 3.0,
                                    "moe/divergence": 1.0, "moe/activation_threshold": 0.5} if E else {})}) + "\n")
        f.write(json.dumps({"step": 30, "val/lm_loss": 3.0 + run.seed / 100, "val/ppl": 20.0 + run.seed}) + "\n")
    if E and run.kind == "mhmoe" or (E and run.seed == 1):
        shares = [[1.0 / E] * E for _ in range(2)]
        with open(os.path.join(rd, "moe_stats.json"), "w") as f:
            json.dump({"source": "validation set, final weights", "threshold": 0.5, "activation_ratio": 1.0,
                       "effective_experts": float(E), "divergence": 2.5, "shares": shares,
                       "divergence_hist": {"bins": list(range(5)), "counts": [0, 1, 2, 3, 4]}}, f)
    return 0


def _sweep(tmp_path, only=None):
    spec, base = load_sweep("cpu_mini_sweep", ["sweep.experts=[8, 16]", "sweep.seeds=[1, 2]"])
    return Sweep(spec, base, str(tmp_path / "sw"), only=only, log=lambda m: None)


def test_records_and_resume_skipping(tmp_path):
    sw = _sweep(tmp_path)
    assert len(sw.runs) == 2 + 2 * 2 * 2
    calls = []

    def stub(run, path, log_path):
        calls.append(run.name)
        return _fake_train(run, path, log_path, fail={"smoe-E16-s2"})

    assert sw.run(jobs=2, run_fn=stub) == 1                       # one failure, reported, sweep goes on
    assert sorted(calls) == sorted(r.name for r in sw.runs)
    recs = results.read_jsonl(os.path.join(sw.dir, "results.jsonl"))
    assert len(recs) == len(sw.runs) - 1 and all(r["status"] == "ok" for r in recs)
    fails = results.read_jsonl(os.path.join(sw.dir, "failures.jsonl"))
    assert [f["name"] for f in fails] == ["smoe-E16-s2"]
    r = next(x for x in recs if x["name"] == "mhmoe-h4-params-E8-s2")
    assert r["val_ppl"] == 22.0 and r["tokens_per_s"] == 250.0    # first throughput window skipped
    assert r["activation_ratio"] == 1.0 and r["routing_source"].startswith("moe_stats.json")
    assert r["params_total"] > r["params_active"] > 0 and r["flops_per_token"] > 0
    assert r["tokens"] == 400 * 8 * 64 and r["ep"] == 1 and r["nodes"] == 1
    s = next(x for x in recs if x["name"] == "smoe-E16-s1")
    assert s["num_experts"] == 16 and s["h"] == 1
    # the config written for the run is a valid run config with the sweep's wandb group, name and tags
    cfg = load_config_file(r["config_path"])
    RunConfig.from_dict(cfg).validate(1)
    assert cfg["wandb"]["group"] == "cpu_mini_sweep" and cfg["wandb"]["name"] == r["name"]
    assert "mhmoe" in cfg["wandb"]["tags"] and cfg["train"]["seed"] == 2
    assert cfg["train"]["save_dir"] == os.path.join(cfg["run_dir"], "checkpoints")

    # rerun (a new Sweep on the same folder, as after a crash): only the failed run runs again
    calls.clear()

    def ok(run, path, log_path):
        calls.append(run.name)
        return _fake_train(run, path, log_path)

    assert _sweep(tmp_path).run(jobs=1, run_fn=ok) == 0 and calls == ["smoe-E16-s2"]
    calls.clear()
    assert _sweep(tmp_path).run(jobs=2, run_fn=ok) == 0 and calls == []


def test_finished_run_in_results_is_skipped(tmp_path):
    sw = _sweep(tmp_path, only="^dense")
    os.makedirs(sw.dir)
    results.append_result(sw.dir, {"name": "dense-s1", "status": "ok"})
    with open(os.path.join(sw.dir, "results.jsonl"), "a") as f:
        f.write('{"name": "dense-s2", "stat')                      # torn line (killed writer): ignored
    seen = []
    sw.run(run_fn=lambda run, p, lp: seen.append(run.name) or _fake_train(run, p, lp))
    assert seen == ["dense-s2"]


def test_report_and_plots(tmp_path):
    sw = _sweep(tmp_path)
    sw.run(jobs=1, run_fn=_fake_train)
    recs = results.read_jsonl(os.path.join(sw.dir, "results.jsonl"))
    agg = report.aggregate(recs)
    assert agg["SMoE (X-MoE)"][8]["val_ppl"][:2] == (21.5, 0.7071067811865476)   # seeds 1, 2 -> ppl 21, 22
    table = report.markdown_table(recs)
    assert "| Dense | - |" in table and "MH-MoE h=4 [params]" in table and "21.50 ± 0.71" in table
    assert "+0.0% ± 0.0" in table                                   # same ppl as Dense of the same seed
    made = plots.make_all(sw.dir, recs, {"Dense": {0: 16.23}, "X-MoE": {8: 14.82}}, log=lambda m: None)
    names = {os.path.basename(p) for p in made}
    assert names == {"ppl_vs_experts.png", "activation_vs_experts.png", "tokens_per_s_vs_experts.png",
                     "expert_shares.png", "divergence_hist.png"}
    assert all(os.path.getsize(p) > 1000 for p in made)
    # without moe_stats.json the two routing figures are skipped, the rest still drawn
    for r in recs:
        p = os.path.join(r["run_dir"], "moe_stats.json")
        if os.path.exists(p):
            os.remove(p)
    notes = []
    made = plots.make_all(sw.dir, recs, log=notes.append)
    assert len(made) == 3 and "skipped" in notes[0]
