"""The contract suite's world: every broker x every ledger, each with real worker processes."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from offload import Offload, Task
from tests.apps import contract
from tests.support import WorkerProcess, broker_of, ledger_url

BROKERS = ["sqlite", "redis", "rabbitmq"]
LEDGERS = ["sqlite", "postgres"]
COMBOS = [(b, le) for le in LEDGERS for b in BROKERS]

# Short windows so that crash recovery is observable in seconds.
FAST_RECOVERY = {
    "OFFLOAD_VISIBILITY_TIMEOUT_S": "2",
    "OFFLOAD_HEARTBEAT_INTERVAL_S": "0.5",
    "OFFLOAD_STALE_AFTER_S": "3",
    "OFFLOAD_PROGRESS_INTERVAL_S": "0",
    "OFFLOAD_CANCEL_GRACE_S": "1",
    "OFFLOAD_ORPHAN_AFTER_S": "4",
    "OFFLOAD_WORKER_PROCESSES": "2",
    "OFFLOAD_WORKER_THREADS": "4",
    "OFFLOAD_WORKER_CPU_PROCESSES": "2",
}


@dataclass
class Durable:
    """One broker + ledger pair, an in-process Offload for deferring, and its worker."""

    broker: str
    ledger: str
    jobs: Offload
    env: dict[str, str]
    data_dir: Path
    worker: WorkerProcess

    def task(self, name: str) -> Task[Any, Any]:
        return self.jobs.tasks[name]

    def new_worker(self, name: str) -> WorkerProcess:
        """A second worker process on the same broker and ledger (stopped by the caller)."""
        return WorkerProcess("tests.apps.contract:jobs", self.env, self.data_dir / f"{name}.log")


@contextlib.contextmanager
def world_at(
    broker: str,
    ledger: str,
    b_url: str,
    l_url: str,
    data_dir: Path,
    broker_options: dict[str, Any] | None = None,
    **overrides: str,
) -> Iterator[Durable]:
    """The contract app on these URLs: an in-process Offload and a (not started) worker."""
    settings = {**FAST_RECOVERY, **overrides}
    env = {
        "OFFLOAD_BROKER_URL": b_url,
        "OFFLOAD_BROKER_OPTIONS": json.dumps(broker_options or {}),
        "OFFLOAD_LEDGER_URL": l_url,
        "OFFLOAD_DATA_DIR": str(data_dir),
        **settings,
    }
    jobs = contract.build(
        broker_url=b_url,
        broker_options=broker_options or {},
        ledger_url=l_url,
        data_dir=data_dir,
        **{k.removeprefix("OFFLOAD_").lower(): v for k, v in settings.items()},
    )
    worker = WorkerProcess("tests.apps.contract:jobs", env, data_dir / "worker.log")
    try:
        yield Durable(broker, ledger, jobs, env, data_dir, worker)
    finally:
        worker.stop()
        jobs.close()


@contextlib.contextmanager
def durable_world(broker: str, ledger: str, data_dir: Path) -> Iterator[Durable]:
    """The contract app on a broker and a ledger of the caller's own."""
    with broker_of(broker, data_dir) as endpoint, ledger_url(ledger, data_dir) as l_url:
        # Both on SQLite: one file, as by default (each defer writes its run and message in
        # one transaction); tests/faults keep them apart, the other supported layout.
        b_url = l_url if broker == ledger == "sqlite" else endpoint.url
        with world_at(broker, ledger, b_url, l_url, data_dir, endpoint.options) as world:
            yield world


@pytest.fixture(scope="module", params=COMBOS, ids=lambda c: f"{c[0]}-broker/{c[1]}-ledger")
def durable(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Durable]:
    """A shared world whose worker runs for the whole module (per broker x ledger)."""
    broker, ledger = request.param
    data_dir = tmp_path_factory.mktemp(f"{broker}-{ledger}")
    with durable_world(broker, ledger, data_dir) as world:
        world.worker.start().wait_ready()
        yield world


@pytest.fixture(params=COMBOS, ids=lambda c: f"{c[0]}-broker/{c[1]}-ledger")
def isolated(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Durable]:
    """A world of the test's own, for tests that kill or restart its worker (not started)."""
    broker, ledger = request.param
    with durable_world(broker, ledger, tmp_path) as world:
        yield world


@pytest.fixture(params=BROKERS, ids=lambda b: f"{b}-broker/sqlite-ledger")
def per_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Durable]:
    """`isolated` on every broker with the SQLite ledger only: for what the broker and the
    worker processes decide, where PostgreSQL would run the same ledger code again."""
    with durable_world(request.param, "sqlite", tmp_path) as world:
        yield world
