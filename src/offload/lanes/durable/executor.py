"""Running one attempt of a durable run inside a worker process. No Celery type appears here.

The ledger decides whether a delivery may run (`queries.claim`): a finished run is skipped, a
run another live worker is running is parked, a run whose worker died gets a new attempt. The
attempt runs with its context and timeouts; what its end means is `core.attempt`'s to say, the
same as on the inline lane; and its outcome is one ledger transaction before the message is
acknowledged.

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
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from offload.core import attempt
from offload.core.attempt import Failure, Outcome
from offload.core.context import TaskContext
from offload.core.process import is_alive, worker_identity
from offload.core.run import RunState
from offload.core.task import Task
from offload.errors import LedgerError, TaskTimeoutError
from offload.lanes.durable.watch import Running, cancel_watcher, watchdog
from offload.ledger import Ledger, queries
from offload.settings import Settings

logger = logging.getLogger("offload.durable")

T = TypeVar("T")

LEDGER_RETRY_MAX_PAUSE_S = 5.0
"""Longest pause between two tries of a ledger write during an outage."""

Republish = Callable[[queries.RunMessage, float | None], None]
"""`republish(message, countdown_s)`: publish a message for an existing run again."""


class HandBack(Exception):
    """Raised by `Executor.execute` when the message must go back to the broker unacknowledged:
    the ledger stayed unreachable, or publishing a retry failed. The broker delivers it again."""


@dataclass(frozen=True)
class Ended:
    """How an attempt ended, as the ledger recorded it: what Celery's task events are told."""

    state: RunState  # SUCCESS, RETRY, FAILURE or CANCELLED
    result: Any = None  # SUCCESS: the JSON result
    error: str | None = None  # RETRY, FAILURE: the attempt's error
    retry_in_s: float | None = None  # RETRY: when the next attempt is due


_loops = threading.local()


def _event_loop_runner() -> asyncio.Runner:
    """A persistent event loop per thread (and per process after a fork) for async tasks."""
    runner: asyncio.Runner | None = getattr(_loops, "runner", None)
    if runner is None or getattr(_loops, "pid", None) != os.getpid():
        runner = asyncio.Runner()
        _loops.runner = runner
        _loops.pid = os.getpid()
    return runner


