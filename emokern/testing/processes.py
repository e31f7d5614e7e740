"""Killing a child process mid-run, for the tests that prove a run killed with SIGKILL resumes to the uninterrupted
result: :func:`sigkill_when`."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

__all__ = ["sigkill_when"]


def sigkill_when(process: subprocess.Popen, ready: Callable[[], bool], *, what: str, timeout_s: float = 120,
                 log: Optional[Path] = None) -> None:
    """Wait until ``ready()`` is true (checked every 20 ms), then send ``process`` SIGKILL and reap it.

    Raises AssertionError when the process ends before ``ready()`` (the message holds ``log``'s text, the child's
    output, when given), when ``timeout_s`` seconds pass first (``"no {what} after {timeout_s} s"``), or when the
    process did not die of the SIGKILL.
    """
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert process.poll() is None, (f"the child ended before any {what}:\n"
                                        f"{log.read_text() if log is not None else '(no log)'}")
        assert time.monotonic() < deadline, f"no {what} after {timeout_s:g} s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, f"the child ended with {process.returncode}, not by SIGKILL"
