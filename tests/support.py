"""Test support: real services, each test's own slice of them, and real worker processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
RABBIT_HOST, RABBIT_PORT = "127.0.0.1", 5672
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on (right now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def reachable(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


def require(service: str, host: str, port: int) -> None:
    """Skip locally, fail under CI=true, when a service the test needs is down."""
    if reachable(host, port):
        return
    unavailable(f"{service} is not reachable on {host}:{port}; start it (see .ci/run)")


def unavailable(message: str) -> NoReturn:
    """Something the test needs is missing: skip locally, fail under CI=true (`.ci/run`), where
    a skip would hide a machine that the project's scripts failed to set up."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


# offload's tests use Redis database 2 under a key prefix of their own (kombu's
# `global_keyprefix`), and delete their keys afterwards: two test sessions on one machine never
# see each other's keys, and nothing else on the shared server is touched.
REDIS_TEST_DB = 2


@contextlib.contextmanager
def redis_prefix() -> Iterator[tuple[str, dict[str, Any]]]:
    """A Redis URL and transport options that confine the caller to a key prefix of its own."""
    import redis

    require("Redis", REDIS_HOST, REDIS_PORT)
    prefix = f"offload-test-{uuid.uuid4().hex[:12]}:"
    try:
        yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_TEST_DB}", {"global_keyprefix": prefix}
    finally:
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_TEST_DB)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def rabbitmq_vhost() -> Iterator[str]:
    """An AMQP URL on a fresh RabbitMQ vhost of this test's own, deleted afterwards."""
    require("RabbitMQ", RABBIT_HOST, RABBIT_PORT)
    vhost = f"offload-test-{uuid.uuid4().hex[:10]}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A PostgreSQL URL on a fresh database of this test's own, dropped afterwards."""
    import psycopg

    require("PostgreSQL", "127.0.0.1", 5432)
    name = f"offload_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass(frozen=True)
class Broker:
    """A broker that belongs to one test: its URL and the transport options that confine it."""

    url: str
    options: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def broker_of(kind: str, data_dir: Path) -> Iterator[Broker]:
    """A broker of `kind` (sqlite, redis, rabbitmq) that belongs to the caller."""
    if kind == "sqlite":
        yield Broker(f"sqlite:///{data_dir / 'broker.sqlite'}")
    elif kind == "redis":
        with redis_prefix() as (url, options):
            yield Broker(url, options)
    elif kind == "rabbitmq":
        with rabbitmq_vhost() as url:
            yield Broker(url)
    else:
        raise ValueError(kind)


@contextlib.contextmanager
def ledger_url(kind: str, data_dir: Path) -> Iterator[str]:
    """A ledger URL of `kind` (sqlite, postgres) that belongs to the caller."""
    if kind == "sqlite":
        yield f"sqlite:///{data_dir / 'ledger.sqlite'}"
    elif kind == "postgres":
        with postgres_database() as url:
            yield url
    else:
        raise ValueError(kind)


