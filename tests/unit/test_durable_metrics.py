"""The durable lane counts its runs like the inline lane: `offload_runs_total` and
`offload_run_duration_seconds`, labelled `lane="durable"`, in the process that ran the attempt.

The attempt runs through the worker's real executor, in this process, on real SQLite files
(ledger and broker); only Celery's consumer loop is left out, so the counters can be read here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from offload import Offload, RunFailedError, RunState


class Clock:
    """The app's clock, moved by the test: a retry's backoff passes at once."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def jobs(tmp_path: Path, clock: Clock) -> Iterator[Offload]:
    jobs = Offload(data_dir=tmp_path, clock=clock)
    jobs.ledger.ensure_schema()
    yield jobs
    jobs.close()


def _runs(task: str, state: RunState) -> float:
    labels = {"task": task, "lane": "durable", "state": state.value}
    return REGISTRY.get_sample_value("offload_runs_total", labels) or 0.0


def _timed(task: str) -> float:
    labels = {"task": task, "lane": "durable"}
    return REGISTRY.get_sample_value("offload_run_duration_seconds_count", labels) or 0.0


def test_durable_runs_are_counted_by_final_state(jobs: Offload, clock: Clock) -> None:
    @jobs.task(name="metrics_charge")
    def charge(cents: int) -> int:
        if cents < 0:
            raise ValueError("card declined")
        return cents

    @jobs.task(name="metrics_flaky", retries=1)
    def flaky() -> None:
        raise ConnectionError("provider down")

    before = {
        "ok": _runs("metrics_charge", RunState.SUCCESS),
        "failed": _runs("metrics_charge", RunState.FAILURE),
        "flaky": _runs("metrics_flaky", RunState.FAILURE),
        "timed": _timed("metrics_charge"),
    }
    execute = jobs.durable.executor.execute

    paid = charge.defer_sync(cents=250)
    execute(charge, paid.id, {"cents": 250})
    assert paid.result_sync(timeout=5) == 250

    declined = charge.defer_sync(cents=-1)
    execute(charge, declined.id, {"cents": -1})
    with pytest.raises(RunFailedError, match="card declined"):
        declined.result_sync(timeout=5)

    assert _runs("metrics_charge", RunState.SUCCESS) == before["ok"] + 1
    assert _runs("metrics_charge", RunState.FAILURE) == before["failed"] + 1
    assert _timed("metrics_charge") == before["timed"] + 2

    # A failure that will be tried again is not a finished run; the last try is.
    run = flaky.defer_sync()
    execute(flaky, run.id, {})
    assert run.status_sync().state is RunState.RETRY
    assert _runs("metrics_flaky", RunState.FAILURE) == before["flaky"]
    clock.now += 600  # past the backoff: the redelivery runs the second try
    execute(flaky, run.id, {})
    assert run.status_sync().state is RunState.FAILURE
    assert _runs("metrics_flaky", RunState.FAILURE) == before["flaky"] + 1
