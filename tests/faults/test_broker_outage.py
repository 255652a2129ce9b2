"""The broker stops in the middle of the work, and comes back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from offload import BrokerUnavailableError, RunNotFoundError, RunState
from offload.ledger import queries
from tests.contract.conftest import Durable, world_at
from tests.faults.services import PrivateRabbitMQ, PrivateRedis, running
from tests.support import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(240)]

PUBLISH_TIMEOUT_S = 2.0


@pytest.fixture(params=["redis", "rabbitmq"])
def outage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Durable, object]]:
    service: PrivateRedis | PrivateRabbitMQ
    if request.param == "redis":
        # appendonly + fsync always: queued messages survive the restart (see README).
        service = PrivateRedis(tmp_path / "redis", appendonly=True)
    else:
        service = PrivateRabbitMQ()
    with (
        running(service),
        world_at(
            request.param,
            "sqlite",
            service.url,
            f"sqlite:///{tmp_path / 'ledger.sqlite'}",
            tmp_path,
            OFFLOAD_PUBLISH_TIMEOUT_S=str(PUBLISH_TIMEOUT_S),
        ) as world,
    ):
        yield world, service


def runs_in_ledger(world: Durable) -> int:
    return world.jobs.ledger.read(lambda conn: sum(queries.count_by_state(conn).values()))


def test_defer_during_an_outage_fails_promptly_and_queued_runs_complete_after_it(
    outage: tuple[Durable, PrivateRedis | PrivateRabbitMQ],
) -> None:
    world, service = outage
    # Given runs queued while no worker consumes
    queued = [world.task("add").defer_sync(i, i) for i in range(20)]
    # When the broker stops
    service.stop()
    before = runs_in_ledger(world)
    # Then defer() fails within the publish timeout and records nothing
    started = time.monotonic()
    with pytest.raises(BrokerUnavailableError, match="did not accept the message for 'add'"):
        world.task("add").defer_sync(1, 1)
    assert time.monotonic() - started < PUBLISH_TIMEOUT_S + 3.0
    assert runs_in_ledger(world) == before
    # When the broker is back and a worker starts
    service.start()
    world.worker.start().wait_ready()
    # Then every run queued before the outage completes, and new ones work
    assert [run.result_sync(timeout=60) for run in queued] == [2 * i for i in range(20)]
    assert world.task("add").defer_sync(5, 5).result_sync(timeout=30) == 10


def test_worker_rides_out_an_outage_in_the_middle_of_the_work(
    outage: tuple[Durable, PrivateRedis | PrivateRabbitMQ],
) -> None:
    world, service = outage
    world.worker.start().wait_ready()
    release = world.data_dir / "release"
    started = world.data_dir / "started"
    long_run = world.task("long_job").defer_sync(started=str(started), release=str(release))
    wait_until(started.exists, 30, "the long run to start")
    # The broker goes away while the run is in the middle of its work
    service.stop()
    time.sleep(2.0)  # an outage of a few seconds, the worker notices it
    service.start()
    release.touch()
    # The run finishes once, and the worker consumes new runs again
    assert long_run.result_sync(timeout=60) in (1, 2)
    statuses = [a.outcome for a in world.jobs.ledger.attempts(long_run.id)]
    assert statuses[-1] == "success"
    assert world.task("add").defer_sync(2, 3).result_sync(timeout=60) == 5


def test_broker_refusing_a_message_leaves_no_half_written_run(
    outage: tuple[Durable, PrivateRedis | PrivateRabbitMQ],
) -> None:
    world, service = outage
    service.stop()
    try:
        with pytest.raises(BrokerUnavailableError):
            world.task("add").options(idempotency_key="once").defer_sync(1, 2)
    finally:
        service.start()
    # The key is free again: the refused run never existed.
    run = world.task("add").options(idempotency_key="once").defer_sync(1, 2)
    assert run.status_sync().state is RunState.PENDING
    with pytest.raises(RunNotFoundError):
        world.jobs.run("0" * 32).status_sync()
