"""ds_configs/*.json: valid JSON, accepted by DeepSpeed's parser, and the project's rules for them."""
from __future__ import annotations

import copy
import glob
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DS_DIR = os.path.join(ROOT, "ds_configs")
FILES = sorted(glob.glob(os.path.join(DS_DIR, "*.json")))
EXPECTED = {"zero0_fp32.json", "zero1_bf16.json", "zero2_bf16.json", "zero1_fp16.json",
            "zero2_offload_bf16.json", "zero3_bf16_dense.json"}
BATCH_KEYS = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"}
# name -> (stage, precision, offload)
SPEC = {"zero0_fp32.json": (0, "fp32", False), "zero1_bf16.json": (1, "bf16", False),
        "zero2_bf16.json": (2, "bf16", False), "zero1_fp16.json": (1, "fp16", False),
        "zero2_offload_bf16.json": (2, "bf16", True), "zero3_bf16_dense.json": (3, "bf16", False)}


def load(name: str) -> dict:
    with open(os.path.join(DS_DIR, name)) as f:
        return json.load(f)


def test_expected_files_exist_and_are_listed_in_readme():
    assert {os.path.basename(f) for f in FILES} == EXPECTED
    readme = open(os.path.join(DS_DIR, "README.md")).read()
    for name in EXPECTED:
        assert f"`{name}`" in readme


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_project_rules(name):
    cfg = load(name)
    stage, precision, offload = SPEC[name]
    assert isinstance(cfg, dict)
    assert not BATCH_KEYS & set(cfg), "batch fields come from the run config"
    assert "optimizer" not in cfg and "scheduler" not in cfg, "the program builds the optimizer"
    zero = cfg["zero_optimization"]
    assert zero["stage"] == stage
    if stage in (1, 2):  # DeepSpeed's ZeRO-1/2 MoE path asserts both
        assert zero["contiguous_gradients"] is True and zero["reduce_scatter"] is True
    assert cfg["bf16"]["enabled"] is (precision == "bf16")
    assert cfg["fp16"]["enabled"] is (precision == "fp16")
    if precision == "fp16":
        fp16 = cfg["fp16"]
        assert fp16["loss_scale"] == 0, "0 = dynamic loss scaling"
        assert {"initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale"} <= set(fp16)
    assert (zero.get("offload_optimizer", {}).get("device") == "cpu") is offload
    if stage == 3:
        assert "dense" in cfg["_comment"].lower() and "moe" in cfg["_comment"].lower()
    assert all(isinstance(k, str) for k in cfg)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_deepspeed_parser_accepts(name):
    """DeepSpeed's own config class (pydantic, strict inside zero_optimization) with batch fields added."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig
    cfg = load(name)
    cfg.update(train_batch_size=4, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2)
    parsed = DeepSpeedConfig(copy.deepcopy(cfg), mpu=None)
    stage, precision, offload = SPEC[name]
    assert int(parsed.zero_config.stage) == stage
    assert parsed.bfloat16_config.enabled is (precision == "bf16")
    assert parsed.float16_config.enabled is (precision == "fp16")
    if precision == "fp16":
        assert parsed.float16_config.loss_scale == 0
    if stage in (1, 2):
        assert parsed.zero_config.contiguous_gradients and parsed.zero_config.reduce_scatter
    assert (parsed.zero_config.offload_optimizer is not None
            and getattr(parsed.zero_config.offload_optimizer.device, "value",
                                     parsed.zero_config.offload_optimizer.device) == "cpu") is offload


def test_deepspeed_parser_is_strict_inside_zero_section():
    """So a typo in a zero_optimization key of these files would fail the test above."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig
    cfg = load("zero2_bf16.json")
    cfg.update(train_batch_size=1)
    cfg["zero_optimization"]["contiguous_gradient"] = True
    with pytest.raises(Exception, match="contiguous_gradient"):
        DeepSpeedConfig(cfg, mpu=None)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_program_merge_keeps_settings(name):
    """Through the program's build_ds_config (matching run config) the result still parses and keeps ours."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig

    from megatron_mhmoe.runtime.engine import build_ds_config
    from megatron_mhmoe.runtime.run_config import RunConfig
    stage, precision, offload = SPEC[name]
    run = RunConfig()
    run.parallel.ep = 1
    if stage == 3:
        run.model.moe = None
    run.train.zero_stage, run.train.precision, run.train.offload_optimizer = stage, precision, offload
    run.validate(1)
    merged = build_ds_config(run, 1, load(name))
    parsed = DeepSpeedConfig(merged, mpu=None)
    assert int(parsed.zero_config.stage) == stage
    assert parsed.bfloat16_config.enabled is (precision == "bf16")
    if stage in (1, 2):
        assert merged["zero_optimization"]["contiguous_gradients"] and merged["zero_optimization"]["reduce_scatter"]
