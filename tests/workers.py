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
