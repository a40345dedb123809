"""Worker functions for pool tests; spawned workers import them by module path."""

from __future__ import annotations

import os
import signal
import time


def double_or_die(job: int) -> int:
    """Doubles the job; job -1 kills its own worker (as a segfaulting codec would), job -2 hangs."""
    if job == -1:
        os.kill(os.getpid(), signal.SIGKILL)
    if job == -2:
        time.sleep(3600)
    return job * 2


def allocate(megabytes: int) -> int:
    """Fills ``megabytes`` of memory (an item that needs more than its worker may have) and returns its size."""
    import numpy as np

    return int(np.ones(megabytes << 20, np.uint8).sum()) >> 20


def decode_and_peak_rss(job):
    """Decodes one job in this worker and returns the result with the worker's peak resident memory in bytes.

    VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a worker spawned from a big parent (a long pytest
    session) would report the parent's resident size from the moment it forked."""
    from asr_assets.media import decode_media

    result = decode_media(job)
    with open("/proc/self/status") as f:
        hwm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return result, hwm_kb * 1024
