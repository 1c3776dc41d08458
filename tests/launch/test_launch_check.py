"""launch_check: the pre-launch validation CLI (in-process through main(), and as a subprocess)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_mhmoe.launch import launch_check as LC

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DS = os.path.join(ROOT, "ds_configs")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./.deepspeed_env from the checkout


def run(capsys, *argv):
    code = LC.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def hostfile(tmp_path, text="node0 slots=2\nnode1 slots=2\n", name="hosts"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def cli(*argv, env=None):
    e = dict(os.environ)
    e.pop("DS_ACCELERATOR", None)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "megatron_mhmoe.launch.launch_check", *argv],
                          capture_output=True, text=True, env=e, timeout=60)


# ---------------------------------------------------------------------------------------- subprocess
def test_cli_good_plan(tmp_path):
    r = cli("--hostfile", hostfile(tmp_path), "--tp", "2", "--ep", "2", "--master-addr", "10.0.0.1",
            "--master-port", "29600", "--", "--parallel.tp=2")
    assert r.returncode == 0, r.stderr
    assert "world 4 = 2 node(s) x 2 rank(s) per node" in r.stdout
    assert "TP 2 x DP 2, EP 2 x EDP 2" in r.stdout and "10.0.0.1:29600" in r.stdout
    assert "node0: ranks 0-1 (slots 0,1)" in r.stdout and "node1: ranks 2-3 (slots 0,1)" in r.stdout
    assert r.stderr == ""


def test_cli_tp_not_dividing_world_gives_arithmetic(tmp_path):
    r = cli("--nodes", "1", "--gpus-per-node", "4", "--tp", "3", "--", "--parallel.tp=3")
    assert r.returncode != 0 and r.stdout == ""
    assert "tensor-parallel size 3 does not divide world size 4 (4 % 3 = 1)" in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("launch_check: error:")


def test_cli_malicious_hostfile_and_address(tmp_path):
    r = cli("--hostfile", hostfile(tmp_path, "node0 slots=1\na;touch pwned slots=1\n"))
    assert r.returncode == 2 and "line 2" in r.stderr and "'a;touch'" in r.stderr and str(tmp_path) in r.stderr
    r = cli("--gpus-per-node", "2", "--master-addr", "$(id)")
    assert r.returncode == 2 and "--master-addr: bad address '$(id)'" in r.stderr
    assert not (tmp_path / "pwned").exists()


def test_cli_help_and_bad_option():
    assert cli("--help").returncode == 0
    r = cli("--gpus-per-node", "2", "--bogus")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--bogus" in r.stderr


# ---------------------------------------------------------------------------------- world size / plan
def test_world_from_nodes_times_gpus(capsys):
    code, out, _ = run(capsys, "--nodes", "2", "--gpus-per-node", "4", "--", "--parallel.tp=4",
                       "--parallel.ep=8")
    assert code == 0 and "world 8 = 2 node(s) x 4 rank(s) per node" in out and "TP 4 x DP 2, EP 8 x EDP 1" in out


def test_world_from_filters(capsys, tmp_path):
    hf = hostfile(tmp_path, "node0 slots=4\nnode1 slots=4\nnode2 slots=4\n")
    code, out, _ = run(capsys, "--hostfile", hf, "--include", "node1:0,1@node2:2,3")
    assert code == 0 and "world 4 = 2 node(s)" in out and "node2: ranks 2-3 (slots 2,3)" in out
    code, out, _ = run(capsys, "--hostfile", hf, "--exclude", "node0")
    assert code == 0 and "world 8" in out
    code, out, _ = run(capsys, "--hostfile", hf, "--nodes", "2", "--gpus-per-node", "1")
    assert code == 0 and "world 2 = 2 node(s) x 1 rank(s)" in out
    code, _, err = run(capsys, "--hostfile", hf, "--include", "node0:0,1,2")
    assert code == 2 and "expert-parallel size 2 does not divide world size 3 (3 % 2 = 1)" in err
    code, _, err = run(capsys, "--hostfile", hf, "--include", "node0", "--nodes", "1")
    assert code == 2 and "cannot be combined" in err


def test_uneven_slots_and_tp_across_nodes_warns(capsys, tmp_path):
    hf = hostfile(tmp_path, "a slots=3\nb slots=1\n")
    code, out, err = run(capsys, "--hostfile", hf, "--", "--parallel.tp=2")
    assert code == 0 and "world 4 = 2 node(s) x 3/1 rank(s) per node" in out
    assert "warning: TP=2 groups" in err


@pytest.mark.parametrize("argv,match", [
    (["--hostfile", "MISSING"], "does not exist"),
    (["--gpus-per-node", "0"], "--gpus-per-node: 0 is not a positive integer"),
    (["--gpus-per-node", "2;id"], "--gpus-per-node: '2;id' is not a positive integer"),
    (["--nodes", "2"], "no --hostfile and no --gpus-per-node"),
    (["--gpus-per-node", "2", "--include", "a"], "give --hostfile too"),
    (["--gpus-per-node", "2", "--master-port", "80"], "port 80 is out of range"),
    (["--gpus-per-node", "2", "--master-port", "$(id)"], "--master-port: '$(id)' is not a port number"),
    (["--gpus-per-node", "2", "--master-addr", "10.0.0.1;id"], "bad address"),
    (["--gpus-per-node", "2", "--node-rank", "1"], "--node-rank 1 but there are 1 node(s)"),
    (["--gpus-per-node", "2", "--node-rank", "$(id)"], "is not a non-negative integer"),
    (["--gpus-per-node", "2", "--launcher", "ssh;id"], "is not one of"),
    (["--gpus-per-node", "2", "--module", "os;id"], "not a dotted Python module name"),
    (["--gpus-per-node", "2", "--rdzv-backend", "etcd"], "not one of static, c10d"),
    (["--gpus-per-node", "2", "--rdzv-id", "a b"], "--rdzv-id"),
    (["--gpus-per-node", "2", "--ssh-port", "0"], "--ssh-port"),
    (["--gpus-per-node", "2", "--max-restarts", "-1"], "--max-restarts"),
    (["--gpus-per-node", "4", "--tp", "2"], "--tp 2 but the run config resolves parallel.tp=1"),
    (["--gpus-per-node", "4", "--ep", "4"], "--ep 4 but the run config resolves parallel.ep=2"),
    (["--gpus-per-node", "2", "--", "--train.nope=1"], "unknown key(s) ['nope'] in train"),
    (["--gpus-per-node", "2", "--", "positional"], "unrecognised argument 'positional'"),
    (["--gpus-per-node", "2", "--", "--local_rank=x"], "argument --local_rank/--local-rank: invalid int value: 'x'"),
    (["--gpus-per-node", "2", "--", "--help"], "unrecognised argument '--help'"),
    (["--gpus-per-node", "2", "--", "--config", "nope.yaml"], "does not exist"),
    (["--gpus-per-node", "2", "--", "--train.global_batch_size=7"], "global_batch_size 7 is not a multiple"),
    (["--gpus-per-node", "2", "--", "--train.zero_stage=3"], "ZeRO-3"),
])
def test_refusals(capsys, argv, match):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert match in err and err.startswith("launch_check: error:") and err.count("\n") == 1


def test_no_ssh_and_launchers(capsys, tmp_path):
    hf = hostfile(tmp_path)
    code, _, err = run(capsys, "--hostfile", hf, "--no-ssh")
    assert code == 2 and "give --node-rank" in err
    code, out, _ = run(capsys, "--hostfile", hf, "--no-ssh", "--node-rank", "1", "--master-addr", "127.0.0.1")
    assert code == 0 and "this node is node_rank 1" in out
    for launcher in ("openmpi", "mvapich", "slurm"):
        code, _, err = run(capsys, "--hostfile", hf, "--launcher", launcher, "--master-addr", "10.0.0.1")
        assert code == 2 and f"--launcher {launcher}" in err
    code, _, err = run(capsys, "--hostfile", hf, "--launcher", "mpich", "--master-addr", "10.0.0.1",
                       "--gpus-per-node", "1")
    assert code == 2 and "uses the whole hostfile" in err
    code, out, _ = run(capsys, "--hostfile", hf, "--launcher", "IMPI", "--master-addr", "10.0.0.1")
    assert code == 0
    code, _, err = run(capsys, "--gpus-per-node", "2", "--launcher", "pdsh")
    assert code == 2 and "needs --hostfile" in err
    code, _, err = run(capsys, "--hostfile", hf, "--launcher", "pdsh")
    assert code == 0 and "loopback" in err


# ------------------------------------------------------------------------------------ pdsh shell safety
@pytest.mark.parametrize("arg", ["--wandb.name=$(touch pwned)", "--wandb.name=`id`", "--run_dir=a;id",
                                 "--wandb.name=a|b", "--wandb.name=my $HOME", '--wandb.name=a "b"',
                                 "--run_dir=x\ny", "--wandb.name=it's"])
def test_pdsh_refuses_shell_active_training_args(capsys, tmp_path, arg):
    hf = hostfile(tmp_path)
    code, _, err = run(capsys, "--hostfile", hf, "--launcher", "pdsh", "--master-addr", "10.0.0.1", "--", arg)
    assert code == 2 and "pdsh launcher passes the arguments through a remote shell" in err
    # per-node (no ssh) launches pass arguments as argv, with no shell in between (the program itself may
    # still refuse a value, e.g. a YAML-invalid backtick)
    code, _, err = run(capsys, "--hostfile", hf, "--launcher", "pdsh", "--no-ssh", "--node-rank", "0",
                       "--master-addr", "10.0.0.1", "--", arg)
    assert "remote shell" not in err and (code == 0 or "run config" in err), err


def test_pdsh_accepts_plain_and_spaced_args(capsys, tmp_path):
    hf = hostfile(tmp_path)
    code, _, err = run(capsys, "--hostfile", hf, "--launcher", "pdsh", "--master-addr", "10.0.0.1", "--",
                       "--train.lr=3e-4", "--wandb.name=my run (1)", "--run_dir=/scratch/runs/a-b_c.d")
    assert code == 0, err


def test_pdsh_checks_exported_env_and_deepspeed_env(capsys, tmp_path, monkeypatch):
    hf = hostfile(tmp_path)
    argv = ["--hostfile", hf, "--launcher", "pdsh", "--master-addr", "10.0.0.1"]
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth0$(id)")
    code, _, err = run(capsys, *argv)
    assert code == 2 and "NCCL_SOCKET_IFNAME" in err
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth0")
    (tmp_path / ".deepspeed_env").write_text("OMP_NUM_THREADS=1\nWANDB_MODE=`id`\n")
    code, _, err = run(capsys, *argv)
    assert code == 2 and ".deepspeed_env line 2" in err
    (tmp_path / ".deepspeed_env").write_text("OMP_NUM_THREADS=1\n")
    assert run(capsys, *argv)[0] == 0


# ------------------------------------------------------------------------------- run / DeepSpeed config
def test_config_file_gives_tp_ep(capsys, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("parallel:\n  tp: 2\n  ep: 4\n")
    code, out, _ = run(capsys, "--gpus-per-node", "4", "--tp", "2", "--ep", "4", "--", "--config", str(cfg))
    assert code == 0 and "TP 2 x DP 2, EP 4 x EDP 1" in out
    code, out, _ = run(capsys, "--gpus-per-node", "4", "--config", str(cfg), "--", "--parallel.ep=2")
    assert code == 0 and "EP 2 x EDP 2" in out  # overrides win over the file, as in the program
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"parallel": {"tp": 1}}))
    code, _, err = run(capsys, "--gpus-per-node", "4", "--config", str(cfg), "--", "--config", str(other))
    assert code == 2 and "--config" in err


def test_deepspeed_config_checks(capsys, tmp_path):
    z2 = os.path.join(DS, "zero2_bf16.json")
    base = ["--gpus-per-node", "2", "--"]
    code, _, err = run(capsys, *base, "--deepspeed_config", z2)
    assert code == 2 and "zero_optimization.stage=2" in err and "--train.zero_stage=2" in err
    code, _, err = run(capsys, *base, "--deepspeed_config", z2, "--train.zero_stage=2")
    assert code == 2 and "--train.precision=bf16" in err
    code, _, err = run(capsys, *base, "--deepspeed_config", z2, "--train.zero_stage=2", "--train.precision=bf16")
    assert code == 0, err
    code, _, err = run(capsys, *base, "--deepspeed-config", os.path.join(DS, "zero3_bf16_dense.json"),
                       "--train.zero_stage=3", "--train.precision=bf16")
    assert code == 2 and "ZeRO-3" in err
    code, out, err = run(capsys, *base, "--deepspeed_config", os.path.join(DS, "zero3_bf16_dense.json"),
                         "--train.zero_stage=3", "--train.precision=bf16", "--model.moe=null")
    assert code == 0 and "dense model" in out, err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, err = run(capsys, *base, "--deepspeed_config", str(bad))
    assert code == 2 and "not valid JSON" in err
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps({"train_batch_size": 8, "gradient_clipping": 1.0}))  # the run config's values
    code, _, err = run(capsys, *base, "--deepspeed_config", str(batch))
    assert code == 0 and err == "", err
    batch.write_text(json.dumps({"train_batch_size": 999, "optimizer": {"type": "Adam"}}))
    code, out, err = run(capsys, *base, "--deepspeed_config", str(batch))
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "train_batch_size=999 but train.global_batch_size=8" in err and "'optimizer' section" in err


def test_fp16_refused_on_cpu_accelerator(capsys, monkeypatch):
    argv = ["--gpus-per-node", "2", "--", "--train.precision=fp16", "--deepspeed_config",
            os.path.join(DS, "zero1_fp16.json"), "--train.zero_stage=1"]
    assert run(capsys, *argv)[0] == 0
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    code, _, err = run(capsys, *argv)
    assert code == 2 and "does not support fp16" in err


# Every rule of run_config.check_ds_config_agrees, as (file contents, training overrides, message): each must
# refuse the launch in launch_check and stop megatron_mhmoe.train before it starts.
DS_RULES = {
    "not an object": ([{"zero_optimization": {"stage": 0}}], [], "must hold a JSON object, got list"),
    "section not an object": ({"zero_optimization": 1}, [], "'zero_optimization' must be a JSON object"),
    "precision section not an object": ({"bf16": True}, [], "'bf16' must be a JSON object"),
    "stage differs": ({"zero_optimization": {"stage": 2}}, [],
                      "zero_optimization.stage=2 but train.zero_stage=0 (add --train.zero_stage=2)"),
    "stage not a number": ({"zero_optimization": {"stage": "1"}}, ["--train.zero_stage=1"],
                           "zero_optimization.stage='1' is not a ZeRO stage number"),
    "bf16 on, run fp32": ({"bf16": {"enabled": True}}, [],
                          "bf16.enabled=true but train.precision=fp32 (add --train.precision=bf16)"),
    "fp16 on, run bf16": ({"fp16": {"enabled": True}}, ["--train.precision=bf16"],
                          "fp16.enabled=true but train.precision=bf16 (add --train.precision=fp16)"),
    "both on": ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, ["--train.precision=bf16"],
                "bf16.enabled and fp16.enabled are both true"),
    "bf16 off, run bf16": ({"bf16": {"enabled": False}}, ["--train.precision=bf16"],
                           "bf16.enabled=false (fp32) but train.precision=bf16 (add --train.precision=fp32)"),
    "fp16 off, run bf16": ({"fp16": {"enabled": False}}, ["--train.precision=bf16"],
                           "fp16.enabled=false (fp32) but train.precision=bf16"),
    "offload, run without": ({"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}},
                             ["--train.zero_stage=1"], "add --train.offload_optimizer=true"),
    # World 2, micro 4, no accumulation: the run config resolves global 8.
    "global batch differs": ({"train_batch_size": 999}, [],
                             "train_batch_size=999 but train.global_batch_size=8 (the run config is the source of "
                             "truth: remove train_batch_size from the file, or pass --train.global_batch_size=999"),
    "micro batch differs": ({"train_micro_batch_size_per_gpu": 2}, [],
                            "train_micro_batch_size_per_gpu=2 but train.micro_batch_size=4"),
    "accumulation differs": ({"gradient_accumulation_steps": 2}, [],
                             "gradient_accumulation_steps=2 but train.grad_accum_steps=1"),
    "clipping differs": ({"gradient_clipping": 0.5}, [], "gradient_clipping=0.5 but train.clip_grad=1"),
    "batch field not a number": ({"train_batch_size": "8"}, [], "train_batch_size='8' but train.global_batch_size=8"),
    "optimizer section": ({"optimizer": {"type": "Adam", "params": {"lr": 1e-4}}}, [],
                          "an 'optimizer' section, which the program does not use (it builds its own torch AdamW): "
                          "remove it and set train.lr, train.weight_decay, train.adam_beta1, train.adam_beta2, "
                          "train.adam_eps in the run config instead"),
    "scheduler section": ({"scheduler": {"type": "WarmupLR"}}, [],
                          "a 'scheduler' section, which the program does not use (it builds its own LR schedule): "
                          "remove it and set train.lr, train.min_lr, train.warmup_steps, train.lr_decay_style, "
                          "train.train_steps in the run config instead"),
}


@pytest.fixture(scope="module")
def train_module():
    # A plain import, not importorskip: a training program that no longer imports is a failure here.
    import megatron_mhmoe.train as train
    return train


@pytest.mark.parametrize("path", ["launch_check", "train"])
@pytest.mark.parametrize("rule", sorted(DS_RULES))
def test_deepspeed_config_rules_fire_in_launch_check_and_train(capsys, tmp_path, monkeypatch, request, rule, path):
    ds, overrides, match = DS_RULES[rule]
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(ds))
    argv = ["--deepspeed_config", str(f), *overrides]
    if path == "launch_check":
        code, out, err = run(capsys, "--gpus-per-node", "2", "--", *argv)
        assert code == 2 and out == "" and err.startswith("launch_check: error:") and err.count("\n") == 1
    else:
        train = request.getfixturevalue("train_module")
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")):
            monkeypatch.setenv(key, value)

        def past_the_deepspeed_check(cfg):  # a file that passes must not start a run here
            raise ValueError("the DeepSpeed config was accepted")
        monkeypatch.setattr(train, "_check_data_inputs", past_the_deepspeed_check)
        code = train.main(argv)
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("config error:"), err
    assert match in err, err


def test_deepspeed_config_rules_accept_the_fixed_file(tmp_path):
    """The hint in each message fixes it: the same file with the suggested override passes."""
    from megatron_mhmoe.runtime.run_config import check_ds_config_agrees
    fixed = {"stage differs": ["--train.zero_stage=2"], "bf16 on, run fp32": ["--train.precision=bf16"],
             "fp16 on, run bf16": ["--train.precision=fp16"], "bf16 off, run bf16": ["--train.precision=fp32"],
             "fp16 off, run bf16": ["--train.precision=fp32"],
             "offload, run without": ["--train.zero_stage=1", "--train.offload_optimizer=true"],
             "micro batch differs": ["--train.micro_batch_size=2"],
             "accumulation differs": ["--train.grad_accum_steps=2"], "clipping differs": ["--train.clip_grad=0.5"]}
    for rule, overrides in fixed.items():
        cfg = LC.resolve_run_config(None, overrides)
        cfg.validate(2)
        assert check_ds_config_agrees(cfg, DS_RULES[rule][0], "ds.json") == [], rule
    cfg = LC.resolve_run_config(None, ["--train.global_batch_size=16"])
    cfg.validate(2)
    same = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
            "gradient_clipping": 1}
    assert check_ds_config_agrees(cfg, same, "ds.json") == []


def _with_extra_option(monkeypatch):
    from megatron_mhmoe.launch import cli
    original = cli.build_parser

    def with_extra(raise_errors=False):
        p = original(raise_errors)
        p.add_argument("--extra-option", default=None)
        return p
    monkeypatch.setattr(cli, "build_parser", with_extra)
    return original


def test_launch_check_parses_and_resolves_with_cli(capsys, monkeypatch):
    """launch_check has no copy of the training command line: an option added to megatron_mhmoe/launch/cli.py's parser,
    or a change of its config resolution, reaches launch_check."""
    from megatron_mhmoe.launch import cli
    assert run(capsys, "--gpus-per-node", "2", "--", "--extra-option", "7")[0] == 2
    _with_extra_option(monkeypatch)
    code, _, err = run(capsys, "--gpus-per-node", "2", "--", "--extra-option", "7", "--train.lr=0.5")
    assert code == 0, err

    def resolver(config_path, overrides):
        raise ValueError(f"resolved by cli.resolve_config({config_path!r}, {overrides!r})")
    monkeypatch.setattr(cli, "resolve_config", resolver)
    code, _, err = run(capsys, "--gpus-per-node", "2", "--", "--train.lr=0.5")
    assert code == 2 and "resolved by cli.resolve_config(None, ['--train.lr=0.5'])" in err


def test_train_parses_and_resolves_with_cli(monkeypatch, train_module):
    """...and so does the program: both use megatron_mhmoe/launch/cli.py's functions, not copies of them."""
    from megatron_mhmoe.launch import cli
    assert train_module.parse_args is cli.parse_args and train_module.resolve_config is cli.resolve_config
    _with_extra_option(monkeypatch)
    assert train_module.parse_args(["--extra-option", "7", "--train.lr=0.5"])[0].extra_option == "7"


def test_launch_check_does_not_import_torch(tmp_path):
    """The whole check (run config, DeepSpeed file, sizes) runs without torch or deepspeed: it precedes every
    launch, and importing torch there would cost seconds and tie the check to an installed torch."""
    code = ("import sys; from megatron_mhmoe.launch import launch_check as LC; "
            "rc = LC.main(sys.argv[1:]); heavy = sorted({'torch', 'deepspeed'} & set(sys.modules)); "
            "print('heavy', heavy); sys.exit(rc)")
    e = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e.pop("DS_ACCELERATOR", None)
    r = subprocess.run([sys.executable, "-c", code, "--gpus-per-node", "2", "--", "--config",
                        os.path.join(ROOT, "megatron_mhmoe", "presets", "quickstart.yaml"), "--deepspeed_config",
                        os.path.join(DS, "zero1_bf16.json"), "--train.precision=bf16"],
                       capture_output=True, text=True, env=e, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "launch plan: world 2" in r.stdout and "heavy []" in r.stdout, r.stdout
