"""Running one attempt of a durable run inside a worker process.

The ledger decides whether a delivery may run (`queries.claim`): a finished run is skipped, a
run another live worker is running is parked, a run whose worker died gets a new attempt. The
attempt runs with its context and timeouts, and its outcome is one ledger transaction before
the message is acknowledged.

Timeouts: at the soft deadline the watchdog raises `TaskTimeoutError` in the task. A task on
a process's main thread (prefork children run `cpu_bound` tasks there) gets it from a signal
handler, so sleeps and blocking calls are interrupted; a task in a pool thread gets it as an
asynchronous exception (Python code only: a blocking C call sees it when it returns).
`async def` tasks get an `asyncio` timeout. At the hard deadline the watchdog records the
attempt as timed out and ends the process, which is the only way to stop a thread;
`offload worker` starts a new one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from celery.exceptions import Reject

from offload.context import TaskContext
from offload.errors import (
    LedgerError,
    Retry,
    TaskArgumentsError,
    TaskCancelledError,
    TaskTimeoutError,
)
from offload.interrupt import Running, SoftTimeoutExpired, cancel_watcher, watchdog
from offload.ledger import queries
from offload.run import RunState

if TYPE_CHECKING:
    from offload.app import Offload
    from offload.task import Task

logger = logging.getLogger("offload.durable")

T = TypeVar("T")

LEDGER_RETRY_MAX_PAUSE_S = 5.0
"""Longest pause between two tries of a ledger write during an outage."""


def _process_start_ticks(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # Field 22 is the start time; the command name (field 2) may hold spaces.
            return stat.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return "0"


_HOST = socket.gethostname()


def worker_identity() -> str:
    """`host:pid:start` of this process: names the attempt's owner, survives pid reuse."""
    pid = os.getpid()
    return f"{_HOST}:{pid}:{_process_start_ticks(pid)}"


def is_alive(identity: str) -> bool:
    """False when `identity` names a process on this host that no longer exists.

    A process on another host cannot be checked from here: it counts as alive until its
    heartbeat goes stale.
    """
    host, _, rest = identity.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != _HOST or not pid_text.isdigit():
        return True
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start in ("", "0") or _process_start_ticks(pid) == start


_loops = threading.local()


def _event_loop_runner() -> asyncio.Runner:
    """A persistent event loop per thread (and per process after a fork) for async tasks."""
    runner: asyncio.Runner | None = getattr(_loops, "runner", None)
    if runner is None or getattr(_loops, "pid", None) != os.getpid():
        runner = asyncio.Runner()
        _loops.runner = runner
        _loops.pid = os.getpid()
    return runner


async def _with_soft_timeout(coro: Coroutine[Any, Any, Any], soft_s: float | None) -> Any:
    if soft_s is None:
        return await coro
    timeout = asyncio.timeout(soft_s)
    try:
        async with timeout:
            return await coro
    except TimeoutError:
        if timeout.expired():
            raise SoftTimeoutExpired(f"soft timeout of {soft_s:g}s expired") from None
        raise


