"""One attempt of a run, the same on both lanes: the call, what its end means, what comes next.

The lanes differ in where an attempt runs (a worker's thread or prefork child; the API's event
loop, a thread or a CPU process) and where its outcome is kept (the ledger; the inline lane's
memory). What an exception means, whether it earns another try and after how long, the error
line and the log lines are decided here, once (the inline lane's run metrics too; the durable
lane counts in the ledger, in the write that ends the attempt):

| the attempt | outcome | error line | another try |
|---|---|---|---|
| returned | success | | |
| raised `TaskCancelledError` (or ignored a cancel) | cancelled | `TaskCancelledError: …` | never |
| raised `Retry(delay=)` | error | `Retry: …` | while tries remain, after `delay` |
| timed out (soft or hard) | timeout | `TaskTimeoutError: soft timeout …` | as for an error |
| stored arguments no longer fit | error | `TaskArgumentsError: the stored …` | never |
| raised anything else | error | `ValueError: card declined` | if `retry_on` matches |

"Another try" also needs a try left (`retries=`); it comes after `Backoff` unless `Retry` says.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Coroutine
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from offload import metrics
from offload.core.interrupt import SoftTimeoutExpired
from offload.errors import Retry, TaskArgumentsError, TaskCancelledError, TaskTimeoutError

if TYPE_CHECKING:
    from offload.core.context import TaskContext
    from offload.core.run import JSONValue
    from offload.core.task import Policy, Task


class Outcome(StrEnum):
    """How one attempt ended, as its `Attempt.outcome` says."""

    SUCCESS = "success"  #: the task returned
    ERROR = "error"  #: it raised, or asked for a `Retry`
    TIMEOUT = "timeout"  #: its soft or hard timeout expired
    CANCELLED = "cancelled"  #: it stopped for a cancel request
    LOST = "lost"  #: its worker process died during it (durable lane)


class StaleArgumentsError(TaskArgumentsError):
    """Raised when a run's stored arguments no longer fit its task (a deploy changed them)."""


@dataclass(frozen=True, slots=True)
class Failure:
    """How one attempt failed, described once. Picklable: a CPU process sends it back."""

    outcome: Outcome
    error: str  #: the error line, e.g. `ValueError: card declined`
    traceback: str | None
    retryable: bool  #: this error may earn another try (the tries left are counted apart)
    delay_s: float | None = None  #: `Retry(delay=)`: waits this long instead of the backoff


def error_line(exc: BaseException) -> str:
    """`ValueError: card declined`, or the bare class name when the message is empty."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def describe(exc: BaseException, policy: Policy) -> Failure:
    """What an exception that ended an attempt means (see the module's table)."""
    trace = "".join(traceback.format_exception(exc)) if exc.__traceback__ else None
    if isinstance(exc, TaskCancelledError):
        return Failure(Outcome.CANCELLED, f"TaskCancelledError: {exc}", trace, retryable=False)
    if isinstance(exc, Retry):
        return Failure(Outcome.ERROR, error_line(exc), trace, retryable=True, delay_s=exc.delay)
    if isinstance(exc, StaleArgumentsError):
        error = (
            "TaskArgumentsError: the stored arguments no longer fit the task "
            f"(was its signature changed?): {exc}"
        )
        return Failure(Outcome.ERROR, error, trace, retryable=False)
    retryable = isinstance(exc, policy.retry_on)
    if isinstance(exc, TaskTimeoutError):
        if isinstance(exc, SoftTimeoutExpired) and policy.timeout is not None:
            message = f"soft timeout of {policy.timeout.soft:g}s expired"
        else:
            message = str(exc)
        return Failure(Outcome.TIMEOUT, f"TaskTimeoutError: {message}", trace, retryable)
    return Failure(Outcome.ERROR, error_line(exc), trace, retryable)


def retry_in(policy: Policy, failure: Failure, failures: int) -> float | None:
    """Seconds until the next attempt, or None when this failure ends the run.

    `failures` counts the attempts that failed so far, this one included: a run gets
    `policy.retries` tries after its first.
    """
    if not failure.retryable or failures > policy.retries:
        return None
    return failure.delay_s if failure.delay_s is not None else policy.backoff.delay(failures)


# --- calling the task -----------------------------------------------------------------------


def arguments(task: Task[Any, Any], stored: dict[str, JSONValue]) -> dict[str, Any]:
    """A run's stored JSON arguments as the function's Python arguments.

    Raises `StaleArgumentsError` when they no longer fit the task's signature.
    """
    try:
        return task.signature.from_json(stored)
    except TaskArgumentsError as exc:
        raise StaleArgumentsError(str(exc), exc.errors) from None


def call(task: Task[Any, Any], ctx: TaskContext | None, kwargs: dict[str, Any]) -> Any:
    """Call the task's function, with its context first if it takes one (`ctx` may be None
    for a task that takes none: building a context costs a tenth of an inline run).

    Returns its value, or the coroutine of an `async def` task.
    """
    if task.signature.takes_context:
        return task.fn(ctx, **kwargs)
    return task.fn(**kwargs)


async def within_soft_timeout(coro: Coroutine[Any, Any, Any], soft_s: float | None) -> Any:
    """Await an `async def` task's coroutine; `SoftTimeoutExpired` inside it after `soft_s`.

    A `TimeoutError` the task raises itself goes on as it is.
    """
    if soft_s is None:
        return await coro
    deadline = asyncio.timeout(soft_s)
    try:
        async with deadline:
            return await coro
    except TimeoutError:
        if deadline.expired():
            raise SoftTimeoutExpired from None
        raise


# --- telling of it --------------------------------------------------------------------------

_run_metrics = metrics.RunMetrics()


def count_finished(task: str, lane: str, state: str, duration_s: float | None) -> None:
    """Count an inline run that reached a terminal state (`offload_runs_total`), and time its
    attempt, in this process."""
    _run_metrics.finished(task, lane, state, duration_s)


def log_failure(
    logger: logging.Logger,
    run_id: str,
    task: str,
    attempt: int,
    failure: Failure,
    next_in_s: float | None,
    *,
    dead: bool = False,
) -> None:
    """The one line a failed attempt gets: a warning when it is tried again, else an error
    with its traceback."""
    if next_in_s is not None:
        logger.warning(
            "run %s %s failed on attempt %d: %s; retrying in %.2fs",
            run_id,
            task,
            attempt,
            failure.error,
            next_in_s,
        )
        return
    logger.error(
        "run %s %s failed on attempt %d: %s; no retries left%s%s",
        run_id,
        task,
        attempt,
        failure.error,
        " (dead)" if dead else "",
        f"\n{failure.traceback.rstrip()}" if failure.traceback else "",
    )
