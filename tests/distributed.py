"""The multi-process test harness: megatron_mhmoe.parallel.spawn (gloo on loopback, spawned workers)."""
from megatron_mhmoe.parallel.spawn import free_port, run_workers  # noqa: F401
