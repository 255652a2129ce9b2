"""The inline lane in this process: admission, timeouts, cancel, history, shutdown intake."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
from starlette.background import BackgroundTask

from offload import (
    ConfigurationError,
    IdempotencyConflictError,
    LaneFullError,
    Offload,
    RunFailedError,
    RunNotFoundError,
    RunState,
    TaskContext,
    TaskDefinitionError,
    Timeout,
    metrics,
)
from offload.testing import wait_for_state
from offload.web.guard import LoopGuard

pytestmark = pytest.mark.timeout(30)


def build(tmp_path: Path, **settings: object) -> Offload:
    jobs = Offload(data_dir=tmp_path, **settings)  # type: ignore[arg-type]
    release = threading.Event()

    @jobs.task(lane="inline")
    async def double(x: int) -> int:
        return 2 * x

    @jobs.task(lane="inline", timeout=0.2)
    async def too_slow() -> None:
        await asyncio.sleep(10)

    @jobs.task(lane="inline", timeout=Timeout(soft=0.2, hard=5))
    def too_slow_sync() -> None:
        while True:
            time.sleep(0.01)

    @jobs.task(lane="inline")
    def hold(ctx: TaskContext) -> str:
        release.wait(10)
        return ctx.run_id

    @jobs.task(lane="inline")
    def ignores_cancel() -> None:
        while True:
            time.sleep(0.01)

    @jobs.task(lane="inline")
    def record(path: str) -> None:
        Path(path).write_text("ran")

    @jobs.task(lane="inline", spill=True)
    async def spillable(x: int) -> int:
        return x

    @jobs.task(lane="inline")
    async def blocks(seconds: float) -> None:
        time.sleep(seconds)  # noqa: ASYNC251 - on purpose, for the guard

    jobs.release = release  # type: ignore[attr-defined]
    return jobs


@pytest.fixture
async def jobs(tmp_path: Path) -> AsyncIterator[Offload]:
    app = build(tmp_path, inline_threads=1, inline_history=3, cancel_grace_s=0.3)
    async with app.lifespan(None):
        yield app
    app.release.set()  # type: ignore[attr-defined]
    app.close()


async def test_defer_outside_a_request_starts_at_once_with_a_typed_result(jobs: Offload) -> None:
    run = await jobs.tasks["double"].defer(21)
    assert await run.result(timeout=5) == 42
    status = await run.status()
    assert (status.lane, status.state, status.attempts) == ("inline", RunState.SUCCESS, 1)


async def test_a_run_waiting_for_a_thread_has_made_no_attempt(jobs: Offload) -> None:
    first = await jobs.tasks["hold"].defer()  # the lane's one thread
    await wait_for_state(first, RunState.STARTED)
    waiting = await jobs.tasks["hold"].defer()
    await asyncio.sleep(0.1)
    status = await waiting.status()
    assert (status.state, status.attempts) == (RunState.PENDING, 0)  # as the durable lane says
    jobs.release.set()  # type: ignore[attr-defined]
    await waiting.result(timeout=5)
    assert (await waiting.status()).attempts == 1


async def test_a_stopped_lane_refuses_with_the_fix(tmp_path: Path) -> None:
    jobs = build(tmp_path)
    with pytest.raises(ConfigurationError, match=r"FastAPI\(lifespan=jobs\.lifespan\)"):
        await jobs.tasks["double"].defer(1)


def test_spill_needs_the_inline_lane(tmp_path: Path) -> None:
    jobs = Offload(data_dir=tmp_path)
    with pytest.raises(TaskDefinitionError, match="needs lane='inline'"):

        @jobs.task(spill=True)
        def durable_only() -> None: ...


def test_a_cpu_bound_inline_task_must_be_importable(tmp_path: Path) -> None:
    jobs = Offload(data_dir=tmp_path)
    with pytest.raises(TaskDefinitionError, match="declare it at module level"):

        @jobs.task(lane="inline", cpu_bound=True)
        def nested() -> None: ...


async def test_async_soft_timeout_fails_the_run(jobs: Offload) -> None:
    run = await jobs.tasks["too_slow"].defer()
    with pytest.raises(RunFailedError, match=r"soft timeout of 0\.2s expired") as failed:
        await run.result(timeout=5)
    assert failed.value.traceback is not None


async def test_sync_soft_timeout_interrupts_the_thread(jobs: Offload) -> None:
    run = await jobs.tasks["too_slow_sync"].defer()
    status = await wait_for_state(run, RunState.FAILURE, timeout=5)
    assert status.error == "TaskTimeoutError: soft timeout of 0.2s expired"
    # the thread was freed: the lane's only thread runs the next run
    assert await (await jobs.tasks["double"].defer(1)).result(timeout=5) == 2


async def test_cancel_a_sync_run_still_waiting_for_a_thread(jobs: Offload, tmp_path: Path) -> None:
    # Given the lane's only thread is busy
    holder = await jobs.tasks["hold"].defer()
    await wait_for_state(holder, RunState.STARTED)
    marker = tmp_path / "ran"
    waiting = await jobs.tasks["record"].defer(str(marker))
    assert (await waiting.status()).state is RunState.PENDING
    # When the waiting run is cancelled and the thread frees up
    assert (await waiting.cancel()).state is RunState.CANCELLED
    jobs.release.set()  # type: ignore[attr-defined]
    await holder.result(timeout=5)
    # Then it never ran
    await asyncio.sleep(0.1)
    assert not marker.exists()


async def test_idempotency_key_returns_the_existing_run(jobs: Offload) -> None:
    task = jobs.tasks["double"].options(idempotency_key="order-7")
    first = await task.defer(1)
    second = await task.defer(1)
    assert first == second
    # The same key with other arguments is a mistake, not the old run.
    with pytest.raises(IdempotencyConflictError, match=f"already names run {first.id}"):
        await task.defer(2)
    assert [s.id for s in jobs.inline.list_runs()].count(first.id) == 1


async def test_delay_holds_the_run_back(jobs: Offload) -> None:
    run = await jobs.tasks["double"].options(delay=0.3).defer(1)
    assert (await run.status()).state is RunState.PENDING
    began = time.monotonic()
    await run.result(timeout=5)
    assert time.monotonic() - began >= 0.25


async def test_history_keeps_the_last_finished_runs(jobs: Offload) -> None:
    runs = [await jobs.tasks["double"].defer(i) for i in range(5)]
    deadline = time.monotonic() + 5
    while {s.state for s in jobs.inline.list_runs()} != {RunState.SUCCESS}:
        assert time.monotonic() < deadline, jobs.inline.list_runs()
        await asyncio.sleep(0.01)
    assert [s.id for s in jobs.inline.list_runs()] == [r.id for r in reversed(runs[2:])]
    with pytest.raises(RunNotFoundError):
        await runs[0].status()
    assert (await runs[-1].status()).result == 8


async def test_defer_many_admits_every_call(jobs: Offload) -> None:
    runs = await jobs.tasks["double"].defer_many([{"x": 1}, {"x": 2}])
    assert [await r.result(timeout=5) for r in runs] == [2, 4]


async def test_full_backlog_raises_lane_full(tmp_path: Path) -> None:
    jobs = build(tmp_path, inline_max_concurrency=1, inline_max_backlog=0, inline_threads=1)
    async with jobs.lifespan(None):
        await jobs.tasks["hold"].defer()
        with pytest.raises(LaneFullError, match="spill=True") as full:
            await jobs.tasks["double"].defer(1)
        assert full.value.retry_after_s == 1.0
        jobs.release.set()  # type: ignore[attr-defined]
    jobs.close()


async def test_a_stopping_lane_spills_or_refuses_new_work(jobs: Offload) -> None:
    jobs.inline.begin_stop()
    with pytest.raises(LaneFullError, match="shutting down"):
        await jobs.tasks["double"].defer(1)
    spilled = await jobs.tasks["spillable"].defer(5)
    status = await spilled.status()
    assert (status.lane, status.state) == ("durable", RunState.PENDING)


async def test_guard_warns_once_naming_the_blocking_task(
    jobs: Offload, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="offload.guard")
    run = await jobs.tasks["blocks"].defer(0.4)
    await run.result(timeout=5)
    await asyncio.sleep(0.1)
    warnings = [r.getMessage() for r in caplog.records if "event loop blocked" in r.getMessage()]
    assert len(warnings) == 1
    assert f"by inline task 'blocks' (run {run.id})" in warnings[0]
    assert "time.sleep(seconds)" in warnings[0]
    assert "or declare the task def (it then runs on the inline lane's threads)" in warnings[0]


async def test_guard_names_each_culprit_of_one_stall(caplog: pytest.LogCaptureFixture) -> None:
    # Given a response whose endpoint blocks (FastAPI's first request to a route reads its
    # source) and then a blocking background task, with no turn of the loop in between
    caplog.set_level(logging.WARNING, logger="offload.guard")

    async def post_report() -> None:
        time.sleep(0.3)  # noqa: ASYNC251 - on purpose, for the guard

    async def endpoint(scope: dict[str, str]) -> None:
        time.sleep(0.3)  # noqa: ASYNC251 - on purpose, for the guard
        await BackgroundTask(post_report)()

    guard = LoopGuard()
    guard.start()
    episodes = metrics.LOOP_BLOCKED._value.get()
    try:
        await endpoint({"type": "http", "method": "POST", "path": "/reports"})
        await asyncio.sleep(0.1)
    finally:
        guard.stop()
    warnings = [r.getMessage() for r in caplog.records if r.name == "offload.guard"]
    # Then the one stall names both, each once
    assert len(warnings) == 2
    assert warnings[0].startswith("event loop blocked for more than")
    assert "by endpoint POST /reports, at " in warnings[0]
    assert "declare the endpoint def (FastAPI runs it on its threadpool)" in warnings[0]
    assert "task def" not in warnings[0]
    assert warnings[1].startswith("event loop still blocked for more than")
    assert "post_report' after endpoint POST /reports, at " in warnings[1]
    assert "in an async def BackgroundTasks function" in warnings[1]
    assert metrics.LOOP_BLOCKED._value.get() == episodes + 1


async def test_guard_says_when_no_line_of_the_application_blocks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a library's own blocking call (psutil waiting for a process) run by the loop with
    # none of this application's code on the stack, as FastAPI's first /openapi.json build is
    caplog.set_level(logging.WARNING, logger="offload.guard")
    sleeper = subprocess.Popen(["sleep", "0.4"])  # noqa: ASYNC220 - returns at once
    guard = LoopGuard()
    guard.start()
    try:
        asyncio.get_running_loop().call_soon(psutil.Process(sleeper.pid).wait)
        await asyncio.sleep(0.6)
    finally:
        guard.stop()
        sleeper.wait()
    [warning] = [r.getMessage() for r in caplog.records if r.name == "offload.guard"]
    # Then the guard names the library and gives advice that fits it, not about a task def
    assert "by a callback outside any task, at " in warning
    assert "/psutil/" in warning.split(";")[0]
    assert "no line of the application is on the stack: psutil blocks on its own" in warning
    assert "declare" not in warning


async def test_a_sync_run_ignoring_cancel_is_interrupted_after_the_grace(jobs: Offload) -> None:
    run = await jobs.tasks["ignores_cancel"].defer()
    await wait_for_state(run, RunState.STARTED)
    assert (await run.cancel()).state is RunState.STARTED  # asked; it does not listen
    status = await wait_for_state(run, RunState.CANCELLED, timeout=5)
    assert status.error == "TaskCancelledError: cancelled: the task ignored ctx.cancelled too long"
    # its thread is free again
    assert await (await jobs.tasks["double"].defer(2)).result(timeout=5) == 4
