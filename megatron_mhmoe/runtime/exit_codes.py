"""Exit codes of `python -m megatron_mhmoe.train` (and of the launch scripts, which pass them on)."""

EXIT_OK = 0
"""Training finished (or there was nothing left to train)."""
EXIT_ERROR = 1
"""An error while training: one `[rank R] error: ...` line on stderr."""
EXIT_CONFIG = 2
"""A config or data error, found before any process group forms, or the run folder is in use by another run
(its lock names the other run's host, pid and start time)."""
EXIT_NONFINITE = 3
"""train.max_nonfinite_steps non-finite steps in a row; the last good checkpoint is kept."""
EXIT_PEER_FAILURE = 4
"""A collective failed or timed out (a peer rank died or is stuck), or the process group could not form."""
EXIT_CHECKPOINT_WRITE = 5
"""A checkpoint could not be written: train.save_dir is not writable, lacks the free space for one checkpoint or
is not shared between nodes (found before step 1), or a write failed mid-save (ENOSPC, EROFS, EIO). The previous
checkpoint stays `latest` and the partial folder is removed; fix the storage and relaunch to resume."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (SIGINT): one line, the run-folder lock released; relaunching resumes from the last checkpoint."""
