"""The apps the benchmarks run: an offload app and a raw Celery app, configured by BENCH_* env.

Both tasks do the same thing: one datagram to the benchmark's collector, saying when the task
body started. Everything else (ledger writes, result storage) is what each system does.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

from celery import Celery

from offload import Offload

COLLECTOR = os.environ.get("BENCH_COLLECTOR", "")
_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
# Never block a task on a collector that is not reading (throughput phases count results).
_sock.setblocking(False)


def notify(tag: str) -> None:
    """Tell the collector that the run tagged `tag` started its body, and when."""
    if COLLECTOR:
        with contextlib.suppress(BlockingIOError, FileNotFoundError, ConnectionRefusedError):
            _sock.sendto(f"{tag} {time.time():.6f}".encode(), COLLECTOR)


jobs = Offload()


@jobs.task
def noop(tag: str) -> None:
    notify(tag)


def _raw_celery() -> Celery:
    app = Celery("bench_raw", set_as_current=False)
    app.conf.update(
        broker_url=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/14"),
        result_backend=os.environ.get("BENCH_RESULT_URL") or None,
        task_ignore_result=not os.environ.get("BENCH_RESULT_URL"),
        task_acks_late=True,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    if os.environ.get("BENCH_TUNED"):
        app.conf.update(worker_prefetch_multiplier=1, task_reject_on_worker_lost=True)

    @app.task(name="raw_noop", shared=False)
    def raw_noop(tag: str) -> None:
        notify(tag)

    return app


raw_celery = _raw_celery()