def _error_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class Executor:
    """Runs attempts for one Offload app in a worker process."""

    def __init__(self, app: Offload) -> None:
        self.app = app
        self.settings = app.settings
        self.ledger = app.ledger
        self.identity = ""

    def execute(self, task: Task[Any, Any], run_id: str, message_kwargs: dict[str, Any]) -> None:
        """Handle one delivery of `run_id`. Returns normally when the message may be acked."""
        if self.identity == "" or f":{os.getpid()}:" not in self.identity:
            self.identity = worker_identity()
        clock = self.ledger.clock
        outcome = self._persist(
            run_id,
            task,
            "deciding whether to start it",
            lambda conn: queries.claim(
                conn,
                run_id=run_id,
                task=task.name,
                args=message_kwargs,
                queue=task.queue,
                worker=self.identity,
                now=clock(),
                stale_after_s=self.settings.stale_after_s,
                max_lost_attempts=self.settings.max_lost_attempts,
                is_alive=is_alive,
            ),
        )
        if isinstance(outcome, queries.Skip):
            logger.info("run %s %s skipped: %s", run_id, task.name, outcome.reason)
            return
        if isinstance(outcome, queries.Park):
            delay = max(0.0, outcome.until - clock())
            logger.info("run %s %s parked %.1fs: %s", run_id, task.name, delay, outcome.reason)
            self._republish(task, run_id, delay)
            return
        self._attempt(task, run_id, outcome)

    def _persist(
        self, run_id: str, task: Task[Any, Any], doing: str, write: Callable[[Any], T]
    ) -> T:
        """Write to the ledger, waiting out an outage of up to `ledger_outage_s`.

        The message stays unacknowledged meanwhile (the broker's lease is extended), so
        nothing is lost; after the deadline it is handed back to the broker. These writes
        happen outside the task's own call, where no timeout or cancel interrupt lands, so the
        pool's threads may commit them together.
        """
        deadline = time.monotonic() + self.settings.ledger_outage_s
        pause = 0.25
        while True:
            try:
                return self.ledger.write_grouped(write)
            except LedgerError:
                if time.monotonic() + pause > deadline:
                    logger.exception(
                        "run %s %s: ledger unreachable while %s for %.0fs; "
                        "handing the message back",
                        run_id,
                        task.name,
                        doing,
                        self.settings.ledger_outage_s,
                    )
                    raise Reject("ledger unreachable", requeue=True) from None
                logger.warning(
                    "run %s %s: ledger unreachable while %s; retrying in %.1fs",
                    run_id,
                    task.name,
                    doing,
                    pause,
                    exc_info=True,
                )
            time.sleep(pause)
            pause = min(pause * 2, LEDGER_RETRY_MAX_PAUSE_S)

    def _republish(self, task: Task[Any, Any], run_id: str, delay: float) -> None:
        try:
            message = self.ledger.read(lambda conn: queries.get_message(conn, run_id))
            self.app.durable.publish_one(message, countdown_s=delay)
        except Exception:
            # Keep the message: the broker hands it back and we decide again.
            logger.exception("run %s %s: re-publishing failed; requeueing", run_id, task.name)
            raise Reject("re-publish failed", requeue=True) from None

    def _attempt(self, task: Task[Any, Any], run_id: str, claimed: queries.Claimed) -> None:
        attempt = claimed.attempt
        clock = self.ledger.clock
        logger.debug("run %s %s attempt %d started", run_id, task.name, attempt)

        def write_progress(fraction: float, message: str | None) -> None:
            try:
                self.ledger.write(
                    lambda conn: queries.record_progress(
                        conn, run_id, attempt, fraction, message, clock()
                    )
                )
            except LedgerError:
                # Progress is a view; the task goes on and the next report may get through.
                logger.warning("run %s %s: progress not recorded", run_id, task.name, exc_info=True)

        def probe_cancel() -> bool:
            try:
                return self.ledger.read(lambda conn: queries.is_cancel_requested(conn, run_id))
            except LedgerError:
                logger.warning(
                    "run %s %s: cannot read cancel requests", run_id, task.name, exc_info=True
                )
                return False

        ctx = TaskContext(
            run_id=run_id,
            task=task.name,
            attempt=attempt,
            write_progress=write_progress,
            probe_cancel=probe_cancel,
            progress_interval_s=self.settings.progress_interval_s,
        )
        try:
            kwargs = task.signature.from_json(claimed.args)
        except TaskArgumentsError as exc:
            self._fail(
                task,
                run_id,
                attempt,
                claimed.failures,
                exc,
                outcome="error",
                retry=False,
                error=f"TaskArgumentsError: the stored arguments no longer fit the task "
                f"(was its signature changed?): {exc}",
            )
            return
        started = time.monotonic()
        try:
            value = self._call(task, ctx, kwargs, run_id, attempt, claimed.failures)
            result = task.signature.result_adapter.dump_python(value, mode="json")
        except TaskCancelledError:
            ctx.flush()
            self._record_cancelled(task, run_id, attempt)
            return
        except Retry as exc:
            ctx.flush()
            self._fail(
                task,
                run_id,
                attempt,
                claimed.failures,
                exc,
                outcome="error",
                retry=True,
                delay=exc.delay,
            )
            return
        except TaskTimeoutError as exc:
            ctx.flush()
            soft = task.policy.timeout.soft if task.policy.timeout else None
            error = TaskTimeoutError(f"soft timeout of {soft:g}s expired") if soft else exc
            self._fail(task, run_id, attempt, claimed.failures, error, outcome="timeout")
            return
        except Exception as exc:  # noqa: BLE001 - every task error is recorded in the ledger
            ctx.flush()
            self._fail(task, run_id, attempt, claimed.failures, exc, outcome="error")
            return
        ctx.flush()
        self._record_returned(task, run_id, attempt, result, started)

    def _record_cancelled(self, task: Task[Any, Any], run_id: str, attempt: int) -> None:
        """The task stopped for a cancel (`TaskCancelledError`): CANCELLED."""
        now = self.ledger.clock()
        recorded = self._persist(
            run_id,
            task,
            "recording its cancellation",
            lambda conn: queries.finish_cancelled(conn, run_id, attempt, now),
        )
        if recorded:
            logger.info("run %s %s cancelled during attempt %d", run_id, task.name, attempt)
        else:
            self._log_unrecorded(task, run_id, attempt)

    def _record_returned(
        self, task: Task[Any, Any], run_id: str, attempt: int, result: Any, started: float
    ) -> None:
        """The task returned: SUCCESS, or CANCELLED if its run was cancelled meanwhile."""
        now = self.ledger.clock()
        state = self._persist(
            run_id,
            task,
            "recording its success",
            lambda conn: queries.finish_returned(conn, run_id, attempt, result, now),
        )
        if state is RunState.SUCCESS:
            logger.info(
                "run %s %s succeeded in %.3fs (attempt %d)",
                run_id,
                task.name,
                time.monotonic() - started,
                attempt,
            )
        elif state is RunState.CANCELLED:
            logger.info("run %s %s cancelled during attempt %d", run_id, task.name, attempt)
        else:
            self._log_unrecorded(task, run_id, attempt)

    @staticmethod
    def _log_unrecorded(task: Task[Any, Any], run_id: str, attempt: int) -> None:
        logger.warning(
            "run %s %s: attempt %d finished after it was declared lost; "
            "its outcome is not recorded",
            run_id,
            task.name,
            attempt,
        )

    def _call(
        self,
        task: Task[Any, Any],
        ctx: TaskContext,
        kwargs: dict[str, Any],
        run_id: str,
        attempt: int,
        failures: int,
    ) -> Any:
        args = (ctx,) if task.signature.takes_context else ()

        def record_cancelled() -> None:
            self.ledger.write(
                lambda conn: queries.finish_cancelled(conn, run_id, attempt, self.ledger.clock())
            )

        running = Running(task.name, attempt, threading.get_ident(), ctx, record_cancelled)
        cancel_watcher.add(self, run_id, running)
        try:
            return self._call_with_timeouts(task, ctx, args, kwargs, run_id, attempt, failures)
        finally:
            cancel_watcher.remove(run_id)

    def _call_with_timeouts(
        self,
        task: Task[Any, Any],
        ctx: TaskContext,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        run_id: str,
        attempt: int,
        failures: int,
    ) -> Any:
        timeout = task.policy.timeout
        if timeout is None:
            if task.is_async:
                return _event_loop_runner().run(task.fn(*args, **kwargs))
            return task.fn(*args, **kwargs)

        def on_hard() -> None:
            error = TaskTimeoutError(
                f"hard timeout of {timeout.hard_s:g}s expired; the worker process was ended"
            )
            # No re-publish: the broker hands the unacked message back after the exit.
            self._fail(task, run_id, attempt, failures, error, outcome="timeout", republish=False)

        # An async task's soft deadline is an asyncio timeout; the watchdog keeps the hard one.
        token = watchdog.arm(
            soft_s=None if task.is_async else timeout.soft, hard_s=timeout.hard_s, on_hard=on_hard
        )
        try:
            if task.is_async:
                return _event_loop_runner().run(
                    _with_soft_timeout(task.fn(*args, **kwargs), timeout.soft)
                )
            return task.fn(*args, **kwargs)
        finally:
            watchdog.disarm(token)

    def _fail(
        self,
        task: Task[Any, Any],
        run_id: str,
        attempt: int,
        failures_before: int,
        exc: BaseException,
        *,
        outcome: str,
        retry: bool | None = None,
        delay: float | None = None,
        error: str | None = None,
        republish: bool = True,
    ) -> None:
        """Record a failed attempt and schedule the next one, or declare the run dead."""
        failures = failures_before + 1
        policy = task.policy
        if retry is None:
            retry = policy.should_retry(exc, failures)
        elif retry:
            retry = failures <= policy.retries
        error = error or _error_line(exc)
        trace = "".join(traceback.format_exception(exc)) if exc.__traceback__ else None
        now = self.ledger.clock()
        wait = (delay if delay is not None else policy.backoff.delay(failures)) if retry else 0.0
        retry_at = now + wait if retry else None
        recorded = self._persist(
            run_id,
            task,
            "recording its failure",
            lambda conn: queries.finish_failure(
                conn,
                run_id,
                attempt,
                now,
                outcome=outcome,
                error=error,
                traceback=trace,
                retry_at=retry_at,
            ),
        )
        if not recorded:
            logger.warning(
                "run %s %s: attempt %d failed after it was declared lost: %s",
                run_id,
                task.name,
                attempt,
                error,
            )
            return
        if retry_at is None:
            logger.error(
                "run %s %s failed on attempt %d, no retries left (dead): %s",
                run_id,
                task.name,
                attempt,
                error,
            )
            return
        logger.warning(
            "run %s %s failed on attempt %d: %s; retrying in %.2fs",
            run_id,
            task.name,
            attempt,
            error,
            wait,
        )
        if not republish:
            return
        self._republish(task, run_id, wait)
