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


def test_balancing_table_by_variant(tmp_path):
    """Named variants: records carry the variant; the balancing table has one row per (model, variant), with
    MaxVio / fan-out from moe_stats.json, else the last logged step's, else n/a."""
    from megatron_mhmoe.scaling.spec import replace
    spec, base = load_sweep("activation_probe", [])     # the balancing_probe preset's variants, 2 seeds
    variants = {"micro": {"model.moe.aux_loss_coef": 0.01},
                "global": {"model.moe.aux_loss_coef": 0.0, "model.moe.global_aux_loss_coef": 0.01},
                "aux-free": {"model.moe.aux_loss_coef": 0.0, "model.moe.bias_update_rate": 0.001},
                "none": {"model.moe.aux_loss_coef": 0.0}}
    spec = replace(spec, vary={}, variants=variants, seeds=[1, 2])
    sw = Sweep(spec, base, str(tmp_path / "sw"), log=lambda m: None)
    assert len(sw.runs) == 2 * 4 * 2

    def fake(run, config_path, log_path):
        cfg = load_config_file(config_path)
        rd, moe = cfg["run_dir"], cfg["model"]["moe"]
        v = ["micro", "global", "aux-free", "none"].index(run.variant)
        with open(os.path.join(rd, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": 10, "tokens_per_s": 1.0, "lm_loss": 5.0, "moe/maxvio_global": 9.0,
                                **({"moe/fanout_groups_mean": 3.0 + v} if run.kind == "mhmoe" else {})}) + "\n")
            f.write(json.dumps({"step": 10, "val/ppl": 100.0 + 10 * v + run.seed}) + "\n")
        stats = {"activation_ratio": 0.5 + 0.1 * v, "effective_experts": 10.0 * (v + 1) + run.seed,
                 "aux": moe["aux_loss_coef"], "divergence": 2.0, "shares": [[1.0 / 64] * 64] * 2,
                 "divergence_hist": {"bins": list(range(5)), "counts": [0, 1, 2, 3, 4]}}
        if run.variant != "none":                       # 'none': MaxVio from the metrics (9.0)
            stats["maxvio"] = 1.0 + v
        with open(os.path.join(rd, "moe_stats.json"), "w") as f:
            json.dump(stats, f)
        return 0

    assert sw.run(jobs=1, run_fn=fake) == 0
    recs = results.read_jsonl(os.path.join(sw.dir, "results.jsonl"))
    r = next(x for x in recs if x["name"] == "smoe-E64-global-s2")
    assert r["variant"] == "global" and r["variant_overrides"] == {"model.moe.aux_loss_coef": 0.0,
                                                                   "model.moe.global_aux_loss_coef": 0.01}
    assert r["maxvio_train"] == 9.0 and r["fanout_groups_mean_train"] is None
    rows = {(row["model"], row["variant"]): row for row in report.balancing_rows(recs)}
    assert len(rows) == 8 and all(row["seeds"] == [1, 2] for row in rows.values())
    assert rows[("SMoE (X-MoE)", "global")]["val_ppl"][:2] == (111.5, 0.7071067811865476)
    assert rows[("MH-MoE h=4 [params]", "none")]["maxvio"][0] == 9.0
    assert rows[("MH-MoE h=4 [params]", "aux-free")]["fanout_groups_mean"][0] == 5.0
    table = report.balancing_table(recs)
    lines = table.splitlines()
    assert lines[0].startswith("| model | E | balancing | seeds | val ppl")
    assert "| SMoE (X-MoE) | 64 | micro | 2 | 101.50 ± 0.71 | 0.500 ± 0.000 | 11.5 ± 0.7 | 1.000 ± 0.000 | n/a |" \
        in lines
    assert "| MH-MoE h=4 [params] | 64 | none | 2 | 131.50 ± 0.71 | 0.800 ± 0.000 | 41.5 ± 0.7 | 9.000 ± 0.000 | " \
        "6.00 ± 0.00 |" in lines
    assert [l.split(" | ")[2] for l in lines[2:10]] == ["micro", "global", "aux-free", "none"] * 2  # preset order
    assert "- `global`: `aux_loss_coef=0.0`, `global_aux_loss_coef=0.01`" in lines
    # the main table keeps one series per (kind, variant)
    assert "| SMoE (X-MoE) aux-free | 64 |" in report.markdown_table(recs)
    assert report.balancing_table([]) == ""
    # `tools/scaling.py plot` writes it under the main table in summary.md (and still draws the figures)
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.run([sys.executable, "tools/scaling.py", "plot", "--out", sw.dir], cwd=root, capture_output=True,
                       text=True, timeout=240, env={**os.environ, "WANDB_MODE": "disabled"})
    assert p.returncode == 0, p.stderr[-2000:]
    summary = open(os.path.join(sw.dir, "summary.md")).read()
    assert "## by variant" in summary and table in summary
    for png in ("ppl_vs_experts.png", "expert_shares.png", "balance_vs_experts.png"):
        assert os.path.getsize(os.path.join(sw.dir, "plots", png)) > 1000
