"""Raw Celery with offload's guarantees (acks late, results stored), otherwise its defaults.

`celery -A bench.peers_apps.celery_app worker -P prefork -c 2`; `BENCH_BROKER_URL` and
`BENCH_RESULT_URL` choose the broker and the result backend.
"""

from __future__ import annotations

import os

from celery import Celery

import offload.transport
from bench.peers_apps.common import notify

offload.transport.register()  # the raw app may use offload's embedded `sqlite://` broker too

app = Celery("bench_peers", set_as_current=False)
app.conf.update(
    broker_url=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/10"),
    result_backend=os.environ.get("BENCH_RESULT_URL", "redis://127.0.0.1:6379/11"),
    task_acks_late=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="noop", shared=False)
def noop(tag: str) -> str:
    return notify(tag)
