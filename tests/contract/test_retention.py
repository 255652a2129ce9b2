"""Retention, as the workers run it: finished runs older than `retention_s` and dead runs
older than `dead_retention_s` are deleted, while new runs are deferred, and nothing else is.

Real worker processes on the SQLite broker, both ledgers; the windows are seconds long so that
the test sees them pass.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from offload import RunFilter, RunNotFoundError, RunState
from tests.contract.conftest import LEDGERS, Durable, world_at
from tests.support import broker_of, ledger_url, wait_until

RETENTION_S = 3.0
DEAD_RETENTION_S = 8.0


@pytest.fixture(params=LEDGERS, ids=lambda ledger: f"sqlite-broker/{ledger}-ledger")
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Durable]:
    with (
        broker_of("sqlite", tmp_path) as broker,
        ledger_url(request.param, tmp_path) as l_url,
        world_at(
            "sqlite",
            request.param,
            broker.url,
            l_url,
            tmp_path,
            OFFLOAD_RETENTION_S=str(RETENTION_S),
            OFFLOAD_DEAD_RETENTION_S=str(DEAD_RETENTION_S),
            OFFLOAD_RETENTION_INTERVAL_S="0.2",
        ) as world,
    ):
        world.worker.start().wait_ready()
        yield world


def exists(world: Durable, run_id: str) -> bool:
    try:
        world.jobs.status_sync(run_id)
    except RunNotFoundError:
        return False
    return True


def test_retention_deletes_old_finished_runs_and_nothing_else(world: Durable) -> None:
    add, charge = world.task("add"), world.task("charge")
    done = [add.defer_sync(a=i, b=1) for i in range(5)]
    dead = charge.defer_sync(order_id=1, cents=-1)
    later = add.options(delay=3600).defer_sync(a=0, b=0)  # waits an hour: never finished
    cancelled = add.options(delay=3600).defer_sync(a=9, b=9)
    cancelled.cancel_sync()
    for run in done:
        assert run.result_sync(timeout=30) is not None
    wait_until(lambda: dead.status_sync().dead, 30, "the charge to die")

    # Meanwhile the app keeps deferring: every one of these must survive its own window.
    deferred: list[tuple[float, str]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def keep_deferring() -> None:
        while not stop.is_set():
            try:
                deferred.append((time.time(), add.defer_sync(a=1, b=2).id))
            except BaseException as exc:  # noqa: BLE001 - reported by the test below
                errors.append(exc)
                return
            time.sleep(0.02)

    deferrer = threading.Thread(target=keep_deferring)
    deferrer.start()
    try:
        wait_until(
            lambda: not any(exists(world, r.id) for r in [*done, cancelled]),
            RETENTION_S + 15,
            "retention to delete the finished runs",
        )
        # The dead run has a longer window: it is still there, and so is the waiting one.
        assert exists(world, dead.id)
        assert world.jobs.status_sync(later.id).state is RunState.PENDING
        wait_until(lambda: not exists(world, dead.id), DEAD_RETENTION_S + 15, "the dead run to go")
    finally:
        stop.set()
        deferrer.join()
    assert errors == []
    assert exists(world, later.id)
    # A run deferred within the window, finished or not, is still there.
    recent = [run_id for at, run_id in deferred if at > time.time() - RETENTION_S + 1.0]
    assert len(recent) > 10
    assert all(exists(world, run_id) for run_id in recent)
    # Older ones finished long before the window and are gone.
    old = [run_id for at, run_id in deferred if at < time.time() - RETENTION_S - 2.0]
    assert len(old) > 10
    assert not any(exists(world, run_id) for run_id in old)
    assert world.jobs.count_runs_sync(RunFilter(states=(RunState.FAILURE,))) == {}
