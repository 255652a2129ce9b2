"""What every benchmark task does: tell the collector when its body started."""

from __future__ import annotations

import contextlib
import os
import socket
import time

COLLECTOR = os.environ.get("BENCH_COLLECTOR", "")
_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
# Never block a task on a collector that is not reading (throughput phases count results).
# A collector that reads all along (bench/http_load.py) asks for a wait instead: a Unix
# datagram socket queues only net.unix.max_dgram_qlen (10) reports, and a drop is a lost sample.
_sock.settimeout(float(os.environ.get("BENCH_COLLECTOR_WAIT_S", "0")))  # 0: never blocks


def notify(tag: str) -> str:
    """Send `tag` and the current time to the collector; return `tag` (the task's result)."""
    if COLLECTOR:
        with contextlib.suppress(OSError):  # full (BlockingIOError, TimeoutError), or gone
            _sock.sendto(f"{tag} {time.time():.6f}".encode(), COLLECTOR)
    return tag
