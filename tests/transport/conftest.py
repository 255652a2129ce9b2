"""Real `celery worker` processes on a broker of the test's own, and what their tasks recorded."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple

import pytest
from celery import Celery

from tests.support import REDIS_HOST, REDIS_PORT, ROOT, require, wait_until
from tests.transport.transport_celery_app import events_db, make_app

APP_MODULE = "tests.transport.transport_celery_app"


class Run(NamedTuple):
    task_id: str
    tag: str
    pid: int
    started: float
    finished: float | None
    redelivered: bool


class Worker:
    """One `celery -A … worker` in its own session; killed by process group, never by name."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path, ready: Path) -> None:
        self.process = process
        self.log_path = log_path
        self.ready_file = ready
        self._log: IO[bytes] | None = None

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                pytest.fail(f"worker exited with {self.process.returncode}:\n{self.log()}")
            return self.ready_file.exists()

        wait_until(ready, timeout, "the worker to be ready")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill9(self) -> float:
        """SIGKILL the worker's whole process group (a crash); return when it happened."""
        at = time.time()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        return at

    def close(self) -> None:
        if self.alive:
            self.kill9()
        if self._log is not None:
            self._log.close()


class Harness:
    """A broker, the workers on it, a producer app, and the events their tasks record."""

    def __init__(self, directory: Path, url: str, transport: str | None, options: dict[str, Any]):
        self.directory = directory
        self.url, self.transport, self.options = url, transport, options
        self.events_path = directory / "events.sqlite"
        events_db(self.events_path).close()
        self.workers: list[Worker] = []
        self._app: Celery | None = None

    @property
    def app(self) -> Celery:
        if self._app is None:
            self._app = make_app(self.url, self.transport, self.options)
        return self._app

    def start_worker(self, pool: str = "solo", concurrency: int = 1, wait: bool = True) -> Worker:
        n = len(self.workers) + 1
        log_path = self.directory / f"worker{n}.log"
        ready = self.directory / f"worker{n}.ready"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "OT_BROKER_URL": self.url,
            "OT_BROKER_TRANSPORT": self.transport or "",
            "OT_TRANSPORT_OPTIONS": json.dumps(self.options),
            "OT_EVENTS_DB": str(self.events_path),
            "OT_READY_FILE": str(ready),
        }
        command = [
            sys.executable, "-m", "celery", "-A", APP_MODULE, "worker",
            "-P", pool, "-c", str(concurrency), "-n", f"w{n}-{uuid.uuid4().hex[:6]}@%h",
            "--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        log = open(log_path, "ab")  # noqa: SIM115 - closed by Worker.close()
        process = subprocess.Popen(
            command,
            env=env,
            cwd=self.directory,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        worker = Worker(process, log_path, ready)
        worker._log = log
        self.workers.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    def send(self, tag: str, seconds: float = 0.0, busy: bool = False, **options: Any) -> str:
        result = self.app.send_task("t.record", args=[tag, seconds, busy], **options)
        return str(result.id)

    def runs(self, tag: str) -> list[Run]:
        db = events_db(self.events_path)
        try:
            rows = db.execute(
                "SELECT task_id, tag, pid, started, finished, redelivered FROM runs "
                "WHERE tag = ? ORDER BY started",
                (tag,),
            ).fetchall()
        finally:
            db.close()
        return [Run(r[0], r[1], r[2], r[3], r[4], bool(r[5])) for r in rows]

    def dead(self) -> list[tuple[str, str, str]]:
        db = events_db(self.events_path)
        try:
            return db.execute("SELECT queue, task_id, reason FROM dead").fetchall()
        finally:
            db.close()

    def wait_finished(self, tag: str, timeout: float, count: int = 1) -> list[Run]:
        def finished() -> list[Run] | None:
            runs = self.runs(tag)
            return runs if sum(r.finished is not None for r in runs) >= count else None

        result: list[Run] = wait_until(finished, timeout, f"{count} finished run(s) of {tag!r}")
        return result

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
        if self._app is not None:
            self._app.close()


HarnessFactory = Callable[..., Harness]


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[HarnessFactory]:
    """`harness(url, transport=None, **transport_options)`; workers die with the test."""
    created: list[Harness] = []

    def make(url: str, transport: str | None = None, **options: Any) -> Harness:
        made = Harness(tmp_path, url, transport, options)
        created.append(made)
        return made

    yield make
    for made in created:
        made.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'broker.sqlite'}"


def broker_rows(url: str) -> list[tuple[Any, ...]]:
    """(id, queue, deliveries, lease_until, owner) of every message in a SQLite broker."""
    db = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=30)
    try:
        return db.execute(
            "SELECT id, queue, deliveries, lease_until, owner FROM messages ORDER BY id"
        ).fetchall()
    finally:
        db.close()


class RedisBroker(NamedTuple):
    url: str
    prefix: str


@pytest.fixture
def redis_broker() -> Iterator[RedisBroker]:
    """Redis on the shared server, isolated by a key prefix; only our keys are deleted after."""
    import redis

    require("Redis", REDIS_HOST, REDIS_PORT)
    prefix = f"offload-test-{uuid.uuid4().hex[:12]}:"
    yield RedisBroker(f"redis://{REDIS_HOST}:{REDIS_PORT}/0", prefix)
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=0)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
