"""The embedded default keeps ledger and broker in one SQLite file: a defer writes its run and
its message in one transaction, so no crash or failed write can leave one without the other."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from offload import IdempotencyConflictError, LedgerError, Offload, RunState
from tests.apps import contract
from tests.support import WorkerProcess, wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def jobs(tmp_path: Path) -> Iterator[Offload]:
    app = Offload(data_dir=tmp_path)

    @app.task
    def send_receipt(order: int) -> None: ...

    yield app
    app.close()


def messages(path: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(path) as db:
        return [json.loads(row[0]) for row in db.execute("SELECT payload FROM messages")]


def run_ids(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {row[0] for row in db.execute("SELECT id FROM offload_runs")}


def test_a_defer_is_one_transaction_holding_the_run_and_its_message(
    jobs: Offload, tmp_path: Path
) -> None:
    task = jobs.tasks["send_receipt"]
    task.defer_sync(order=0)  # the file and its tables exist
    statements: list[str] = []
    sa.event.listen(
        jobs.ledger.engine,
        "connect",
        lambda dbapi, _: dbapi.set_trace_callback(statements.append),
    )
    jobs.ledger.engine.dispose()  # the next write opens a traced connection

    run = task.defer_sync(order=1)

    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".sqlite") == ["ledger.sqlite"]
    writes = [s.split("(")[0].strip() for s in statements if not s.startswith(("PRAGMA", "SELECT"))]
    assert writes == [
        "BEGIN IMMEDIATE",
        "INSERT INTO offload_runs",
        "INSERT INTO messages",
        "COMMIT",
    ]
    sent = messages(tmp_path / "ledger.sqlite")
    assert [m["headers"]["id"] for m in sent][-1] == run.id
    assert sent[-1]["headers"]["task"] == "send_receipt"
    assert json.loads(sent[-1]["body"])[1] == {"order": 1}


def test_a_write_that_fails_after_the_message_leaves_neither(jobs: Offload, tmp_path: Path) -> None:
    task = jobs.tasks["send_receipt"]
    kept = task.defer_sync(order=1)
    ledger = tmp_path / "ledger.sqlite"
    with sqlite3.connect(ledger) as db:  # the message insert fails, after the run's
        db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON messages "
            "BEGIN SELECT RAISE(ABORT, 'the disk went away'); END"
        )

    with pytest.raises(LedgerError, match="the disk went away"):
        task.defer_sync(order=2)

    assert run_ids(ledger) == {kept.id}
    assert [m["headers"]["id"] for m in messages(ledger)] == [kept.id]


def test_a_known_idempotency_key_writes_no_second_message(jobs: Offload, tmp_path: Path) -> None:
    task = jobs.tasks["send_receipt"]
    first = task.options(idempotency_key="order-9").defer_sync(order=9)

    again = task.options(idempotency_key="order-9").defer_sync(order=9)
    with pytest.raises(IdempotencyConflictError):
        task.options(idempotency_key="order-9").defer_sync(order=10)

    assert again.id == first.id
    assert [m["headers"]["id"] for m in messages(tmp_path / "ledger.sqlite")] == [first.id]


def test_an_earlier_separate_broker_file_is_named_and_its_runs_still_run(tmp_path: Path) -> None:
    # An offload from before the shared file queued a run in data_dir/broker.sqlite.
    earlier = contract.build(
        broker_url=f"sqlite:///{tmp_path / 'broker.sqlite'}", data_dir=tmp_path
    )
    queued = earlier.tasks["add"].defer_sync(a=2, b=3)
    earlier.close()
    env = {"OFFLOAD_DATA_DIR": str(tmp_path), "OFFLOAD_ORPHAN_AFTER_S": "2"}
    worker = WorkerProcess("tests.apps.contract:jobs", env, tmp_path / "worker.log").start()
    upgraded = contract.build(data_dir=tmp_path)
    try:
        worker.wait_ready()
        assert (
            f"{tmp_path / 'broker.sqlite'} holds 1 message(s) of an earlier offload" in worker.log()
        )
        run = upgraded.run(queued.id)
        wait_until(lambda: run.status_sync().state is RunState.SUCCESS, 30, "the queued run")
        assert run.result_sync(timeout=1) == 5
    finally:
        worker.stop()
        upgraded.close()
