"""Metrics logging: secret redaction, wandb mode resolution, offline wandb + metrics.jsonl, console lines."""
from __future__ import annotations

import io
import json
import math
import os
from types import SimpleNamespace

import pytest

from megatron_mhmoe.runtime import logging as mlog
from megatron_mhmoe.runtime.logging import (CONSOLE_WIDTH, MetricsLogger, Progress, format_eta, format_line, redact,
                                            redact_text, resolve_wandb_mode, run_summary)
from megatron_mhmoe.runtime.run_config import RunConfig, WandbConfig, default_moe_model

HEX40 = "0123456789abcdef0123456789abcdef01234567"
API_KEY = "a1b2c3d4e5f6a7b8c9d0a1b2c3d4e5f6a7b8c9d0"  # a wandb-style 40-hex key
PLANTED = "planted-Secret-Value-123"  # no pattern catches this value; only its key can


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No wandb credentials or mode from the machine: empty HOME (no .netrc), no WANDB_* variables."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("NETRC", raising=False)
    for k in list(os.environ):
        if k.startswith("WANDB_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("WANDB_SILENT", "true")  # MetricsLogger would set it for good otherwise
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_default"))  # never the cwd
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    return home


# ---------------------------------------------------------------------- redaction
def test_redact_credential_keys_at_any_depth():
    cfg = {"wandb": {"api_key": "abc", "project": "p"}, "hf_token": "t", "db": {"password": "pw", "passwd": "x",
           "user": "me"}, "nested": [{"client_secret": "s"}, {"AccessToken": 3}], "credentials": {"a": 1},
           "WANDB-API-KEY": "k", "lr": 0.1, "steps": 5}
    out = redact(cfg)
    assert out["wandb"] == {"api_key": "***", "project": "p"}
    assert out["hf_token"] == "***"
    assert out["db"] == {"password": "***", "passwd": "***", "user": "me"}
    assert out["nested"] == [{"client_secret": "***"}, {"AccessToken": "***"}]
    assert out["credentials"] == "***" and out["WANDB-API-KEY"] == "***"
    assert out["lr"] == 0.1 and out["steps"] == 5
    assert cfg["wandb"]["api_key"] == "abc"  # a copy: the input is untouched


def test_redact_secret_looking_values():
    out = redact({"note": f"key={HEX40}", "items": ["ok", HEX40, ("hf_" + "A" * 20,)], "path": "/data/x",
                  "tok": "sk-" + "b" * 30, "n": 3})
    assert out["note"] == "key=***"
    assert out["items"] == ["ok", "***", ("***",)]
    assert out["path"] == "/data/x" and out["n"] == 3
    assert out["tok"] == "***"


def test_redact_keeps_tokenizer_model_path():
    cfg = RunConfig(model=default_moe_model())
    cfg.data.tokenizer_model = "/data/tok/spm.model"
    out = redact(cfg.to_dict())
    assert out["data"]["tokenizer_model"] == "/data/tok/spm.model"
    assert out == cfg.to_dict()  # a clean run config has nothing to redact


def test_redact_text_removes_wandb_api_key(monkeypatch):
    key = "local-NotHexKey_xyz"  # the env value is removed even when no pattern would catch it
    monkeypatch.setenv("WANDB_API_KEY", key)
    text = f"error: login failed for {key}; commit {HEX40}"
    out = redact_text(text)
    assert key not in out and HEX40 not in out
    assert out == "error: login failed for ***; commit ***"
    monkeypatch.delenv("WANDB_API_KEY")
    assert redact_text("plain text") == "plain text"


# ---------------------------------------------------------------------- mode resolution
def test_resolve_wandb_mode_precedence(clean_env, monkeypatch):
    assert not mlog.wandb_has_credentials()
    assert resolve_wandb_mode("") == "offline"  # no key, no env: record locally
    monkeypatch.setenv("WANDB_API_KEY", API_KEY)
    assert resolve_wandb_mode("") == "online"  # a key: online
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("") == "disabled"  # env beats the key
    assert resolve_wandb_mode("offline") == "offline"  # config beats env
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "online")
    assert resolve_wandb_mode("") == "online"
    assert resolve_wandb_mode("disabled") == "disabled"


