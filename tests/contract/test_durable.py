"""The durable lane's contract, on every broker and ledger, with real worker processes."""

from __future__ import annotations

import itertools
import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import signals

from offload import (
    RunFailedError,
    RunNotFoundError,
    RunState,
    RunStatus,
    TaskArgumentsError,
    WorkerStatus,
)
from offload.ledger import queries
from offload.testing import wait_for_state, wait_for_state_sync
from tests.apps.contract import Receipt
from tests.contract.conftest import Durable
from tests.support import wait_until

pytestmark = pytest.mark.timeout(60)


def row_count(durable: Durable) -> int:
    return durable.jobs.ledger.read(lambda conn: sum(queries.count_by_state(conn).values()))


def test_success_returns_the_typed_result(durable: Durable) -> None:
    run = durable.task("add").defer_sync(2, b=40)
    assert run.result_sync(timeout=20) == 42
    status = run.status_sync()
    assert status.state is RunState.SUCCESS
    assert status.attempts == 1
    assert status.result == 42
    assert status.started_at is not None
    assert status.finished_at is not None
    assert status.created_at <= status.started_at <= status.finished_at


def test_pydantic_and_datetime_values_travel_as_json_and_come_back_typed(
    durable: Durable,
) -> None:
    paid_at = datetime(2026, 11, 25, 12, 30, tzinfo=UTC)
    run = durable.task("pay").defer_sync(order_id=7, cents=1999, paid_at=paid_at)
    receipt = run.result_sync(timeout=20)
    assert receipt == Receipt(order_id=7, total_cents=1999, paid_at=paid_at)
    assert run.status_sync().result == {
        "order_id": 7,
        "total_cents": 1999,
        "paid_at": "2026-11-25T12:30:00Z",
    }


async def test_async_defer_and_async_def_task(durable: Durable) -> None:
    run = await durable.task("fetch").defer(a=6, b=7)
    assert await run.result(timeout=20) == 42


def test_retry_then_success_records_attempts_with_backoff_delays(durable: Durable) -> None:
    # Given a task failing twice, with backoff 0.3 s then 0.6 s (no jitter)
    run = durable.task("flaky").defer_sync(fail_times=2)
    # When it runs
    assert run.result_sync(timeout=30) == 3
    # Then three attempts are recorded, two with the error, spaced by the backoff
    attempts = durable.jobs.ledger.attempts(run.id)
    assert [a.outcome for a in attempts] == ["error", "error", "success"]
    assert attempts[0].error == "ConnectionError: attempt 1 failed"
    assert "Traceback" in (attempts[0].traceback or "")
    for earlier, later, expected in [
        (attempts[0], attempts[1], 0.3),
        (attempts[1], attempts[2], 0.6),
    ]:
        assert earlier.finished_at is not None
        gap = (later.started_at - earlier.finished_at).total_seconds()
        assert expected - 0.05 <= gap <= expected + 2.0, gap


def test_retries_exhausted_fail_and_leave_a_dead_run(durable: Durable) -> None:
    run = durable.task("doomed").defer_sync(reason="card declined")
    with pytest.raises(RunFailedError) as failed:
        run.result_sync(timeout=30)
    assert failed.value.error == "ValueError: card declined"
    assert "ValueError: card declined" in (failed.value.traceback or "")
    status = run.status_sync()
    assert status.state is RunState.FAILURE
    assert status.dead
    assert status.attempts == 3
    attempts = durable.jobs.ledger.attempts(run.id)
    assert [a.outcome for a in attempts] == ["error"] * 3
    for earlier, later in itertools.pairwise(attempts):
        assert earlier.finished_at is not None
        assert (later.started_at - earlier.finished_at).total_seconds() <= 1.0 + 2.0
    # Everything a replay needs is kept.
    message = durable.jobs.ledger.read(lambda conn: queries.get_message(conn, run.id))
    assert (message.task, message.args) == ("doomed", {"reason": "card declined"})


def test_retry_on_limits_which_errors_earn_a_retry(durable: Durable) -> None:
    not_retried = durable.task("picky").defer_sync(error="value")
    with pytest.raises(RunFailedError):
        not_retried.result_sync(timeout=20)
    assert not_retried.status_sync().attempts == 1


def test_task_may_raise_retry_with_its_own_delay(durable: Durable) -> None:
    run = durable.task("asks_to_retry").defer_sync()
    assert run.result_sync(timeout=20) == 2
    first, second = durable.jobs.ledger.attempts(run.id)
    assert first.error == "Retry: come back later"
    assert first.finished_at is not None
    assert (second.started_at - first.finished_at).total_seconds() >= 0.15


