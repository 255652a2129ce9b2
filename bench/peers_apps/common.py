"""What every benchmark task does: tell the collector when its body started."""

from __future__ import annotations

import contextlib
import os
import socket
import time

COLLECTOR = os.environ.get("BENCH_COLLECTOR", "")
_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
# Never block a task on a collector that is not reading (throughput phases count results).
_sock.setblocking(False)


def notify(tag: str) -> str:
    """Send `tag` and the current time to the collector; return `tag` (the task's result)."""
    if COLLECTOR:
        with contextlib.suppress(BlockingIOError, FileNotFoundError, ConnectionRefusedError):
            _sock.sendto(f"{tag} {time.time():.6f}".encode(), COLLECTOR)
    return tag