def test_netrc_entry_counts_as_credentials(clean_env):
    netrc = clean_env / ".netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {API_KEY}\n")
    netrc.chmod(0o600)
    assert mlog.wandb_has_credentials()
    assert resolve_wandb_mode("") == "online"
    netrc.write_text("machine example.com\n  login user\n  password x\n")
    assert not mlog.wandb_has_credentials()
    assert resolve_wandb_mode("") == "offline"


# ---------------------------------------------------------------------- MetricsLogger
def test_metrics_logger_disabled_rank_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    m = MetricsLogger(str(run_dir), WandbConfig(mode="offline"), {}, enabled=False, run_name="r")
    m.log(1, {"loss": 1.0})
    m.summary({"x": 1})
    m.close()
    assert not run_dir.exists() and m.run_id is None


def test_metrics_logger_wandb_disabled_writes_jsonl_only(clean_env, tmp_path):
    run_dir = tmp_path / "run"
    m = MetricsLogger(str(run_dir), WandbConfig(mode="disabled"), {}, enabled=True, run_name="r")
    m.log(3, {"loss": 2.5, "lr": 1e-3, "note": "x"})
    m.close()
    assert os.listdir(run_dir) == ["metrics.jsonl"]
    [row] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert row["step"] == 3 and row["loss"] == 2.5 and row["lr"] == 1e-3 and row["note"] == "x"


