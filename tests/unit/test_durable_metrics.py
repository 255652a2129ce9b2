"""The durable lane counts its runs in the ledger: `offload_runs_total{lane="durable"}`,
`offload_run_duration_seconds`, `offload_queue_wait_seconds`, `offload_dead_runs` and
`offload_queue_depth`, read by `jobs.metrics_app()` as Prometheus scrapes it.

The attempts run through the worker's real executor, in this process, on real SQLite files
(ledger and broker); only Celery's consumer loop is left out. The contract suite scrapes a
real server while real worker processes run (tests/contract/test_metrics.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from offload import Offload, RunFailedError, RunState
from tests.support import Scrape, free_port


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


def scrape(jobs: Offload) -> Scrape:
    async def get() -> str:
        transport = httpx.ASGITransport(app=jobs.metrics_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/")
            assert response.headers["content-type"].startswith("text/plain")
            return response.text

    return Scrape(asyncio.run(get()))


def runs(found: Scrape, task: str, state: RunState) -> float:
    return found.value("offload_runs_total", task=task, lane="durable", state=state.value)


def test_durable_runs_are_counted_by_final_state(jobs: Offload, clock: Clock) -> None:
    @jobs.task(name="metrics_charge")
    def charge(cents: int) -> int:
        if cents < 0:
            raise ValueError("card declined")
        return cents

    @jobs.task(name="metrics_flaky", retries=1)
    def flaky() -> None:
        raise ConnectionError("provider down")

    execute = jobs.durable.executor.execute
    empty = scrape(jobs)
    assert empty.value("offload_ledger_up") == 1
    assert empty.value("offload_runs_total", lane="durable") == 0

    paid = charge.defer_sync(cents=250)
    declined = charge.defer_sync(cents=-1)
    clock.now += 2.0  # both waited two seconds in the queue
    assert scrape(jobs).value("offload_queue_depth", queue="default") == 2
    execute(charge, paid.id, {"cents": 250})
    assert paid.result_sync(timeout=5) == 250
    execute(charge, declined.id, {"cents": -1})
    with pytest.raises(RunFailedError, match="card declined"):
        declined.result_sync(timeout=5)

    found = scrape(jobs)
    assert runs(found, "metrics_charge", RunState.SUCCESS) == 1
    assert runs(found, "metrics_charge", RunState.FAILURE) == 1
    timed = {"task": "metrics_charge", "lane": "durable"}
    assert found.value("offload_run_duration_seconds_count", **timed) == 2
    assert found.value("offload_run_duration_seconds_bucket", le="+Inf", **timed) == 2
    waited = {"task": "metrics_charge"}
    assert found.value("offload_queue_wait_seconds_count", **waited) == 2
    assert found.value("offload_queue_wait_seconds_sum", **waited) == pytest.approx(4.0)
    assert found.value("offload_queue_wait_seconds_bucket", le="1.0", **waited) == 0
    assert found.value("offload_queue_wait_seconds_bucket", le="5.0", **waited) == 2
    assert found.value("offload_dead_runs", task="metrics_charge") == 1
    assert found.value("offload_queue_depth") == 0

    # A failure that will be tried again is not a finished run; the last try is.
    run = flaky.defer_sync()
    execute(flaky, run.id, {})
    assert run.status_sync().state is RunState.RETRY
    assert runs(scrape(jobs), "metrics_flaky", RunState.FAILURE) == 0
    clock.now += 600  # past the backoff: the redelivery runs the second try
    execute(flaky, run.id, {})
    assert run.status_sync().state is RunState.FAILURE
    found = scrape(jobs)
    assert runs(found, "metrics_flaky", RunState.FAILURE) == 1
    assert found.value("offload_queue_wait_seconds_count", task="metrics_flaky") == 2
    assert found.value("offload_dead_runs") == 2

    # Cancelled while waiting: counted, but it never ran, so it has no duration.
    waiting = charge.defer_sync(cents=1)
    waiting.cancel_sync()
    found = scrape(jobs)
    assert runs(found, "metrics_charge", RunState.CANCELLED) == 1
    assert found.value("offload_run_duration_seconds_count", **timed) == 2

    # Retention removes old runs; the counters it does not touch.
    clock.now += 40 * 86400
    jobs.durable.expire()
    assert jobs.list_runs_sync().runs == []
    after = scrape(jobs)
    assert runs(after, "metrics_charge", RunState.SUCCESS) == 1
    assert after.value("offload_dead_runs") == 0


def test_a_ledger_that_is_down_still_gets_this_process_series(tmp_path: Path) -> None:
    down = f"postgresql://offload@127.0.0.1:{free_port()}/offload"  # nothing listens there
    jobs = Offload(data_dir=tmp_path, ledger_url=down)
    try:
        found = scrape(jobs)
    finally:
        jobs.close()
    assert found.value("offload_ledger_up") == 0
    assert "offload_inline_running" in {name for name, _, _ in found.samples}