class Executor:
    """Runs attempts of one app's durable runs in a worker process."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        republish: Republish,
        *,
        may_end_process: bool = True,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self._republish_message = republish
        # False in a test process (offload.testing): a hard timeout or an ignored cancel
        # would end it, so neither is enforced there; soft timeouts still are.
        self.may_end_process = may_end_process
        self.identity = ""

    def execute(
        self, task: Task[Any, Any], run_id: str, message_kwargs: dict[str, Any]
    ) -> Ended | None:
        """Handle one delivery of `run_id`. Returns normally when the message may be acked:
        how its attempt ended, or None if it ran no attempt (skipped, parked) or its outcome
        was not recorded (the attempt had been declared lost).

        Raises `HandBack` when it may not.
        """
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
            return None
        if isinstance(outcome, queries.Park):
            delay = max(0.0, outcome.until - clock())
            logger.info("run %s %s parked %.1fs: %s", run_id, task.name, delay, outcome.reason)
            self._republish(task, run_id, delay)
            return None
        return self._attempt(task, run_id, outcome)

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
                    raise HandBack("ledger unreachable") from None
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
            self._republish_message(message, delay)
        except Exception:
            # Keep the message: the broker hands it back and we decide again.
            logger.exception("run %s %s: re-publishing failed; requeueing", run_id, task.name)
            raise HandBack("re-publish failed") from None

    def _cancelled_among(self, run_ids: Sequence[str]) -> list[str]:
        return self.ledger.read(functools.partial(queries.cancel_requested_among, run_ids=run_ids))

    def _attempt(self, task: Task[Any, Any], run_id: str, claimed: queries.Claimed) -> Ended | None:
        number = claimed.attempt
        clock = self.ledger.clock
        logger.debug("run %s %s attempt %d started", run_id, task.name, number)

        def write_progress(fraction: float, message: str | None) -> None:
            try:
                self.ledger.write(
                    lambda conn: queries.record_progress(
                        conn, run_id, number, fraction, message, clock()
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
            attempt=number,
            write_progress=write_progress,
            probe_cancel=probe_cancel,
            progress_interval_s=self.settings.progress_interval_s,
        )
        started = time.monotonic()
        try:
            kwargs = attempt.arguments(task, claimed.args)
            value = self._call(task, ctx, kwargs, run_id, number, claimed.failures, started)
            result = task.encode_result(value)
        except Exception as exc:  # noqa: BLE001 - every task error is recorded in the ledger
            ctx.flush()
            failure = attempt.describe(exc, task.policy)
            return self._failed(task, run_id, number, claimed.failures, failure, started)
        ctx.flush()
        return self._record_returned(task, run_id, number, result, started)

    def _record_cancelled(
        self, task: Task[Any, Any], run_id: str, number: int, started: float
    ) -> Ended | None:
        """The task stopped for a cancel (`TaskCancelledError`): CANCELLED."""
        now = self.ledger.clock()
        recorded = self._persist(
            run_id,
            task,
            "recording its cancellation",
            lambda conn: queries.finish_cancelled(conn, run_id, number, now),
        )
        if not recorded:
            self._log_unrecorded(task, run_id, number)
            return None
        self._finished(task, run_id, number, RunState.CANCELLED, started)
        return Ended(RunState.CANCELLED)

    def _record_returned(
        self, task: Task[Any, Any], run_id: str, number: int, result: Any, started: float
    ) -> Ended | None:
        """The task returned: SUCCESS, or CANCELLED if its run was cancelled meanwhile."""
        now = self.ledger.clock()
        state = self._persist(
            run_id,
            task,
            "recording its success",
            lambda conn: queries.finish_returned(conn, run_id, number, result, now),
        )
        if state is None:
            self._log_unrecorded(task, run_id, number)
            return None
        self._finished(task, run_id, number, state, started)
        return Ended(state, result=result if state is RunState.SUCCESS else None)

    @staticmethod
    def _finished(
        task: Task[Any, Any], run_id: str, number: int, state: RunState, started: float
    ) -> None:
        """The run reached `state` (SUCCESS or CANCELLED) in the ledger (which counted it)."""
        duration = time.monotonic() - started
        if state is RunState.SUCCESS:
            logger.info(
                "run %s %s succeeded in %.3fs (attempt %d)", run_id, task.name, duration, number
            )
        else:
            logger.info("run %s %s cancelled during attempt %d", run_id, task.name, number)

    @staticmethod
    def _log_unrecorded(task: Task[Any, Any], run_id: str, number: int) -> None:
        logger.warning(
            "run %s %s: attempt %d finished after it was declared lost; "
            "its outcome is not recorded",
            run_id,
            task.name,
            number,
        )

    def _call(
        self,
        task: Task[Any, Any],
        ctx: TaskContext,
        kwargs: dict[str, Any],
        run_id: str,
        number: int,
        failures: int,
        started: float,
    ) -> Any:
        def record_cancelled() -> None:
            self.ledger.write(
                lambda conn: queries.finish_cancelled(conn, run_id, number, self.ledger.clock())
            )

        running = Running(task.name, number, threading.get_ident(), ctx, record_cancelled)
        if self.may_end_process:
            grace = self.settings.cancel_grace_s
            cancel_watcher.add(run_id, running, self._cancelled_among, grace)
        try:
            timeout = task.policy.timeout
            if timeout is None:
                return self._run(task, ctx, kwargs, None)
            hard_s = timeout.hard_s if self.may_end_process else None

            def on_hard() -> None:
                error = TaskTimeoutError(
                    f"hard timeout of {timeout.hard_s:g}s expired; the worker process was ended"
                )
                failure = attempt.describe(error, task.policy)
                # No re-publish: the broker hands the unacked message back after the exit.
                self._failed(task, run_id, number, failures, failure, started, republish=False)

            # An async task's soft deadline is an asyncio timeout; the watchdog keeps the hard one.
            soft_s = None if task.is_async else timeout.soft
            token = watchdog.arm(soft_s=soft_s, hard_s=hard_s, on_hard=on_hard)
            try:
                return self._run(task, ctx, kwargs, timeout.soft)
            finally:
                watchdog.disarm(token)
        finally:
            if self.may_end_process:
                cancel_watcher.remove(run_id)

    @staticmethod
    def _run(
        task: Task[Any, Any], ctx: TaskContext, kwargs: dict[str, Any], soft_s: float | None
    ) -> Any:
        value = attempt.call(task, ctx, kwargs)
        if not task.is_async:
            return value
        return _event_loop_runner().run(attempt.within_soft_timeout(value, soft_s))

    def _failed(
        self,
        task: Task[Any, Any],
        run_id: str,
        number: int,
        failures_before: int,
        failure: Failure,
        started: float,
        *,
        republish: bool = True,
    ) -> Ended | None:
        """Record a failed attempt and schedule the next one, or declare the run dead."""
        if failure.outcome is Outcome.CANCELLED:
            return self._record_cancelled(task, run_id, number, started)
        wait = attempt.retry_in(task.policy, failure, failures_before + 1)
        now = self.ledger.clock()
        retry_at = None if wait is None else now + wait
        recorded = self._persist(
            run_id,
            task,
            "recording its failure",
            lambda conn: queries.finish_failure(
                conn,
                run_id,
                number,
                now,
                outcome=failure.outcome.value,
                error=failure.error,
                traceback=failure.traceback,
                retry_at=retry_at,
            ),
        )
        if not recorded:
            logger.warning(
                "run %s %s: attempt %d failed after it was declared lost: %s",
                run_id,
                task.name,
                number,
                failure.error,
            )
            return None
        attempt.log_failure(logger, run_id, task.name, number, failure, wait, dead=True)
        if wait is None:
            return Ended(RunState.FAILURE, error=failure.error)
        if republish:
            self._republish(task, run_id, wait)
        return Ended(RunState.RETRY, error=failure.error, retry_in_s=wait)
