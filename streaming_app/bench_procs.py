"""The processes ``streaming_bench`` starts, and the CPU they use.

:class:`Children` is the one owner of every child process (redis-server, the Daphne workers,
the producers): whatever ends the benchmark (its end, an exception, Ctrl-C, SIGTERM), its
``close()`` in a ``finally`` stops them all, SIGKILL after a grace period, so none outlives it.
CPU time is read from ``/proc/<pid>/stat`` (utime + stime), as ``top`` does.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Sequence
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used so far (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
        # The command name (field 2) may hold spaces and parentheses: split after its ')'.
        fields = stat.read().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / CLOCK_TICKS


def stop(process: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM, and SIGKILL if ``process`` has not exited after ``grace`` seconds; reaped."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait(30)  # after SIGKILL: only a process stuck in the kernel takes this long
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):  # a pipe to a dead process: nothing to flush to
                stream.close()


class Children:
    """Every child process of the benchmark, started through :meth:`start`; :meth:`close`
    ends all that are still running."""

    def __init__(self, grace: float = 10.0) -> None:
        self.grace = grace
        self._processes: list[subprocess.Popen[Any]] = []

    def start(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen(args, **kwargs)``, owned by this registry."""
        process: subprocess.Popen[Any] = subprocess.Popen(args, **kwargs)
        self._processes.append(process)
        return process

    def stop(self, process: subprocess.Popen[Any]) -> None:
        """Stop one child now (SIGTERM, SIGKILL after the grace period)."""
        try:
            stop(process, self.grace)
        finally:
            if process in self._processes:
                self._processes.remove(process)

    def close(self) -> None:
        """Stop every child still running: SIGTERM to all at once, then SIGKILL to any still
        there after the grace period."""
        processes, self._processes = self._processes, []
        for process in processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + self.grace
        for process in processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
        for process in processes:
            stop(process, 0)  # reaps, closes pipes; SIGKILLs anything that is still there

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