def test_metrics_logger_offline_wandb_run(clean_env, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", API_KEY)  # present, but the config says offline
    run_dir = tmp_path / "run"
    cfg = RunConfig(model=default_moe_model())
    cfg.run_dir = str(run_dir)
    cfg.train.lr = 0.25
    cfg.data.tokenizer_model = "/data/tok.model"
    config_dict = cfg.to_dict()
    config_dict["extra"] = {"hf_token": PLANTED, "note": f"see {HEX40}"}
    m = MetricsLogger(str(run_dir), WandbConfig(mode="offline", project="test", tags=["t"]), config_dict,
                      enabled=True, run_name="offline-test")
    run_id = m.run_id
    try:
        assert m.run is not None and run_id
        assert m.wandb_path and os.path.realpath(m.wandb_path).startswith(os.path.realpath(run_dir))
        logged = dict(m.run.config)
        assert logged["train"]["lr"] == 0.25
        assert logged["data"]["tokenizer_model"] == "/data/tok.model"
        assert logged["extra"] == {"hf_token": "***", "note": "see ***"}
        m.log(1, {"loss": 3.0, "lr": 0.1, "grad_norm": float("nan")})
        m.log(2, {"loss": 2.5, "lr": 0.2, "tokens_per_s": 1000})
        m.summary({"final_loss": 2.5})
    finally:
        m.close()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == 3.0 and math.isnan(rows[0]["grad_norm"])
    assert rows[1]["tokens_per_s"] == 1000.0
    runs = [d for d in os.listdir(run_dir / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1 and runs[0].endswith(f"-{run_id}")
    assert any(f.endswith(".wandb") for f in os.listdir(run_dir / "wandb" / runs[0]))
    # no secret anywhere in what wandb wrote (config, binary run log, debug logs)
    for root, _, files in os.walk(run_dir):
        for name in files:
            data = open(os.path.join(root, name), "rb").read()
            assert PLANTED.encode() not in data, os.path.join(root, name)
            assert HEX40.encode() not in data, os.path.join(root, name)
            assert API_KEY.encode() not in data, os.path.join(root, name)


# ---------------------------------------------------------------------- console line
def test_format_line_fields():
    line = format_line(7, 100, {"loss": 2.345678, "lr": 3e-4, "grad_norm": 0.5, "mfu": 0.123,
                                "moe/dropped_fraction": 0.01, "aux_loss": None, "unlisted": 5}, eta_s=3725)
    parts = line.split(" | ")
    assert parts[0] == "step   7/100"
    assert "loss 2.3457" in parts
    assert "lr 3.00e-04" in parts
    assert "gnorm 0.500" in parts
    assert "mfu 12.3%" in parts
    assert "drop 0.010" in parts
    assert parts[-1] == "eta 1:02:05"
    assert "aux" not in line and "unlisted" not in line
    assert format_line(1, 1, {}) == "step 1/1"
    assert format_eta(None) == "?" and format_eta(59.6) == "0:01:00" and format_eta(90061) == "25:01:01"


def test_format_line_fits_the_console_with_every_field_at_its_widest():
    """Every field present with wide values (a GPU run at 10M tokens/s, a diverged loss, fp16's scale, a
    7-digit step count): at most CONSOLE_WIDTH characters, the five core fields and the ETA kept, the
    optional ones left out from the end of the list."""
    wide = {"loss": 12345.678, "lr": 1.5e-3, "grad_norm": 98765.4321, "tokens_per_s": 12_345_678.0,
            "step_time_s": 1234.5678, "loss_scale": 65536.0 * 1024, "mfu": 0.999, "moe/activation_ratio": 1.0,
            "moe/dropped_fraction": 0.999, "aux_loss": 123.4567}
    line = format_line(1_234_567, 9_999_999, wide, eta_s=10 ** 7)
    assert len(line) <= CONSOLE_WIDTH, (len(line), line)
    labels = [p.split(" ")[0] for p in line.split(" | ")[1:]]
    assert labels[:5] == ["loss", "lr", "gnorm", "tok/s", "s/step"] and labels[-1] == "eta", labels
    assert "aux" not in labels  # the last optional field is the first to go
    # a CPU fp32 run of 300 steps (no loss scale, no MFU): the routing fields fit beside the core ones
    cpu = {"loss": 7.6365, "lr": 1e-4, "grad_norm": 2.957, "tokens_per_s": 8553.0, "step_time_s": 0.12,
           "moe/activation_ratio": 1.0, "moe/dropped_fraction": 0.0, "aux_loss": 2.0762, "mfu": None}
    small = format_line(25, 300, cpu, eta_s=40.0)
    assert [p.split(" ")[0] for p in small.split(" | ")[1:]] == [
        "loss", "lr", "gnorm", "tok/s", "s/step", "act", "drop", "eta"], small
    assert len(small) <= CONSOLE_WIDTH


class _Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_progress_through_a_pipe_is_plain_lines_with_an_eta():
    """Not a terminal: no bar, no carriage returns; a `progress:` line once interval_s passed without a
    console line, with the ETA from this launch's mean step time (resumed at step 10 of 110)."""
    out, clock = io.StringIO(), _Clock()
    p = Progress(total=110, initial=10, interval_s=60.0, tty=False, clock=clock, out=out)
    assert p.bar is None and p.eta_s() is None
    for step in range(11, 21):  # 10 steps of 2 s: 20 s, under the interval
        clock.t += 2.0
        assert p.update(step) is None
    p.line("step 20/110 | loss 1.0")  # a step line resets the interval
    for step in range(21, 51):  # 30 more steps: 60 s after the step line
        clock.t += 2.0
        printed = p.update(step)
    assert printed == "progress: step 50/110 (45%), 2 s/step, eta 0:02:00", printed
    assert out.getvalue() == "step 20/110 | loss 1.0\n" + printed + "\n" and "\r" not in out.getvalue()
    p.close()
    quiet = Progress(total=10, initial=0, interval_s=0, tty=False, clock=clock, out=io.StringIO())
    clock.t += 1e6
    assert quiet.update(1) is None  # interval 0: no progress lines


def test_run_summary_is_short_and_names_the_config_file():
    from megatron_mhmoe.parallel.context import ParallelContext
    from megatron_mhmoe.runtime.run_config import program_defaults
    cfg = program_defaults()
    cfg.parallel.ep = 1
    cfg.train.global_batch_size = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    lines = run_summary(cfg, ParallelContext.single_process(), {"total": 2_000_000, "expert": 1_000_000}, 3e6,
                        "runs/x/config.json")
    assert 5 <= len(lines) <= 8, lines
    assert lines[0].endswith("full config: runs/x/config.json")
    assert "world 1 = TP 1 x DP 1, MoE EP 1 x EDP 1" in lines[3]
    assert any(line.startswith("parameters: total 2.000M, expert 1.000M; forward 3.00 MFLOP/token") for line in lines)
    assert all("\n" not in line for line in lines)
