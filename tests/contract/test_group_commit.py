"""Group commit: concurrent `defer()`s of one event loop share ledger transactions and broker
batches, and each caller still gets exactly its own runs or its own error."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from offload import BrokerUnavailableError, IdempotencyConflictError, Offload, RunState
from tests.apps import contract
from tests.contract.conftest import Durable
from tests.support import free_port

pytestmark = pytest.mark.timeout(120)


def count_commits(jobs: Offload) -> list[int]:
    """A counter of the ledger's committed transactions, read through SQLAlchemy's events."""
    commits = [0]

    def on_commit(_conn: Any) -> None:
        commits[0] += 1

    sa.event.listen(jobs.ledger.engine, "commit", on_commit)
    return commits


async def test_a_hundred_concurrent_defers_take_a_fraction_of_the_commits_and_all_run(
    per_broker: Durable,
) -> None:
    jobs = per_broker.jobs
    add = per_broker.task("add")
    await add.defer(a=0, b=0)  # the ledger exists, the broker connection is warm
    commits = count_commits(jobs)

    runs = await asyncio.gather(*(add.defer(a=n, b=1) for n in range(100)))

    assert len({run.id for run in runs}) == 100
    assert commits[0] <= 25, f"{commits[0]} ledger commits for 100 concurrent defers"
    per_broker.worker.start().wait_ready()
    results = await asyncio.gather(*(run.result(timeout=60) for run in runs))
    assert results == [n + 1 for n in range(100)]  # each caller got its own run


async def test_an_idempotency_conflict_fails_only_its_caller(per_broker: Durable) -> None:
    jobs = per_broker.jobs
    add = per_broker.task("add")
    first = await add.options(idempotency_key="order-7").defer(a=1, b=2)

    outcomes = await asyncio.gather(
        *(add.defer(a=n, b=0) for n in range(10)),
        add.options(idempotency_key="order-7").defer(a=1, b=2),  # the same run again
        add.options(idempotency_key="order-7").defer(a=5, b=5),  # a conflict
        *(add.defer(a=n, b=100) for n in range(10)),
        return_exceptions=True,
    )

    conflicts = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(conflicts) == 1
    assert isinstance(conflicts[0], IdempotencyConflictError)
    assert outcomes[11] is conflicts[0]
    assert outcomes[10].id == first.id  # type: ignore[union-attr]
    fresh = [o for i, o in enumerate(outcomes) if i not in (10, 11)]
    assert len({o.id for o in fresh}) == 20  # type: ignore[union-attr]
    listed = jobs.list_runs_sync(limit=100).runs
    assert len(listed) == 21  # the 20 new runs and the first: nothing of the conflict
    per_broker.worker.start().wait_ready()
    assert [await o.result(timeout=60) for o in fresh] == [  # type: ignore[union-attr]
        *range(10),
        *range(100, 110),
    ]
    assert (await first.status()).state is RunState.SUCCESS


@pytest.fixture
def unreachable_broker(tmp_path: Path) -> Iterator[Offload]:
    """The contract app on a Redis URL where nothing listens: every publish is refused."""
    jobs = contract.build(
        broker_url=f"redis://127.0.0.1:{free_port()}/0",
        data_dir=tmp_path,
        publish_timeout_s=0.5,
    )
    try:
        yield jobs
    finally:
        jobs.close()


async def test_a_refused_batch_fails_every_caller_and_leaves_no_run(
    unreachable_broker: Offload,
) -> None:
    add = unreachable_broker.tasks["add"]

    outcomes = await asyncio.gather(
        *(add.defer(a=n, b=0) for n in range(20)), return_exceptions=True
    )

    assert all(isinstance(o, BrokerUnavailableError) for o in outcomes), outcomes
    assert "did not accept the message for 'add'" in str(outcomes[0])
    assert unreachable_broker.list_runs_sync(limit=100).runs == []  # nothing half-written
