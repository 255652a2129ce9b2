"""offload.testing as a user's test suite meets it: durable runs in the test process take the
worker's path (validation, JSON round trip, claim, retries with backoff, dead runs, soft
timeouts), only without the waiting, and each test's ledger is its own."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from offload import (
    Backoff,
    Offload,
    Retry,
    RunFailedError,
    RunFilter,
    RunState,
    TaskArgumentsError,
    TaskContext,
    TaskTimeoutError,
)
from offload.testing import Harness, RecordingContext, isolated

jobs = Offload()
TRIES: dict[str, int] = {}
ORDER: list[str] = []


@jobs.task(retries=3, backoff=Backoff(base=60, jitter=False))
def flaky(ctx: TaskContext, key: str, failures: int) -> str:
    TRIES[key] = TRIES.get(key, 0) + 1
    if ctx.attempt <= failures:
        raise ConnectionError(f"provider down (attempt {ctx.attempt})")
    return f"{key} after {ctx.attempt}"


@jobs.task(retries=1)
def asks_to_wait(ctx: TaskContext) -> int:
    if ctx.attempt == 1:
        raise Retry(delay=900, reason="rate limited")
    return ctx.attempt


@jobs.task()
def parent(ctx: TaskContext, children: int) -> list[str]:
    ORDER.append("parent started")
    ids = [child.defer_sync(number=n).id for n in range(children)]
    ORDER.append("parent ended")
    return ids


@jobs.task()
def child(ctx: TaskContext, number: int) -> int:
    ORDER.append(f"child {number}")
    return number * 10


@jobs.task()
def returns_a_thread(ctx: TaskContext):  # untyped: any value may come back
    return threading.current_thread()


@jobs.task(timeout=0.3)
def overruns(ctx: TaskContext) -> str:
    try:
        time.sleep(30)
    except TaskTimeoutError:
        ORDER.append("cleaned up")
        raise
    return "never"


@jobs.task(cpu_bound=True)
def where(ctx: TaskContext) -> str:
    return threading.current_thread().name


@pytest.fixture
def offload(tmp_path: Path) -> Iterator[Harness]:
    TRIES.clear()
    ORDER.clear()
    with isolated(jobs, tmp_path) as harness:
        yield harness


def test_a_flaky_task_retries_with_its_backoff_skipped_and_succeeds(offload: Harness) -> None:
    run = flaky.defer_sync(key="k", failures=2)

    detail = offload.jobs.get_run_sync(run.id)
    assert detail.state is RunState.SUCCESS
    assert detail.result == "k after 3"
    assert [a.outcome for a in detail.attempt_history] == ["error", "error", "success"]
    assert "provider down (attempt 1)" in (detail.attempt_history[0].error or "")
    assert TRIES["k"] == 3
    assert offload.attempts == 3
    # Backoff(base=60, factor=2, no jitter): 60 s, then 120 s, jumped over, not waited.
    assert offload.clock.skipped == pytest.approx(180, abs=1)


def test_a_task_out_of_tries_is_dead_and_a_replay_with_an_edit_succeeds(
    offload: Harness,
) -> None:
    run = flaky.defer_sync(key="d", failures=10)

    status = run.status_sync()
    assert (status.state, status.dead, status.attempts) == (RunState.FAILURE, True, 4)
    with pytest.raises(RunFailedError, match="provider down"):
        run.result_sync()
    assert [r.id for r in offload.jobs.list_runs_sync(RunFilter(dead=True)).runs] == [run.id]

    replay = offload.jobs.replay_sync(run.id, args={"failures": 0})
    assert replay.result_sync() == "d after 1"
    assert offload.jobs.status_sync(replay.id).replay_of == run.id


def test_retry_with_a_delay_moves_the_clock_by_that_delay(offload: Harness) -> None:
    run = asks_to_wait.defer_sync()
    assert run.result_sync() == 2
    assert offload.clock.skipped == pytest.approx(900, abs=1)


def test_a_run_deferred_by_a_running_task_runs_after_it_as_on_a_worker(
    offload: Harness,
) -> None:
    run = parent.defer_sync(children=2)

    ids = run.result_sync()
    assert ORDER == ["parent started", "parent ended", "child 0", "child 1"]
    assert [offload.jobs.run(i).result_sync() for i in ids] == [0, 10]


def test_a_result_json_cannot_carry_fails_the_run_as_a_worker_would(offload: Harness) -> None:
    run = returns_a_thread.defer_sync()
    status = run.status_sync()
    assert status.state is RunState.FAILURE
    assert "Thread" in (status.error or "")


def test_a_soft_timeout_interrupts_the_task_which_can_clean_up(offload: Harness) -> None:
    started = time.monotonic()
    run = overruns.defer_sync()
    assert time.monotonic() - started < 10  # 0.3 s, not the 30 s sleep
    status = run.status_sync()
    assert (status.state, status.dead) == (RunState.FAILURE, True)
    assert "TaskTimeoutError" in (status.error or "")
    assert ORDER == ["cleaned up"]


def test_wrong_arguments_fail_at_defer_and_record_nothing(offload: Harness) -> None:
    with pytest.raises(TaskArgumentsError, match="failures"):
        flaky.defer_sync(key="k", failures="many")  # type: ignore[arg-type]
    assert offload.jobs.list_runs_sync().runs == []
    assert offload.attempts == 0


def test_a_cpu_bound_task_runs_in_the_calling_thread(offload: Harness) -> None:
    assert where.defer_sync().result_sync() == threading.current_thread().name


def test_each_isolated_block_has_its_own_ledger_and_restores_the_app(tmp_path: Path) -> None:
    original = (jobs.settings, jobs.ledger)
    with isolated(jobs, tmp_path / "one") as first:
        kept = child.defer_sync(number=1).id
        assert first.jobs.ledger is not original[1]
    with isolated(jobs, tmp_path / "two") as second:
        assert second.jobs.list_runs_sync().runs == []
        assert child.defer_sync(number=2).result_sync() == 20
    assert (jobs.settings, jobs.ledger) == original
    with isolated(jobs, tmp_path / "one") as again:  # the same directory: the same ledger
        assert again.jobs.run(kept).result_sync() == 10


def test_a_recording_context_keeps_every_progress_report_and_a_cancel() -> None:
    ctx = RecordingContext("flaky", attempt=4)
    assert flaky(ctx, "direct", failures=3) == "direct after 4"
    ctx.progress(0.5, "half")
    ctx.progress(0.6, "more")
    assert ctx.reports == [(0.5, "half"), (0.6, "more")]
    assert not ctx.cancelled
    ctx.cancel()
    assert ctx.cancelled
