"""Raw Celery for `api_isolation.py` mode (e): a prefork worker on Redis, defaults as shipped."""

from __future__ import annotations

import os

from celery import Celery

from bench.isolation_app import cpu_sync

app = Celery(
    "bench-isolation", broker=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/7")
)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@app.task(name="bench.cpu")
def cpu(tag: str, n: int) -> None:
    cpu_sync(tag, n)
