"""`/metrics` of a real server counts what real worker processes ran: two workers at once, one
stopped and another started between batches, on both ledgers. The counts live in the ledger,
so they are exact whichever process ran a run and however often workers restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from offload import RunHandle
from tests.contract.conftest import LEDGERS, Durable, durable_world
from tests.support import Scrape, Server, WorkerProcess, wait_until


@pytest.fixture(params=LEDGERS, ids=lambda ledger: f"sqlite-broker/{ledger}-ledger")
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Durable]:
    with durable_world("sqlite", request.param, tmp_path) as world:
        yield world


def finish(runs: list[RunHandle[object]]) -> None:
    def ended() -> bool:
        return all(run.status_sync().is_terminal for run in runs)

    wait_until(ended, 60, f"{len(runs)} runs to end")


def batch(world: Durable, adds: int, dead: int) -> list[RunHandle[object]]:
    add, charge = world.task("add"), world.task("charge")
    made = [add.defer_sync(a=n, b=1) for n in range(adds)]
    made += [charge.defer_sync(order_id=n, cents=-5) for n in range(dead)]
    finish(made)
    return made


def test_metrics_count_every_run_of_every_worker(world: Durable) -> None:
    first = world.worker.start()
    second = world.new_worker("second").start()
    third: WorkerProcess | None = None
    server = Server("tests.apps.contract_api:app", world.data_dir, dict(world.env)).start()
    try:
        first.wait_ready()
        second.wait_ready()
        with httpx.Client(base_url=server.url, timeout=30) as client:

            def scrape() -> Scrape:
                response = client.get("/metrics/")
                assert response.status_code == 200
                return Scrape(response.text)

            alive = [w for w in world.jobs.workers_sync() if w.alive]
            assert scrape().value("offload_workers") == len(alive) >= 2

            made = batch(world, adds=30, dead=3)
            # A worker stops and a new one starts: the counts go on from where they were.
            first.stop()
            made += batch(world, adds=10, dead=1)
            third = world.new_worker("third").start()
            third.wait_ready()
            second.stop()
            made += batch(world, adds=10, dead=1)

            ran_on = {
                a.worker.rsplit(":", 2)[1]
                for run in made
                for a in world.jobs.get_run_sync(run.id).attempt_history
                if a.worker
            }
            assert len(ran_on) >= 2, f"every run ran in one process: {ran_on}"

            found = scrape()
            durable = {"lane": "durable"}
            assert found.value("offload_runs_total", task="add", state="SUCCESS", **durable) == 50
            assert found.value("offload_runs_total", task="charge", state="FAILURE", **durable) == 5
            assert found.value("offload_runs_total", **durable) == len(made) == 55
            assert found.value("offload_run_duration_seconds_count", task="add", **durable) == 50
            # Each dead charge had two tries, and each try waited in the queue once.
            assert found.value("offload_queue_wait_seconds_count", task="charge") == 10
            assert found.value("offload_queue_wait_seconds_count", task="add") == 50
            assert found.value("offload_dead_runs", task="charge") == 5
            assert found.value("offload_queue_depth") == 0
            assert found.value("offload_ledger_up") == 1

            # Runs nobody consumes wait in their queue, and the depth says so.
            stuck = world.task("add").options(queue="nobody")
            for n in range(4):
                stuck.defer_sync(a=n, b=n)
            assert scrape().value("offload_queue_depth", queue="nobody") == 4

            # A run id is never a label.
            ids = {run.id for run in made}
            assert not any(
                value in ids for _, labels, _ in found.samples for value in labels.values()
            )
            third.stop()
            wait_until(lambda: scrape().value("offload_workers") == 0, 30, "the workers to go")
    finally:
        server.stop()
        second.stop()
        if third is not None:
            third.stop()
