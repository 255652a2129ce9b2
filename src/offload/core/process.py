"""This process among others: who it is, whether another still lives, and how it yields.

An attempt's owner is named `host:pid:start`, where `start` is the process's start time in
clock ticks (`/proc/<pid>/stat`), so a reused pid is never mistaken for the process that
died. Background processes (workers beside an API, the inline lane's CPU processes) yield the
CPU: only their own session autogroup at nice 19, plus nice 19 and `SCHED_IDLE`, kept a
co-located API at 0.96x its idle requests/s and 1.02x its p99 while CPU tasks ran on 2 cores
(`docs/architecture.md`, "The embedded worker yields the CPU").
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
from pathlib import Path

_HOST = socket.gethostname()


def _process_start_ticks(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # Field 22 is the start time; the command name (field 2) may hold spaces.
            return stat.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return "0"


def worker_identity() -> str:
    """`host:pid:start` of this process: names the attempt's owner, survives pid reuse."""
    pid = os.getpid()
    return f"{_HOST}:{pid}:{_process_start_ticks(pid)}"


def is_alive(identity: str) -> bool:
    """False when `identity` names a process on this host that no longer exists.

    A process on another host cannot be checked from here: it counts as alive until its
    heartbeat goes stale.
    """
    host, _, rest = identity.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != _HOST or not pid_text.isdigit():
        return True
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start in ("", "0") or _process_start_ticks(pid) == start


def lower_priority() -> None:
    """Yield the CPU to other processes: own autogroup at nice 19, nice 19, SCHED_IDLE.

    Call in a process started in its own session. Linux-only parts fail quietly elsewhere.
    """
    with contextlib.suppress(OSError):
        # The autogroup is what the kernel shares CPU between; nice alone only weighs tasks
        # inside the group.
        Path("/proc/self/autogroup").write_text("19")
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    if hasattr(os, "SCHED_IDLE"):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask Linux to send `signum` to this process when its parent dies (no orphans)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signum)
