"""A log of the asynchronous all-to-alls (comm.all_to_all_v_start and the waits on them), for tests that
check what runs while an exchange is in flight."""
from __future__ import annotations

import contextlib

from megatron_mhmoe.parallel import comm


@contextlib.contextmanager
def logged_exchanges(log: list):
    """Appends ("start", i) when exchange i is launched and ("wait", i) when it is first waited on."""
    orig_start, orig_wait = comm.all_to_all_v_start, comm.Pending.wait

    def start(*a, **kw):
        out, pending = orig_start(*a, **kw)
        pending.tag = len(log)
        log.append(("start", pending.tag))
        return out, pending

    def wait(pending):
        if getattr(pending, "tag", None) is not None:
            log.append(("wait", pending.tag))
            pending.tag = None
        orig_wait(pending)

    comm.all_to_all_v_start, comm.Pending.wait = start, wait
    try:
        yield log
    finally:
        comm.all_to_all_v_start, comm.Pending.wait = orig_start, orig_wait