def test_soft_timeout_lets_a_thread_task_clean_up(durable: Durable) -> None:
    run = durable.task("cleans_up").defer_sync()
    with pytest.raises(RunFailedError) as failed:
        run.result_sync(timeout=20)
    assert failed.value.error == "TaskTimeoutError: soft timeout of 0.5s expired"
    status = run.status_sync()
    assert status.progress is not None
    assert status.progress.message == "cleaned up"
    assert durable.jobs.ledger.attempts(run.id)[0].outcome == "timeout"


def test_soft_timeout_lets_a_cpu_bound_task_clean_up(durable: Durable) -> None:
    run = durable.task("crunch_until_told").defer_sync()
    with pytest.raises(RunFailedError) as failed:
        run.result_sync(timeout=20)
    assert failed.value.error == "TaskTimeoutError: soft timeout of 0.5s expired"
    status = run.status_sync()
    assert status.progress is not None
    assert status.progress.message == "cpu task cleaned up"


def test_soft_timeout_cancels_an_async_task(durable: Durable) -> None:
    run = durable.task("slow_fetch").defer_sync()
    with pytest.raises(RunFailedError) as failed:
        run.result_sync(timeout=20)
    assert failed.value.error == "TaskTimeoutError: soft timeout of 0.3s expired"


def test_cpu_bound_task_runs_in_a_pool_process(durable: Durable) -> None:
    where = durable.task("where_am_i").defer_sync().result_sync(timeout=20)
    io_pid = durable.task("where_io").defer_sync().result_sync(timeout=20)
    assert where["process"].startswith("ForkPoolWorker")
    assert where["pid"] not in (os.getpid(), io_pid)
    assert io_pid in durable.worker.consumer_pids()
    assert where["pid"] not in durable.worker.consumer_pids()


def test_progress_is_visible_through_the_handle_while_running(durable: Durable) -> None:
    release = durable.data_dir / f"release-{os.urandom(4).hex()}"
    run = durable.task("step_by_step").defer_sync(release=str(release))
    status = wait_for_state_sync(run, RunState.PROGRESS, timeout=20)
    assert status.progress is not None
    assert (status.progress.fraction, status.progress.message) == (0.5, "halfway")
    assert not status.is_terminal
    release.touch()
    assert run.result_sync(timeout=20) == "finished"
    final = run.status_sync()
    assert final.progress is not None
    assert final.progress.fraction == 1.0


def test_idempotency_key_returns_the_existing_run(durable: Durable) -> None:
    key = f"order-{os.urandom(4).hex()}"
    first = durable.task("add").options(idempotency_key=key).defer_sync(1, 1)
    second = durable.task("add").options(idempotency_key=key).defer_sync(1, 1)
    assert second.id == first.id
    assert first.result_sync(timeout=20) == 2
    assert first.status_sync().attempts == 1
    # The key is per task: another task may use the same key.
    other = durable.task("render").options(idempotency_key=key).defer_sync(user_id=1)
    assert other.id != first.id


def test_wrong_arguments_fail_at_defer_and_write_nothing(durable: Durable) -> None:
    before = row_count(durable)
    with pytest.raises(TaskArgumentsError) as wrong:
        durable.task("render").defer_sync(user_id=7, kind="docx")
    assert str(wrong.value) == "render() got kind='docx': Input should be 'pdf' or 'csv'"
    assert wrong.value.errors[0]["loc"] == ["kind"]
    with pytest.raises(TaskArgumentsError, match="missing argument 'user_id'"):
        durable.task("render").defer_sync(kind="pdf")
    with pytest.raises(TaskArgumentsError, match="unexpected argument 'colour'"):
        durable.task("render").defer_sync(user_id=1, colour="red")
    # A message published by mistake would make the worker create a row: a valid run that
    # finishes after it proves nothing else arrived.
    assert durable.task("render").defer_sync(user_id=7).result_sync(timeout=20) == "report-7.pdf"
    assert row_count(durable) == before + 1


def test_unknown_run_id_is_not_found_never_pending(durable: Durable) -> None:
    ghost = durable.jobs.run("0" * 32)
    with pytest.raises(RunNotFoundError, match="No run with id '0000"):
        ghost.status_sync()
    with pytest.raises(RunNotFoundError):
        ghost.result_sync(timeout=1)
    with pytest.raises(RunNotFoundError):
        ghost.cancel_sync()


