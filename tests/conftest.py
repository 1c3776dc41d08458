"""Suite-wide marks: `slow` for the test files that launch trainings, exports or many processes.

`make test-fast` runs `pytest -m "not slow"` (under 3 minutes on 2 cores; it still imports and exercises
every subpackage, which tests/test_fast_subset.py checks); `make test` (CI) runs everything.
A single test elsewhere can be marked slow with `@pytest.mark.slow`.
"""
from __future__ import annotations

import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

# Test files that each take more than ~5 s on the 2-core machine (measured with --durations=0).
SLOW_FILES = frozenset({
    "benchmarks/test_a2a_bytes.py", "benchmarks/test_gpu_check.py", "benchmarks/test_moe_two_node.py",
    "data/test_hf_tokenizer.py",
    "launch/test_launch_failures.py",
    "model/test_gpt_parallel.py",
    "moe/test_compile.py", "moe/test_padded_dispatch.py", "moe/test_routing_metrics.py",
    "reliability/test_bad_inputs.py", "reliability/test_checkpoint_dir.py", "reliability/test_export.py",
    "reliability/test_export_hf.py", "reliability/test_faults.py", "reliability/test_numerics.py",
    "reliability/test_reshard.py", "reliability/test_resume_compat.py", "reliability/test_soak.py",
    "reliability/test_zero3.py", "reliability/test_run_lock_launch.py",
    "reliability/test_quantile_reshard_export.py",
    "runtime/test_compile_train.py", "runtime/test_deepspeed_equivalence.py", "runtime/test_device_guard.py", "runtime/test_resume_dropout.py",
    "runtime/test_run_config.py", "runtime/test_sequence_parallel_deepspeed.py", "runtime/test_tensorboard.py",
    "runtime/test_train_launch.py", "runtime/test_wandb_replay.py",
    "scaling/test_cli.py", "scaling/test_runner.py",
    "security/test_secrets.py",
    "tools/test_evaluate.py",
    "test_walkthrough.py",
})


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: left out of `make test-fast` (trainings, exports, many processes)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        rel = os.path.relpath(str(item.fspath), HERE).replace(os.sep, "/")
        if rel in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
