"""Which process runs a job: this process's identity, and whether a recorded one still runs.

A pid alone is reused by the system; with the time its process started (counted within one boot of the
host) it names one process. Where /proc is missing (not Linux), the pid alone is checked.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start) of process `pid` from /proc: its state letter and '<boot id>:<start in clock ticks>'."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except (OSError, IndexError):
        return None
    return fields[0], f"{boot}:{fields[19]}"  # fields 3 (state) and 22 (starttime) of proc(5)


def identity() -> dict[str, str]:
    """This process: host name, pid and start ('' where unknown)."""
    pid = os.getpid()
    stat = _stat(pid)
    return {"host": socket.gethostname(), "pid": str(pid), "start": stat[1] if stat else ""}


def is_running(pid: int, start: str = "") -> bool:
    """Whether process `pid` of this host still runs (not a zombie) and, when `start` is given, is the process
    that started then rather than a later one given the same pid."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    stat = _stat(pid)
    if stat is None:
        return True
    state, started = stat
    return state not in ("Z", "X") and (not start or started == start)