def test_delay_holds_the_run_and_cancel_stops_it_before_it_starts(durable: Durable) -> None:
    delayed = durable.task("add").options(delay=1.0).defer_sync(1, 2)
    cancelled = durable.task("add").options(delay=1.0).defer_sync(3, 4)
    assert cancelled.cancel_sync().state is RunState.CANCELLED
    assert delayed.status_sync().state is RunState.PENDING
    assert delayed.result_sync(timeout=20) == 3
    status = delayed.status_sync()
    assert status.started_at is not None
    assert (status.started_at - status.created_at) >= timedelta(seconds=0.95)
    with pytest.raises(RunFailedError, match="CANCELLED"):
        cancelled.result_sync(timeout=5)
    assert cancelled.status_sync().attempts == 0


def test_a_paused_queue_holds_its_runs_until_it_is_resumed(durable: Durable) -> None:
    queue = durable.task("add").queue

    def held() -> int:
        return next(q.held for q in durable.jobs.list_queues_sync() if q.name == queue)

    assert durable.jobs.pause_queue_sync(queue).paused
    try:
        runs = [durable.task("add").defer_sync(n, n) for n in range(3)]
        # A cpu_bound run waits in the broker queue `default.cpu`, but its queue is `default`:
        # pausing `default` holds it too.
        in_a_process = durable.task("where_am_i").defer_sync()
        # The worker got every message and left its run waiting in the ledger.
        wait_until(lambda: held() == 4, 20, "the worker to hold the paused queue's runs")
        for run in [*runs, in_a_process]:
            status = run.status_sync()
            assert (status.state, status.attempts, status.queue) == (RunState.PENDING, 0, queue)
    finally:
        resumed = durable.jobs.resume_queue_sync(queue)
    assert not resumed.paused
    assert [run.result_sync(timeout=20) for run in runs] == [0, 2, 4]
    assert in_a_process.result_sync(timeout=20)["process"] != "MainProcess"
    assert held() == 0


def test_running_task_sees_the_cancel_request_and_stops(durable: Durable) -> None:
    started = durable.data_dir / f"started-{os.urandom(4).hex()}"
    run = durable.task("until_cancelled").defer_sync(started=str(started))
    wait_for_state_sync(run, RunState.STARTED, timeout=20)
    assert run.cancel_sync().state is RunState.STARTED
    with pytest.raises(RunFailedError, match="CANCELLED"):
        run.result_sync(timeout=20)
    assert durable.jobs.ledger.attempts(run.id)[0].outcome == "cancelled"


def test_task_that_returns_after_its_run_was_cancelled_ends_cancelled(durable: Durable) -> None:
    started = durable.data_dir / f"started-{os.urandom(4).hex()}"
    release = durable.data_dir / f"release-{os.urandom(4).hex()}"
    run = durable.task("long_job").defer_sync(started=str(started), release=str(release))
    wait_until(started.exists, 20, "the task to start")
    run.cancel_sync()
    release.touch()  # it returns normally, well inside the grace period, never having looked
    with pytest.raises(RunFailedError, match="CANCELLED"):
        run.result_sync(timeout=20)
    status = run.status_sync()
    assert status.result is None
    assert durable.jobs.ledger.attempts(run.id)[-1].outcome == "cancelled"


@pytest.mark.parametrize("task", ["ignores_cancel", "ignores_cancel_in_a_process"])
def test_running_task_that_ignores_cancel_is_interrupted_after_the_grace(
    durable: Durable, task: str
) -> None:
    started = durable.data_dir / f"started-{os.urandom(4).hex()}"
    run = durable.task(task).defer_sync(started=str(started))
    wait_until(started.exists, 20, "the task to start")
    run.cancel_sync()
    with pytest.raises(RunFailedError, match="CANCELLED"):
        run.result_sync(timeout=20)
    assert durable.jobs.ledger.attempts(run.id)[-1].outcome == "cancelled"


def test_result_that_cannot_travel_as_json_fails_the_run(durable: Durable) -> None:
    run = durable.task("unjsonable").defer_sync()
    with pytest.raises(RunFailedError, match="PydanticSerializationError"):
        run.result_sync(timeout=20)


def test_defer_many_starts_every_run_in_one_batch(durable: Durable) -> None:
    runs = durable.task("add").defer_many_sync({"a": i, "b": i} for i in range(50))
    assert len({r.id for r in runs}) == 50
    assert [r.result_sync(timeout=30) for r in runs] == [2 * i for i in range(50)]


