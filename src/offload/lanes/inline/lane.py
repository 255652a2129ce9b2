"""The inline lane: runs in the API process after the response, without freezing the API.

Where each kind of task runs:

| task | runs in | bounded by (and by `inline_max_concurrency`) |
|---|---|---|
| `async def` | an asyncio task on the event loop, concurrently | the lane-wide limit |
| `def` | a thread of the lane's own `anyio.CapacityLimiter` | `inline_threads` |
| `cpu_bound=True` | a process of the lane's pool, lowest CPU priority | `inline_cpu_processes` |

Admission happens in `defer()`: a run takes a place if fewer than `inline_max_concurrency +
inline_max_backlog` runs are unfinished, else it spills to the durable lane (`spill=True`) or
`defer()` raises `LaneFullError`. Inside a request that uses the `deferrals` dependency, runs
start after the response is sent; elsewhere they start at once.

Every run is kept in memory while it is unfinished, and the last `inline_history` finished runs
after that, so `RunHandle`s and the status API see inline runs like durable ones. An attempt's
end means what it means on the durable lane (`core/attempt.py`): failures are logged with the
run id and traceback and counted; `retries=` retries in memory with the task's `Backoff`.

Shutdown (`stop()`): the lane stops taking work, hands every waiting `spill=True` run to the
durable lane under its own id, lets the rest run until `inline_drain_s`, then ends what is left
and logs each dropped run by task name and count.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio
import anyio.to_thread

from offload import metrics
from offload.core import attempt
from offload.core.attempt import Failure, Outcome
from offload.core.interrupt import (
    INTERRUPTS,
    CancelExpired,
    SoftTimeoutExpired,
    clear_interrupt,
    interrupt,
)
from offload.core.run import (
    TERMINAL_STATES,
    WAITING_STATES,
    JSONValue,
    Lane,
    RunState,
    RunStatus,
    new_run_id,
)
from offload.core.task import Call, Task
from offload.core.threads import BlockingCalls
from offload.errors import (
    ConfigurationError,
    IdempotencyConflictError,
    LaneFullError,
    RunNotFoundError,
)
from offload.lanes.inline import TASK_NAME_PREFIX
from offload.lanes.inline.deferrals import current_deferrals
from offload.lanes.inline.process import ChildFailure, HardTimeout, ProcessPool
from offload.lanes.inline.run import InlineRun
from offload.settings import Settings

logger = logging.getLogger("offload.inline")

Spill = Callable[[Task[Any, Any], Sequence[Call], Sequence[str] | None], list[str]]
"""`spill(task, calls, run_ids)`: record and publish calls on the durable lane (blocking), under
`run_ids` when given; returns the run ids."""


class InlineLane:
    """The inline lane of one app: admission, execution, the run registry, shutdown.

    It gets what it needs from the app that builds it: the settings and clock, the task
    registry (to start processes for its `cpu_bound` tasks), `spill` for the runs it hands to
    the durable lane, and `blocking` to run that spill off the event loop.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float],
        tasks: Mapping[str, Task[Any, Any]],
        spill: Spill,
        blocking: BlockingCalls,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._tasks = tasks
        self._spill = spill
        self._blocking = blocking
        self.max_concurrency = settings.inline_max_concurrency
        self.max_backlog = settings.inline_max_backlog
        self.history = settings.inline_history
        self.drain_s = settings.inline_drain_s
        self._runs: dict[str, InlineRun] = {}
        self._finished: deque[str] = deque()
        self._keys: dict[tuple[str, str], str] = {}
        self._waiting: deque[InlineRun] = deque()
        self._lock = threading.Lock()
        self._thread_lock = threading.Lock()  # hands a sync run's thread id over safely
        self._admitted = 0  # unfinished runs, under _lock (defer_sync comes from threads)
        self._running = 0  # attempts holding a slot; event-loop only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._threads: anyio.CapacityLimiter | None = None
        self._processes: ProcessPool | None = None
        self._idle: asyncio.Event | None = None
        self._stopping = False
        self._stop_deadline = 0.0
        self._spilling: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<InlineLane running={self._running} unfinished={self._admitted}>"

    # --- life ---------------------------------------------------------------------------------

    @property
    def is_started(self) -> bool:
        """True between `start()` and the end of `stop()`."""
        return self._loop is not None

    @property
    def unfinished(self) -> int:
        """Runs admitted and not finished: waiting for a slot or the response, or running."""
        return self._admitted

    @property
    def is_stopping(self) -> bool:
        """True once shutdown began: `defer()` spills or raises `LaneFullError` from then on."""
        return self._stopping

    async def start(self) -> None:
        """Bind the lane to the running event loop (called by `jobs.lifespan`)."""
        if self._loop is not None:
            raise ConfigurationError("the inline lane is already started")
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._threads = anyio.CapacityLimiter(self._settings.inline_threads)
        self._idle = asyncio.Event()
        self._idle.set()
        # Read at scrape time: no per-run cost. The last started lane of a process reports.
        metrics.INLINE_RUNNING.set_function(lambda: self._running)
        metrics.INLINE_WAITING.set_function(lambda: len(self._waiting))
        self._stopping = False
        cpu_tasks = [
            t for t in self._tasks.values() if t.policy.lane is Lane.INLINE and t.policy.cpu_bound
        ]
        if cpu_tasks:
            self._processes = ProcessPool(
                self._settings.inline_cpu_processes, on_started=self._mark_started
            )
            self._processes.start(sorted({t.fn.__module__ for t in cpu_tasks}))

    async def wait_idle(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until every admitted run has finished (for tests and scripts).

        Raises `TimeoutError` after `timeout` seconds (None waits forever).
        """
        if self._idle is None:
            return
        async with asyncio.timeout(timeout):
            await self._idle.wait()

    def begin_stop(self) -> None:
        """Stop taking work and spill waiting `spill=True` runs; the drain deadline starts now.

        Safe to call more than once, and from a signal handler's `call_soon_threadsafe`.
        """
        if self._stopping or self._loop is None:
            return
        self._stopping = True
        self._stop_deadline = time.monotonic() + self.drain_s
        # Only runs no worker holds: a sync run waiting for a thread may start any moment.
        spillable = [
            r
            for r in self._runs.values()
            if r.state in WAITING_STATES and r.task.policy.spill and not r.gone and r.worker is None
        ]
        if spillable:
            self._spilling = self._loop.create_task(self._spill_waiting(spillable))
        logger.info(
            "inline lane stopping: %d run(s) unfinished, %d to spill, drain deadline %.1fs",
            self._admitted,
            len(spillable),
            self.drain_s,
        )

    async def stop(self) -> None:
        """Drain: wait until `inline_drain_s` after `begin_stop()`, then drop what is left."""
        if self._loop is None:
            return
        self.begin_stop()
        if self._spilling is not None:
            await self._spilling
        assert self._idle is not None
        remaining = self._stop_deadline - time.monotonic()
        if self._admitted and remaining > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), remaining)
        await self._drop_unfinished()
        if self._processes is not None:
            await self._processes.aclose()
            self._processes = None
        self._spilling = None
        self._loop = None

    async def _drop_unfinished(self) -> None:
        left = [r for r in self._runs.values() if r.state not in TERMINAL_STATES and not r.gone]
        if not left:
            return
        names = Counter(r.task.name for r in left)
        listed = ", ".join(f"{name} x{count}" for name, count in sorted(names.items()))
        logger.error(
            "inline lane stopped after its %.1fs drain deadline with %d unfinished run(s) "
            "dropped: %s (ids: %s); declare tasks with spill=True to hand them to the "
            "durable lane instead",
            self.drain_s,
            len(left),
            listed,
            ", ".join(r.id for r in left),
        )
        for name, count in names.items():
            metrics.INLINE_DROPPED.labels(name).inc(count)
        workers = []
        for run in left:
            run.cancel_requested = True
            if run.worker is not None and run.task.is_async and not run.task.policy.cpu_bound:
                run.worker.cancel()
                workers.append(run.worker)
            if run.state not in TERMINAL_STATES:
                self._finish(run, RunState.CANCELLED, error="dropped at shutdown (drain deadline)")
        if workers:
            await asyncio.wait(workers, timeout=1.0)

    # --- admission ----------------------------------------------------------------------------

    def _reserve(self, task: Task[Any, Any], count: int) -> bool:
        with self._lock:
            if self._stopping or self._admitted + count > self.max_concurrency + self.max_backlog:
                return False
            self._admitted += count
            return True

    def _full_error(self, task: Task[Any, Any]) -> LaneFullError:
        metrics.INLINE_REJECTED.labels(task.name).inc()
        if self._stopping:
            return LaneFullError(
                f"the inline lane is shutting down and {task.name!r} may not spill; "
                "retry against another instance",
                retry_after_s=5.0,
            )
        return LaneFullError(
            f"the inline lane is full ({self._admitted} unfinished runs, limit "
            f"{self.max_concurrency} running + {self.max_backlog} waiting); "
            f"declare {task.name!r} with spill=True to send overflow to the durable lane, "
            "or raise OFFLOAD_INLINE_MAX_BACKLOG",
            retry_after_s=1.0,
        )

    def _existing(self, task: Task[Any, Any], calls: Sequence[Call]) -> str | None:
        key = calls[0].idempotency_key if len(calls) == 1 else None
        if key is None:
            return None
        run = self._runs.get(self._keys.get((task.name, key), ""))
        if run is None:
            return None
        if run.kwargs != calls[0].kwargs:
            raise IdempotencyConflictError(task.name, key, run.id)
        return run.id

    def _require_started(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise ConfigurationError(
                "the inline lane is not running: start it with "
                "FastAPI(lifespan=jobs.lifespan), or `async with jobs.lifespan(app):`"
            )
        return self._loop

    def submit(self, task: Task[Any, Any], calls: Sequence[Call]) -> list[str]:
        """Admit validated calls (from any thread); spill or raise `LaneFullError` when full.

        Returns the run ids.
        """
        run_ids = self._admit_unless_full(task, calls)
        return run_ids if run_ids is not None else self._spill_calls(task, calls)

    async def submit_async(self, task: Task[Any, Any], calls: Sequence[Call]) -> list[str]:
        """`submit()` for the event loop: a spill's ledger and broker work runs off the loop."""
        run_ids = self._admit_unless_full(task, calls)
        if run_ids is None:
            run_ids = await self._blocking.run(self._spill_calls, task, calls)
        return run_ids

    def _admit_unless_full(self, task: Task[Any, Any], calls: Sequence[Call]) -> list[str] | None:
        """The ids of admitted (or already known) runs; None when they must spill."""
        self._require_started()
        existing = self._existing(task, calls)
        if existing is not None:
            return [existing]
        if self._reserve(task, len(calls)):
            return self._admit(task, calls)
        if not task.policy.spill:
            raise self._full_error(task)
        return None

    def _admit(self, task: Task[Any, Any], calls: Sequence[Call]) -> list[str]:
        deferrals = current_deferrals.get()
        now = self._clock()
        on_loop = threading.get_ident() == self._loop_thread
        run_ids: list[str] = []
        for call in calls:
            run = InlineRun(
                id=new_run_id(),
                task=task,
                kwargs=call.kwargs,
                created_at=now,
                context=contextvars.copy_context(),
                delay_s=call.countdown_s,
                idempotency_key=call.idempotency_key,
            )
            self._runs[run.id] = run
            if run.idempotency_key is not None:
                self._keys[(task.name, run.idempotency_key)] = run.id
            if self._idle is not None:
                self._idle.clear()
            if deferrals is not None and not deferrals.closed:
                deferrals.add(functools.partial(self.launch, run))
            elif on_loop:
                self.launch(run)
            else:
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self.launch, run)
            run_ids.append(run.id)
        return run_ids

    def _spill_calls(self, task: Task[Any, Any], calls: Sequence[Call]) -> list[str]:
        reason = "shutdown" if self._stopping else "full"
        run_ids = self._spill(task, calls, None)
        metrics.INLINE_SPILLED.labels(task.name, reason).inc(len(calls))
        logger.info(
            "%d run(s) of %s spilled to the durable lane (%s): %s",
            len(run_ids),
            task.name,
            "lane stopping" if self._stopping else "inline lane full",
            ", ".join(run_ids),
        )
        return run_ids

    async def _spill_waiting(self, runs: list[InlineRun]) -> None:
        by_task: dict[str, list[InlineRun]] = {}
        for run in runs:
            run.gone = True  # nothing starts it from now on
            if run in self._waiting:
                self._waiting.remove(run)
            by_task.setdefault(run.task.name, []).append(run)
        for group in by_task.values():
            task = group[0].task
            calls = [self._call_of(run) for run in group]
            try:
                await self._blocking.run(self._spill, task, calls, [r.id for r in group])
            except Exception:
                # Keep them here: they may still run before the drain deadline.
                logger.exception(
                    "spilling %d waiting run(s) of %s to the durable lane failed; "
                    "keeping them in the inline lane",
                    len(group),
                    task.name,
                )
                for run in group:
                    run.gone = False
                    if run.launched:
                        self._enqueue(run)
                continue
            metrics.INLINE_SPILLED.labels(task.name, "shutdown").inc(len(group))
            for run in group:
                self._forget(run)
            logger.warning(
                "%d waiting run(s) of %s handed to the durable lane at shutdown: %s",
                len(group),
                task.name,
                ", ".join(r.id for r in group),
            )

    def _call_of(self, run: InlineRun) -> Call:
        task = run.task
        return Call(
            task=task.name,
            kwargs=run.kwargs,
            queue=task.queue,
            priority=task.policy.priority,
            countdown_s=None,
            idempotency_key=None,
        )

    # --- scheduling (event loop) --------------------------------------------------------------

    def launch(self, run: InlineRun) -> None:
        """Hand an admitted run to the lane (after its request's response, or at once)."""
        if run.launched or run.gone or run.state is not RunState.PENDING:
            return
        run.launched = True
        if run.delay_s:
            assert self._loop is not None
            self._loop.call_later(run.delay_s, self._enqueue, run)
        else:
            self._enqueue(run)

    def _enqueue(self, run: InlineRun) -> None:
        if run.gone or run.state not in WAITING_STATES:
            return
        if self._running < self.max_concurrency:
            self._start(run)
        else:
            self._waiting.append(run)

    def _fill_slots(self) -> None:
        while self._waiting and self._running < self.max_concurrency:
            run = self._waiting.popleft()
            if not run.gone and run.state in WAITING_STATES:
                self._start(run)

    def _start(self, run: InlineRun) -> None:
        assert self._loop is not None
        self._running += 1
        run.worker = self._loop.create_task(
            self._execute(run),
            name=f"{TASK_NAME_PREFIX}{run.task.name}:{run.id}",
            context=run.context,
        )

    # --- running one attempt (event loop) -----------------------------------------------------

    async def _execute(self, run: InlineRun) -> None:
        task = run.task
        run.attempts += 1
        run.attempt_started = time.monotonic()
        if not task.policy.cpu_bound and task.is_async:
            self._mark_started(run)
        try:
            if task.is_async and task.policy.timeout is None and not task.policy.cpu_bound:
                # The common case, `attempt.call` written out: no extra coroutine or call, and
                # arguments that were validated in this process a moment ago cannot be stale.
                args = (run.context_for_attempt(),) if task.signature.takes_context else ()
                value = await task.fn(*args, **task.signature.from_json(run.kwargs))
                result = task.encode_result(value)
            else:
                result = await self._call(run)
        except asyncio.CancelledError:
            if not run.cancel_requested:
                self._finish(run, RunState.CANCELLED, error="CancelledError: the lane was stopped")
                raise
            self._finish(run, RunState.CANCELLED)
        except ChildFailure as exc:
            self._failed(run, exc.failure)
        except Exception as exc:  # noqa: BLE001 - logged with its traceback and counted
            self._failed(run, attempt.describe(exc, task.policy))
        else:
            if run.cancel_requested:
                self._finish(run, RunState.CANCELLED)
            else:
                run.result = result
                self._finish(run, RunState.SUCCESS)
        finally:
            run.worker = None
            self._running -= 1
            self._fill_slots()

    def _mark_started(self, run: InlineRun) -> None:
        if run.state in TERMINAL_STATES:
            return
        run.state = RunState.STARTED
        if run.started_at is None:
            run.started_at = self._clock()

    async def _call(self, run: InlineRun) -> JSONValue:
        """One attempt; returns its result as JSON (what the status API shows)."""
        task = run.task
        if task.policy.cpu_bound:
            assert self._processes is not None
            return await self._processes.run(run)
        kwargs = attempt.arguments(task, run.kwargs)
        ctx = run.context_for_attempt() if task.signature.takes_context else None
        if task.is_async:
            coro = attempt.call(task, ctx, kwargs)
            timeout = task.policy.timeout
            value = await (
                coro if timeout is None else attempt.within_soft_timeout(coro, timeout.soft)
            )
        else:
            value = await self._in_thread(run, functools.partial(attempt.call, task, ctx, kwargs))
        return task.encode_result(value)

    async def _in_thread(self, run: InlineRun, fn: Callable[[], Any]) -> Any:
        def work() -> Any:
            with self._thread_lock:
                if run.cancel_requested:
                    raise asyncio.CancelledError  # cancelled before a thread took it
                run.thread_id = threading.get_ident()
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._mark_started, run)
            try:
                return fn()
            finally:
                while True:
                    try:
                        with self._thread_lock:
                            # Clear a soft timeout that was set but not yet raised.
                            clear_interrupt(threading.get_ident())
                            run.thread_id = None
                        break
                    except INTERRUPTS:
                        continue

        inner = asyncio.ensure_future(
            anyio.to_thread.run_sync(work, limiter=self._threads, abandon_on_cancel=True)
        )
        timeout = run.task.policy.timeout
        if timeout is None:
            return await inner
        try:
            return await asyncio.wait_for(asyncio.shield(inner), timeout.soft)
        except TimeoutError:
            if inner.done():
                return inner.result()  # the task's own TimeoutError (or SoftTimeoutExpired) rises
            with self._thread_lock:
                if run.thread_id is not None:
                    interrupt(run.thread_id, SoftTimeoutExpired)
        try:
            return await asyncio.wait_for(asyncio.shield(inner), timeout.hard_s - timeout.soft)
        except TimeoutError:
            if inner.done():
                return inner.result()
            inner.cancel()
            raise HardTimeout(
                f"hard timeout of {timeout.hard_s:g}s expired; the thread is abandoned "
                "and keeps one of the lane's threads until it returns"
            ) from None

    # --- outcomes (event loop) ----------------------------------------------------------------

    def _failed(self, run: InlineRun, failure: Failure) -> None:
        task = run.task
        if failure.outcome is Outcome.CANCELLED:
            self._finish(run, RunState.CANCELLED, error=failure.error)
            return
        run.failures += 1
        run.error = failure.error
        run.traceback = failure.traceback
        wait = attempt.retry_in(task.policy, failure, run.failures)
        if run.cancel_requested or self._stopping:
            wait = None
        attempt.log_failure(logger, run.id, task.name, run.attempts, failure, wait)
        if wait is None:
            self._finish(run, RunState.FAILURE, error=run.error)
            return
        run.state = RunState.RETRY
        metrics.INLINE_RETRIES.labels(task.name).inc()
        assert self._loop is not None
        self._loop.call_later(wait, self._enqueue, run)

    def _finish(self, run: InlineRun, state: RunState, *, error: str | None = None) -> None:
        if run.state in TERMINAL_STATES:
            return
        run.state = state
        if error is not None:
            run.error = error
        run.finished_at = self._clock()
        ran = run.attempt_started and run.started_at is not None
        duration = time.monotonic() - run.attempt_started if ran else None
        attempt.count_finished(run.task.name, Lane.INLINE, state, duration)
        with self._lock:
            self._admitted -= 1
            idle = self._admitted == 0
        if idle and self._idle is not None:
            self._idle.set()
        run.context = None  # it may hold a request's objects; the history must not
        self._finished.append(run.id)
        while len(self._finished) > self.history:
            old = self._runs.get(self._finished.popleft())
            if old is not None:
                self._forget(old, admitted=False)
        if state is RunState.SUCCESS:
            logger.debug("run %s %s succeeded", run.id, run.task.name)

    def _forget(self, run: InlineRun, *, admitted: bool = True) -> None:
        """Drop a run from the registry (spilled, or too old)."""
        self._runs.pop(run.id, None)
        if run.idempotency_key is not None:
            self._keys.pop((run.task.name, run.idempotency_key), None)
        if admitted and run.state not in TERMINAL_STATES:
            with self._lock:
                self._admitted -= 1
                idle = self._admitted == 0
            if idle and self._idle is not None:
                self._idle.set()

    def forget_finished(self) -> None:
        """Drop every finished run from memory (`offload.testing`: each test starts empty)."""
        for run in [r for r in self._runs.values() if r.state in TERMINAL_STATES]:
            self._forget(run)
        kept = set(self._runs)
        self._finished = deque(run_id for run_id in self._finished if run_id in kept)

    # --- asking about runs --------------------------------------------------------------------

    def status(self, run_id: str) -> RunStatus | None:
        """The status of an inline run this process knows, else None."""
        run = self._runs.get(run_id)
        return None if run is None else run.status()

    def arguments_of(self, run_id: str) -> dict[str, JSONValue]:
        """An inline run's arguments, as JSON; {} for a run this lane does not hold."""
        run = self._runs.get(run_id)
        return {} if run is None else dict(run.kwargs)

    def traceback_of(self, run_id: str) -> str | None:
        """The traceback of an inline run's last failed attempt."""
        run = self._runs.get(run_id)
        return None if run is None else run.traceback

    def list_runs(self) -> list[RunStatus]:
        """Every inline run this process remembers, newest first."""
        return [r.status() for r in reversed(list(self._runs.values()))]

    def listing(self) -> list[tuple[float, RunStatus]]:
        """`list_runs()` with each run's `created_at` as stored (a page position)."""
        return [(r.created_at, r.status()) for r in reversed(list(self._runs.values()))]

    def cancel(self, run_id: str) -> RunStatus:
        """Cancel a waiting run; stop a running one (from the event loop's thread).

        An `async def` run's asyncio task is cancelled; a `def` or `cpu_bound` run is asked to
        stop through `ctx.cancelled`. Raises `RunNotFoundError` for an id the lane does not hold.
        """
        run = self._runs.get(run_id)
        if run is None:
            raise RunNotFoundError(run_id)
        if run.state in TERMINAL_STATES:
            return run.status()
        with self._thread_lock:
            run.cancel_requested = True
            in_thread = run.thread_id is not None
        if run.worker is None:
            if run in self._waiting:
                self._waiting.remove(run)
            self._finish(run, RunState.CANCELLED)
        elif run.task.policy.cpu_bound:
            if self._processes is None or not self._processes.cancel(run):
                run.worker.cancel()  # still waiting for a process
                self._finish(run, RunState.CANCELLED)
        elif run.task.is_async or not in_thread:
            # A sync run no thread took yet never starts: `work()` checks the flag first.
            run.worker.cancel()
            self._finish(run, RunState.CANCELLED)
        if run.state not in TERMINAL_STATES:
            # As on the durable lane: a run ignoring `ctx.cancelled` this long is interrupted.
            assert self._loop is not None
            self._loop.call_later(self._settings.cancel_grace_s, self._interrupt, run)
        logger.info("run %s %s: cancel requested (%s)", run.id, run.task.name, run.state)
        return run.status()

    def _interrupt(self, run: InlineRun) -> None:
        if run.state in TERMINAL_STATES:
            return
        logger.warning(
            "run %s %s ignored its cancel request for %gs; raising TaskCancelledError in it",
            run.id,
            run.task.name,
            self._settings.cancel_grace_s,
        )
        if run.task.policy.cpu_bound:
            if self._processes is not None:
                self._processes.interrupt(run)
            return
        with self._thread_lock:
            if run.thread_id is not None:
                interrupt(run.thread_id, CancelExpired)

    def cancel_threadsafe(self, run_id: str) -> RunStatus:
        """`cancel()` from any thread."""
        loop = self._loop
        if loop is None or threading.get_ident() == self._loop_thread:
            return self.cancel(run_id)
        return asyncio.run_coroutine_threadsafe(self._cancel_async(run_id), loop).result(10)

    async def _cancel_async(self, run_id: str) -> RunStatus:
        return self.cancel(run_id)

    def knows(self, run_id: str) -> bool:
        """True if the lane holds this run id."""
        return run_id in self._runs
