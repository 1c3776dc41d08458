"""Run config: unknown keys, overrides, config files, and validate()'s arithmetic messages."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.runtime.run_config import (RunConfig, apply_overrides, default_moe_model, load_config_file,
                                               merged_dict)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def moe_cfg(**train) -> RunConfig:
    cfg = RunConfig(model=default_moe_model())
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


# ---------------------------------------------------------------------- from_dict: unknown keys
@pytest.mark.parametrize("d, bad, known", [
    ({"bogus": 1}, "bogus", "run_dir"),
    ({"train": {"lrr": 0.1}}, "lrr", "lr"),
    ({"parallel": {"pp": 2}}, "pp", "ep"),
    ({"data": {"path": "x"}}, "path", "data_path"),
    ({"wandb": {"entity": "me"}}, "entity", "project"),
    ({"model": {"hidden": 64}}, "hidden", "hidden_size"),
    ({"model": {"moe": {"experts": 4}}}, "experts", "num_experts"),
])
def test_from_dict_rejects_unknown_keys_at_every_level(d, bad, known):
    with pytest.raises(ValueError) as e:
        RunConfig.from_dict(d)
    msg = str(e.value)
    assert "unknown" in msg and repr(bad) in msg
    assert repr(known) in msg  # the known keys are listed


def test_from_dict_round_trips_to_dict():
    cfg = RunConfig(model=default_moe_model())
    cfg.train.lr = 0.5
    cfg.parallel.ep = 4
    cfg.data.data_path = [0.3, "a", 0.7, "b"]
    back = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert isinstance(back.model.moe, MoEConfig)
    dense = RunConfig.from_dict({"model": {"moe": None}})
    assert dense.model.moe is None


@pytest.mark.parametrize("section", ["train", "parallel", "data", "wandb", "model"])
def test_from_dict_rejects_non_mapping_section(section):
    with pytest.raises(ValueError, match=f"'{section}' must be a mapping"):
        RunConfig.from_dict({section: 5})


# ---------------------------------------------------------------------- overrides
def test_apply_overrides_parses_yaml_values():
    d = RunConfig(model=default_moe_model()).to_dict()
    apply_overrides(d, ["--train.lr=0.5", "--train.train_steps=7", "--parallel.sequence_parallel=true",
                        "--data.data_path=[0.5, a, 0.5, b]", "--wandb.tags=[x, y]", "--model.moe.num_heads=2",
                        "--train.min_lr=3e-4", "--train.adam_eps=1e-8", "--wandb.name=", "--run_dir=out/r1"])
    t = d["train"]
    assert t["lr"] == 0.5 and isinstance(t["lr"], float)
    assert t["train_steps"] == 7 and isinstance(t["train_steps"], int)
    assert d["parallel"]["sequence_parallel"] is True
    assert d["data"]["data_path"] == [0.5, "a", 0.5, "b"]
    assert d["wandb"]["tags"] == ["x", "y"]
    assert d["model"]["moe"]["num_heads"] == 2
    # YAML 1.1 would read 3e-4 as a string; the run config must read it as the number it is
    assert t["min_lr"] == pytest.approx(3e-4) and isinstance(t["min_lr"], float)
    assert t["adam_eps"] == pytest.approx(1e-8) and isinstance(t["adam_eps"], float)
    assert d["wandb"]["name"] == ""
    assert d["run_dir"] == "out/r1"
    cfg = RunConfig.from_dict(d)
    assert cfg.model.moe.num_heads == 2 and cfg.train.lr == 0.5


def test_apply_overrides_null_and_nested_section_creation():
    d = RunConfig(model=default_moe_model()).to_dict()
    apply_overrides(d, ["--model.moe=null"])
    assert d["model"]["moe"] is None
    assert RunConfig.from_dict(d).model.moe is None
    # a nested key under a null section creates it
    apply_overrides(d, ["--model.moe.num_experts=4"])
    cfg = RunConfig.from_dict(d)
    assert cfg.model.moe.num_experts == 4 and cfg.model.moe.top_k == MoEConfig().top_k


@pytest.mark.parametrize("bad", ["--train.lr", "--=3", "=3", "--train.lr=[1, 2", "--train.lr={a: 1"])
def test_apply_overrides_rejects_malformed(bad):
    with pytest.raises(ValueError) as e:
        apply_overrides(RunConfig().to_dict(), [bad])
    assert "override" in str(e.value)


def test_apply_overrides_into_scalar_is_not_a_section():
    with pytest.raises(ValueError, match="'lr' is not a section"):
        apply_overrides(RunConfig().to_dict(), ["--train.lr.x=1"])


def test_override_of_unknown_key_fails_in_from_dict():
    d = merged_dict(RunConfig(), None, ["--train.nonsense=1"])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['nonsense'\] in train"):
        RunConfig.from_dict(d)


# ---------------------------------------------------------------------- config files
def test_load_config_file_yaml_and_json(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  lr: 3e-4\n  train_steps: 5\nmodel:\n  moe:\n    num_heads: 2\n")
    dy = load_config_file(str(y))
    assert dy["train"]["lr"] == pytest.approx(3e-4) and isinstance(dy["train"]["lr"], float)
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"train": {"lr": 3e-4, "train_steps": 5}, "model": {"moe": {"num_heads": 2}}}))
    assert load_config_file(str(j)) == dy
    cfg = RunConfig.from_dict(merged_dict(RunConfig(model=default_moe_model()), dy, ["--train.train_steps=9"]))
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.train_steps == 9
    assert cfg.model.moe.num_heads == 2 and cfg.model.moe.num_experts == default_moe_model().moe.num_experts


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config_file(str(tmp_path / "missing.yaml"))
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping at the top level, got list"):
        load_config_file(str(lst))
    js = tmp_path / "s.json"
    js.write_text('"just a string"')
    with pytest.raises(ValueError, match="mapping at the top level, got str"):
        load_config_file(str(js))
    empty = tmp_path / "empty.yml"
    empty.write_text("")
    with pytest.raises(ValueError, match="got NoneType"):
        load_config_file(str(empty))
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config_file(str(broken))
    badjson = tmp_path / "bad.json"
    badjson.write_text("{'train': 1}")
    with pytest.raises(ValueError):
        load_config_file(str(badjson))


def test_yaml_config_cannot_construct_python_objects(tmp_path):
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.yaml"
    f.write_text(f"train: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config_file(str(f))
    assert not marker.exists()


# ---------------------------------------------------------------------- validate
def test_validate_derives_grad_accum_from_global_batch():
    cfg = moe_cfg(micro_batch_size=4, global_batch_size=32)
    cfg.parallel.ep = 2
    cfg.validate(4)
    assert cfg.train.grad_accum_steps == 2  # 32 / (4 x DP 4)
    cfg = moe_cfg(micro_batch_size=2, global_batch_size=0, grad_accum_steps=3)
    cfg.parallel.tp = 2
    cfg.validate(4)
    assert cfg.train.global_batch_size == 2 * 3 * 2  # micro x accum x DP (world 4 / TP 2)


def test_validate_batch_arithmetic_message():
    cfg = moe_cfg(micro_batch_size=4, global_batch_size=24)
    with pytest.raises(ValueError) as e:
        cfg.validate(4)
    msg = str(e.value)
    assert "4 x 4 = 16" in msg and "24 % 16 = 8" in msg


def test_validate_micro_batch_must_be_positive():
    with pytest.raises(ValueError, match="micro_batch_size=0"):
        moe_cfg(micro_batch_size=0).validate(1)


def test_validate_tp_and_ep_must_divide_world():
    cfg = moe_cfg()
    cfg.parallel.tp = 4
    with pytest.raises(ValueError) as e:
        cfg.validate(6)
    assert "tensor-parallel size 4 does not divide world size 6" in str(e.value)
    assert "6 % 4 = 2" in str(e.value)
    cfg = moe_cfg()
    cfg.parallel.ep = 4
    with pytest.raises(ValueError) as e:
        cfg.validate(6)
    assert "expert-parallel size 4 does not divide world size 6" in str(e.value)
    assert "6 % 4 = 2" in str(e.value)


def test_validate_experts_divisible_by_ep():
    cfg = moe_cfg()
    cfg.model.moe.num_experts = 6
    cfg.parallel.ep = 4
    with pytest.raises(ValueError) as e:
        cfg.validate(4)
    assert "num_experts 6 is not divisible by expert-parallel size 4" in str(e.value)
    assert "6 % 4 = 2" in str(e.value)


def test_validate_heads_divisible_by_tp():
    cfg = RunConfig(model=ModelConfig(hidden_size=96, num_attention_heads=6, ffn_hidden_size=384))
    cfg.parallel.tp = 4
    with pytest.raises(ValueError) as e:
        cfg.validate(4)
    assert "num_attention_heads 6 is not divisible by tensor-parallel size 4" in str(e.value)
    assert "6 % 4 = 2" in str(e.value)


def test_validate_zero3_with_moe_names_stages_1_and_2():
    cfg = moe_cfg(zero_stage=3)
    with pytest.raises(ValueError) as e:
        cfg.validate(1)
    msg = str(e.value)
    assert "ZeRO-3" in msg and "zero_stage=1 or 2" in msg
    dense = RunConfig(model=ModelConfig(moe=None))
    dense.train.zero_stage = 3
    dense.validate(1)  # dense models may use ZeRO-3


def test_validate_seq_len_within_max_seq_len():
    cfg = moe_cfg(seq_len=256)
    with pytest.raises(ValueError, match="seq_len 256 exceeds model.max_seq_len 128"):
        cfg.validate(1)


def test_validate_sequence_parallel_needs_seq_len_divisible_by_tp():
    cfg = moe_cfg(seq_len=66)
    cfg.parallel.tp = 4
    cfg.parallel.sequence_parallel = True
    with pytest.raises(ValueError) as e:
        cfg.validate(4)
    assert "66 % 4 = 2" in str(e.value)
    cfg.train.seq_len = 64
    cfg.validate(4)


@pytest.mark.parametrize("field, value, needle", [
    ("precision", "fp8", "train.precision='fp8'"),
    ("zero_stage", 4, "train.zero_stage=4"),
    ("lr_decay_style", "step", "train.lr_decay_style='step'"),
    ("train_steps", 0, "train.train_steps=0"),
])
def test_validate_choices(field, value, needle):
    cfg = moe_cfg(**{field: value})
    with pytest.raises(ValueError) as e:
        cfg.validate(1)
    assert needle in str(e.value)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_validate_accepts_valid_precisions(precision):
    moe_cfg(precision=precision, zero_stage=2).validate(2)


# ---------------------------------------------------------------------- CLI (no process group started)
@pytest.fixture(scope="module")
def cli():
    """Both CLI runs start at once (each pays the torch import); {name: (returncode, stdout, stderr)}."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    runs = {"print": ["--print-config", "--train.lr=0.5", "--train.min_lr=3e-5", "--model.moe.num_heads=2"],
            "unknown": ["--print-config", "--train.nonsense=1"]}
    procs = {name: subprocess.Popen([sys.executable, "-m", "megatron_mhmoe.train", *args], cwd=REPO, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in runs.items()}
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        out[name] = (p.returncode, stdout, stderr)
    return out


def test_cli_print_config_applies_overrides(cli):
    code, stdout, stderr = cli["print"]
    assert code == 0, stderr
    cfg = json.loads(stdout)
    assert cfg["train"]["lr"] == 0.5
    assert cfg["train"]["min_lr"] == pytest.approx(3e-5)
    assert cfg["model"]["moe"]["num_heads"] == 2


def test_cli_unknown_key_exits_2(cli):
    code, stdout, stderr = cli["unknown"]
    assert code == 2
    assert "unknown key" in stderr and "nonsense" in stderr
    assert "Traceback" not in stderr and stdout == ""


@pytest.mark.parametrize("bad", ["--train.lr=[1,2", "--train=5"])
def test_main_malformed_override_exits_2(bad, capsys):
    import torch.distributed as dist

    from megatron_mhmoe.train import main
    assert main(["--print-config", bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error:")
    assert not dist.is_initialized()


# ---------------------------------------------------------------------- DeepSpeed file vs run config
def test_ds_config_disagreements_are_all_named_in_one_error():
    """One message lists every disagreement (so one fix-up round, not one per launch), each with its fix."""
    from megatron_mhmoe.runtime.run_config import check_ds_config_agrees
    ds = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}, "bf16": {"enabled": True}}
    with pytest.raises(ValueError) as e:
        check_ds_config_agrees(moe_cfg(zero_stage=1), ds, "ds.json")
    msg = str(e.value)
    assert msg.startswith("DeepSpeed config ds.json disagrees with the run config")
    for fix in ("--train.zero_stage=2", "--train.precision=bf16", "--train.offload_optimizer=true"):
        assert fix in msg, msg
    cfg = moe_cfg(zero_stage=2, precision="bf16", offload_optimizer=True)
    assert check_ds_config_agrees(cfg, ds, "ds.json") == []
    assert check_ds_config_agrees(cfg, {"zero_optimization": {"stage": 2.0}}, "ds.json") == []


def test_ds_config_batch_clip_and_sections_are_errors_naming_both_values():
    """The run config is the source of truth: a DeepSpeed value that differs, or a section the program does
    not use, is refused (never a warning followed by a silent override); the same values are fine."""
    from megatron_mhmoe.runtime.run_config import check_ds_config_agrees
    cfg = moe_cfg(micro_batch_size=2, grad_accum_steps=2, clip_grad=0.5)
    cfg.parallel.ep = 2
    cfg.validate(2)  # global = 2 x 2 x 2 = 8
    same = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
            "gradient_clipping": 0.5}
    assert check_ds_config_agrees(cfg, same, "ds.json") == []
    ds = {"train_batch_size": 999, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
          "gradient_clipping": 1.0, "optimizer": {"type": "Adam"}, "scheduler": {"type": "WarmupLR"}}
    with pytest.raises(ValueError) as e:
        check_ds_config_agrees(cfg, ds, "ds.json")
    msg = str(e.value)
    for part in ("train_batch_size=999 but train.global_batch_size=8", "--train.global_batch_size=999",
                 "train_micro_batch_size_per_gpu=4 but train.micro_batch_size=2",
                 "gradient_accumulation_steps=1 but train.grad_accum_steps=2",
                 "gradient_clipping=1 but train.clip_grad=0.5", "remove train_batch_size from the file",
                 "an 'optimizer' section", "set train.lr, train.weight_decay", "a 'scheduler' section",
                 "train.warmup_steps, train.lr_decay_style"):
        assert part in msg, (part, msg)
    assert "\n" not in msg


@pytest.mark.parametrize("value, want", [
    ("/x/prefix", ["/x/prefix"]),  # one prefix, as Megatron's --data-path takes it
    ("0.7 /x/a 0.3 /x/b", ["0.7", "/x/a", "0.3", "/x/b"]),  # Megatron's blend string
    ("[/x/prefix]", ["/x/prefix"]),  # the list form still works
])
def test_data_path_accepts_a_prefix_string(value, want):
    from megatron_mhmoe.data.blend import parse_blend
    cfg = RunConfig.from_dict(apply_overrides({}, [f"--data.data_path={value}"]))
    assert cfg.data.data_path == want
    prefixes, _ = parse_blend(cfg.data.data_path)
    assert prefixes == [p for p in want if p.startswith("/")]