def test_defer_many_validates_every_call_first(durable: Durable) -> None:
    before = row_count(durable)
    with pytest.raises(TaskArgumentsError, match=r"call #1: add\(\) got b='x'"):
        durable.task("add").defer_many_sync([{"a": 1, "b": 2}, {"a": 1, "b": "x"}])
    assert row_count(durable) == before


def test_celery_publish_hooks_still_see_every_message(durable: Durable) -> None:
    # Tracing libraries hook Celery's publishing; offload then publishes through Celery.
    seen: list[str] = []

    def hook(headers: dict[str, Any], **_: Any) -> None:
        seen.append(headers["id"])

    signals.before_task_publish.connect(hook, weak=False)
    try:
        run = durable.task("add").defer_sync(a=2, b=3)
    finally:
        signals.before_task_publish.disconnect(hook)
    assert seen == [run.id]
    assert run.result_sync(timeout=30) == 5


def test_plain_celery_send_task_is_recorded_as_a_run(durable: Durable) -> None:
    # Celery clients that know nothing of offload still get a ledger row.
    message = durable.jobs.celery.send_task("add", kwargs={"a": 20, "b": 22}, queue="default")
    handle = durable.jobs.run(message.id)

    def recorded() -> bool:
        try:
            return handle.status_sync().state is RunState.SUCCESS
        except RunNotFoundError:
            return False  # the worker records it when it receives it

    wait_until(recorded, 20, "the plain Celery message to run")
    assert handle.status_sync().result == 42


async def test_wait_for_state_raises_when_the_run_fails(durable: Durable, tmp_path: Path) -> None:
    run = await durable.task("doomed").options(priority=5).defer(reason="nope")
    with pytest.raises(RunFailedError, match="FAILURE"):
        await wait_for_state(run, RunState.SUCCESS, timeout=30)


def dead_run(durable: Durable, run_id: str) -> RunStatus:
    def buried() -> RunStatus | None:
        try:
            status = durable.jobs.run(run_id).status_sync()
        except RunNotFoundError:
            return None
        return status if status.dead else None

    found: RunStatus = wait_until(buried, 20, f"run {run_id} to be dead")
    return found


def test_garbage_message_becomes_a_dead_run_and_the_worker_goes_on(durable: Durable) -> None:
    run_id = uuid.uuid4().hex
    with durable.jobs.celery.producer_or_acquire() as producer:
        producer.publish(
            b"\x00\xff not json {",
            routing_key="default",
            content_type="application/json",
            content_encoding="utf-8",
            headers={"id": run_id, "task": "add"},
        )
    status = dead_run(durable, run_id)
    assert status.state is RunState.FAILURE
    assert (status.error or "").startswith("PoisonMessage: cannot decode the message")
    assert durable.task("add").defer_sync(1, 1).result_sync(timeout=20) == 2


def test_unknown_task_name_becomes_a_dead_run(durable: Durable) -> None:
    message = durable.jobs.celery.send_task("renamed_away", kwargs={"x": 1}, queue="default")
    status = dead_run(durable, message.id)
    assert status.task == "renamed_away"
    assert status.error == (
        "UnknownTask: no task named 'renamed_away' in this worker; was it renamed or removed "
        "by a deploy?"
    )
    stored = durable.jobs.ledger.read(lambda conn: queries.get_message(conn, message.id))
    assert (stored.task, stored.args) == ("renamed_away", {"x": 1})


def test_arguments_that_no_longer_fit_the_signature_make_a_dead_run(durable: Durable) -> None:
    # As if deferred by an older deploy, when add() took other arguments.
    message = durable.jobs.celery.send_task("add", kwargs={"a": 1, "c": 2}, queue="default")
    status = dead_run(durable, message.id)
    assert (status.error or "").startswith(
        "TaskArgumentsError: the stored arguments no longer fit the task"
    )
    assert "add() is missing argument 'b'" in (status.error or "")
    assert "add() got an unexpected argument 'c'" in (status.error or "")


def test_workers_report_themselves_through_the_ledger(durable: Durable) -> None:
    # Worker status never asks the broker (the SQLite broker has no remote control).
    def reported() -> list[WorkerStatus]:
        found = [w for w in durable.jobs.workers_sync() if w.alive]
        return found if len(found) >= 3 else []

    found = wait_until(reported, 20, "three live workers in the ledger")
    by_pool = sorted((w.pool, w.queues) for w in found)
    assert by_pool == [
        ("prefork", ["default.cpu"]),
        ("thread", ["default"]),
        ("thread", ["default"]),
    ]
    pids = {int(w.id.split(":")[1]) for w in found}
    assert pids == set(durable.worker.consumer_pids())
