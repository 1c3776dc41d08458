"""tools/scaling.py and launch/scale_experts.sh end to end: the multi-node dry run, hostfile refusal, and
one tiny real run (4 steps) through train.py that lands in results.jsonl and is skipped when rerun."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
       "PYTHON": sys.executable}


def _run(cmd, **kw):
    return subprocess.run(cmd, cwd=ROOT, env={**ENV, **kw.pop("env", {})}, capture_output=True, text=True,
                          timeout=240, **kw)


def test_scale_experts_dry_run(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("worker-0 slots=8\nworker-1 slots=8\nworker-2 slots=8\nworker-3 slots=8\n")
    out = tmp_path / "sweep"
    p = _run(["launch/scale_experts.sh", "--preset", "paper_scaling", "--out", str(out), "--dry-run",
              "--sweep.seeds=[1]"], env={"HOSTFILE": str(hosts), "MASTER_ADDR": "10.0.0.1"})
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    launches = [l for l in lines if "train_multi_node.sh --config" in l]
    assert len(launches) == 1 + 6 * 2                                  # one line per run
    big = next(l for l in launches if "mhmoe-h4-params-E256-s1" in l)
    assert "NUM_NODES=4" in big and "GPUS_PER_NODE=8" in big and "MASTER_ADDR=10.0.0.1" in big
    row = next(l for l in lines if " mhmoe-h4-params-E256-s1 " in l).split()
    assert row[-5:-1] == ["4", "32", "32", "8"]                        # nodes, world, EP, experts/rank
    assert (out / "configs" / "mhmoe-h4-params-E256-s1.yaml").exists()
    assert not (out / "results.jsonl").exists()


def test_scale_experts_refuses_bad_hostfile(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("a;touch${IFS}x slots=8\n")
    p = _run(["launch/scale_experts.sh", "--preset", "paper_scaling", "--out", str(tmp_path / "s")],
             env={"HOSTFILE": str(hosts), "MASTER_ADDR": "10.0.0.1"})
    assert p.returncode == 2 and "bad host name" in p.stderr and not (tmp_path / "s").exists()
    p = _run(["launch/scale_experts.sh", "--preset", "paper_scaling"], env={"HOSTFILE": "", "MASTER_ADDR": "x"})
    assert p.returncode == 2 and "HOSTFILE" in p.stderr


def test_one_tiny_real_run_and_resume(tmp_path):
    out = tmp_path / "mini"
    cmd = [sys.executable, "tools/scaling.py", "run", "--preset", "cpu_mini_sweep", "--out", str(out),
           "--only", "^mhmoe-h4-params-E8-s1$", "--no-plots", "--base.train.train_steps=4",
           "--base.train.eval_iters=2", "--base.train.log_interval=2", "--base.train.save_interval=0"]
    p = _run(cmd)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in recs] == ["mhmoe-h4-params-E8-s1"]
    r = recs[0]
    assert r["val_ppl"] > 1 and r["tokens"] == 4 * 8 * 64 and r["num_heads"] == 4
    assert r["activation_ratio"] is not None and r["effective_experts"] is not None and r["tokens_per_s"] > 0
    p = _run(cmd)
    assert p.returncode == 0 and "1 already in" in p.stdout and "0 to run" in p.stdout
