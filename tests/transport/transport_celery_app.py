"""A minimal Celery app for the transport tests, configured by environment variables.

Workers run it as ``celery -A tests.transport.transport_celery_app worker``; tests build the
same app in-process with :func:`make_app` to publish. Tasks record what happened in the SQLite
file named by ``OT_EVENTS_DB`` (one row per execution), so a test can see duplicates and losses.

* ``OT_BROKER_URL``, ``OT_BROKER_TRANSPORT`` (optional ``module:Class``),
  ``OT_TRANSPORT_OPTIONS`` (JSON), ``OT_EVENTS_DB``, ``OT_READY_FILE`` (written when ready).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from celery import Celery, Task, signals

import offload.transport
from offload.transport.sqlite import add_dead_letter_listener

offload.transport.register()

EVENTS_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS runs (task_id TEXT, tag TEXT, pid INTEGER, started REAL, "
    "finished REAL, redelivered INTEGER)",
    "CREATE TABLE IF NOT EXISTS dead (queue TEXT, task_id TEXT, reason TEXT, at REAL, pid INTEGER)",
)


def events_db(path: str | os.PathLike[str]) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    for statement in EVENTS_SCHEMA:
        db.execute(statement)
    return db


def make_app(
    broker_url: str,
    transport: str | None = None,
    transport_options: dict[str, Any] | None = None,
) -> Celery:
    app = Celery("offload_transport_tests", set_as_current=False)
    app.conf.update(
        broker_url=broker_url,
        broker_transport=transport,
        broker_transport_options=transport_options or {},
        broker_connection_retry_on_startup=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        worker_hijack_root_logger=True,
        worker_lost_wait=1.0,  # billiard's 10 s wait for a dead child's result slows the tests
    )
    app.task(bind=True, name="t.record")(record)
    app.task(bind=True, name="t.crash")(crash)
    return app


def _events() -> sqlite3.Connection:
    return events_db(os.environ["OT_EVENTS_DB"])


def record(self: Task[Any, Any], tag: str, seconds: float = 0.0, busy: bool = False) -> None:
    """Record a start row, run for `seconds` (sleeping, or spinning the CPU if `busy`), finish."""
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    db = _events()
    started = time.time()
    row = db.execute(
        "INSERT INTO runs VALUES (?, ?, ?, ?, NULL, ?)",
        (self.request.id, tag, os.getpid(), started, int(redelivered)),
    ).lastrowid
    end = started + seconds
    while time.time() < end:
        if not busy:
            time.sleep(min(0.05, end - time.time()))
    db.execute("UPDATE runs SET finished = ? WHERE rowid = ?", (time.time(), row))
    db.close()


def crash(self: Task[Any, Any], tag: str) -> None:
    """Record a start row, then die the way a segfault or the OOM killer would."""
    db = _events()
    db.execute(
        "INSERT INTO runs VALUES (?, ?, ?, ?, NULL, ?)",
        (self.request.id, tag, os.getpid(), time.time(), 0),
    )
    db.close()
    os._exit(13)


app = make_app(
    os.environ.get("OT_BROKER_URL", "memory://"),
    os.environ.get("OT_BROKER_TRANSPORT") or None,
    json.loads(os.environ.get("OT_TRANSPORT_OPTIONS") or "{}"),
)


def _record_dead_letter(queue: str, payload: dict[str, Any], reason: str) -> None:
    headers = payload.get("headers") or {}
    db = _events()
    db.execute(
        "INSERT INTO dead VALUES (?, ?, ?, ?, ?)",
        (queue, headers.get("id"), reason, time.time(), os.getpid()),
    )
    db.close()


if os.environ.get("OT_EVENTS_DB"):
    add_dead_letter_listener(_record_dead_letter)


@signals.worker_ready.connect
def _ready(**_: Any) -> None:
    ready = os.environ.get("OT_READY_FILE")
    if ready:
        Path(ready).write_text(str(os.getpid()))
