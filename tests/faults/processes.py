"""Processes killed the way an OOM killer or a preempted node kills them: started in their own session, so that
SIGKILL reaches the whole group (the stage and every worker it started) and no handler runs."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable


def start(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def wait_for(process: subprocess.Popen, condition: Callable[[], bool], what: str, timeout: float = 600) -> bool:
    """Poll until ``condition`` holds (True) or the process ends first (False); fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            return False
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:.0f} s"
        time.sleep(0.05)
    return True


def kill_after(process: subprocess.Popen, delay: float) -> bool:
    """SIGKILL the process group ``delay`` seconds from now; True if it was still running then."""
    try:
        process.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return True
