"""Offline checkpoint tools' logic, without processes or a model: read, verify, gather and re-shard a saved
checkpoint (consolidate) and convert it to another parallel layout (reshard). Saving and resuming during
training stay in runtime/checkpoint.py and runtime/universal.py."""