def offload_cli(
    *args: str, env: dict[str, str], cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    """`offload ARGS` as a user types it: a real process with only these OFFLOAD_* settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
    return subprocess.run(
        [sys.executable, "-m", "offload.cli", *args],
        cwd=cwd,
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@dataclass
class WorkerProcess:
    """`offload worker SPEC` (or `offload beat SPEC`) as a real subprocess; stopped (or
    killed) by the test."""

    spec: str
    env: dict[str, str]
    log_path: Path
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    command: str = "worker"  #: or "beat"

    def start(self) -> WorkerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "offload.cli", self.command, self.spec, "-v", *self.extra_args],
            env={**os.environ, **self.env, "PYTHONPATH": str(ROOT)},
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._log = log
        return self

    def descendants(self) -> list[psutil.Process]:
        assert self.process is not None
        with contextlib.suppress(psutil.NoSuchProcess):
            children: list[psutil.Process] = psutil.Process(self.process.pid).children(True)
            return children
        return []

    def consumer_pids(self) -> list[int]:
        """Pids of the Celery consumer processes (children of the supervisor)."""
        assert self.process is not None
        with contextlib.suppress(psutil.NoSuchProcess):
            return [c.pid for c in psutil.Process(self.process.pid).children()]
        return []

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every consumer process has logged `ready.`."""
        assert self.process is not None

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                pytest.fail(f"worker exited with {self.process.returncode}:\n{self.log()}")
            expected = len(self.consumer_pids())
            return expected > 0 and self.log().count(" ready.") >= expected

        wait_until(ready, timeout, "the worker to be ready")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        """SIGKILL the supervisor and every process under it, all at once (a crash)."""
        assert self.process is not None
        self._kill_all()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (warm shutdown); SIGKILL whatever is left after `timeout`."""
        if self.process is None or self.process.poll() is not None:
            return
        descendants = self.descendants()
        self.process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=timeout)
        self._kill_all(descendants)

    def _kill_all(self, known: list[psutil.Process] | None = None) -> None:
        """SIGKILL the supervisor and its descendants (and `known` ones it may have lost)."""
        assert self.process is not None
        kill_and_reap(self.process, [*(known or []), *self.descendants()])
        self._log.close()


def kill_and_reap(process: subprocess.Popen[bytes], descendants: list[psutil.Process]) -> None:
    """SIGKILL `process` and its `descendants` (found while it lived), and reap them all.

    `process` is reaped by its `Popen`, never by psutil: a `Popen` whose child was reaped
    elsewhere believes it still runs and warns at exit.
    """
    others = list({p.pid: p for p in descendants}.values())
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGKILL)
    for other in others:
        with contextlib.suppress(psutil.NoSuchProcess):
            other.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    psutil.wait_procs(others, timeout=10)


@dataclass
class Server:
    """`uvicorn APP` as a subprocess; `url` is its base URL."""

    app: str
    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    _children: list[psutil.Process] = field(default_factory=list)
    host: str = "127.0.0.1"  #: the interface uvicorn binds ("0.0.0.0": every one)

    @property
    def url(self) -> str:
        return f"http://{'127.0.0.1' if self.host == '0.0.0.0' else self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    def start(self) -> Server:
        self.port = free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OFFLOAD_DATA_DIR": str(self.data_dir),
            **self.env,
        }
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                self.app,
                "--host",
                self.host,
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._log = log
        wait_until(self._ready, 30, f"uvicorn {self.app} to answer on {self.url}")
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"uvicorn exited with {self.process.returncode}:\n{self.log()}")
        try:
            httpx.get(f"{self.url}/", timeout=1)  # any answer: uvicorn listens after start-up
        except httpx.TransportError:
            return False
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def descendants(self) -> list[psutil.Process]:
        assert self.process is not None
        with contextlib.suppress(psutil.NoSuchProcess):
            return psutil.Process(self.process.pid).children(recursive=True)
        return []

    def terminate(self) -> None:
        """Send SIGTERM (a graceful shutdown), remembering the children to reap later."""
        assert self.process is not None
        self._children = self.descendants()
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, wait, then SIGKILL the server and whatever it started, each by pid."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout)
        kill_and_reap(self.process, [*self._children, *self.descendants()])
        self._log.close()


class Scrape:
    """One `/metrics` exposition, parsed by prometheus_client (so it must be well-formed)."""

    def __init__(self, text: str) -> None:
        types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
        assert len(types) == len(set(types)), f"a family is exposed twice: {sorted(types)}"
        self.samples = [
            (sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples named `name` whose labels include `labels` (0 if none)."""
        return sum(
            value
            for found, have, value in self.samples
            if found == name and all(have.get(k) == v for k, v in labels.items())
        )

    def labels(self, name: str, key: str) -> set[str]:
        """Every value of label `key` among the samples named `name`."""
        return {have[key] for found, have, _ in self.samples if found == name and key in have}
