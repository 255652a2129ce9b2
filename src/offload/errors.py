"""Every exception offload raises, and the signals a task may raise.

```
OffloadError
├── ConfigurationError          a setting is missing or malformed (raised at start-up)
├── TaskDefinitionError         a @task declaration cannot work (raised at import)
├── TaskArgumentsError          defer() got arguments that do not fit (also a ValueError)
├── IdempotencyConflictError    an idempotency key already names a run with other arguments
├── BrokerUnavailableError      the broker did not accept a message in time
├── LedgerError                 the ledger database failed or is unreachable
├── RunNotFoundError            no run has that id (also a LookupError)
├── ScheduleNotFoundError       no schedule has that name (also a LookupError)
├── ResultTimeoutError          result(timeout=) ran out first (also a TimeoutError)
├── RunFailedError              the run ended in FAILURE or CANCELLED; result() raises it
├── LaneFullError               the inline lane's backlog is full
├── TaskTimeoutError            raised inside a task when its soft timeout expires
│                               (also a TimeoutError)
└── TaskCancelledError          raised inside a task that ignored a cancel request too long

Retry                           raised by a task to ask for another attempt (not an error)
```
Catching `OffloadError` catches everything offload raises, including what it raises inside
a task; `Retry` is a request, not an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class OffloadError(Exception):
    """Base class of every error offload raises."""


class ConfigurationError(OffloadError):
    """Raised when a setting is missing or malformed; the message names the setting."""


class TaskDefinitionError(OffloadError):
    """Raised when a task declaration cannot work (bad policy, duplicate name, non-JSON types)."""


class TaskArgumentsError(OffloadError, ValueError):
    """Raised when `defer()` gets arguments that do not fit the task's signature.

    Nothing is written to the ledger or the broker when this is raised.
    `errors` holds one entry per offending argument, in FastAPI's `detail` shape
    (`{"loc": [...], "msg": ..., "type": ...}`), so an endpoint can return it as a 422.
    """

    def __init__(self, message: str, errors: Sequence[dict[str, Any]] = ()) -> None:
        super().__init__(message)
        self.errors: list[dict[str, Any]] = list(errors)


class IdempotencyConflictError(OffloadError, ValueError):
    """Raised when an idempotency key already names a run of the task with other arguments.

    The same key with the same arguments returns the existing run; other arguments under
    that key are a mistake to surface (HTTP 409), not a run to drop silently. Nothing is
    written. `run_id` is the run the key names.
    """

    def __init__(self, task: str, key: str, run_id: str) -> None:
        super().__init__(
            f"{task}: idempotency_key {key!r} already names run {run_id} with other "
            "arguments; use a new key for new arguments"
        )
        self.run_id = run_id


class BrokerUnavailableError(OffloadError):
    """Raised when the broker does not accept a message within the publish timeout.

    The run is not recorded: the ledger row written before the publish is removed again.
    """


class LedgerError(OffloadError):
    """Raised when the ledger database fails or cannot be reached."""


ECHOED_CHARS = 64
"""The most of a caller's id or name an error message repeats: a 404 must not echo 10 kB."""


def _echo(given: str) -> str:
    return repr(given if len(given) <= ECHOED_CHARS else f"{given[:ECHOED_CHARS]}…")


class RunNotFoundError(OffloadError, LookupError):
    """Raised when no run has the given id (it was never deferred, or it was purged)."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"No run with id {_echo(run_id)}")
        self.run_id = run_id


class ScheduleNotFoundError(OffloadError, LookupError):
    """Raised when no schedule has the given name in the ledger."""

    def __init__(self, name: str, known: Sequence[str] = ()) -> None:
        hint = f"; known: {', '.join(sorted(known))}" if known else "; none is declared yet"
        super().__init__(f"No schedule named {_echo(name)}{hint}")
        self.name = name


class QueueNotFoundError(OffloadError, LookupError):
    """Raised when no task declares, no worker consumes and no run waits in a queue."""

    def __init__(self, name: str, known: Sequence[str] = ()) -> None:
        super().__init__(f"No queue named {_echo(name)}; known: {', '.join(sorted(known))}")
        self.name = name


class RunStateError(OffloadError):
    """Raised when a run is not in a state that allows the operation (HTTP 409).

    Replaying a run that did not fail or was already replayed, discarding one still waiting
    or running. The message says which state it is in and what can be done instead.
    """


class ResultTimeoutError(OffloadError, TimeoutError):
    """Raised when `result(timeout=...)` runs out before the run reaches a terminal state."""


class RunFailedError(OffloadError):
    """Raised by `result()` when the run ended in FAILURE or CANCELLED.

    `state` is the terminal state, `error` the last attempt's error line
    (for example `"ValueError: bad input"`), `traceback` its traceback when there was one.
    """

    def __init__(
        self, run_id: str, task: str, state: str, error: str | None, traceback: str | None = None
    ) -> None:
        detail = f": {error}" if error else ""
        super().__init__(f"Run {run_id} of {task!r} ended in {state}{detail}")
        self.run_id = run_id
        self.task = task
        self.state = state
        self.error = error
        self.traceback = traceback


class LaneFullError(OffloadError):
    """Raised when the inline lane's backlog is full and the task may not spill to the durable lane.

    `retry_after_s` is a hint for the HTTP `Retry-After` header.
    """

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Retry(Exception):
    """Raise inside a task to ask for another attempt.

    `delay` (seconds) overrides the task's backoff for this one retry. The retry counts
    against the task's `retries`; when none are left the run fails and becomes dead.
    """

    def __init__(self, delay: float | None = None, reason: str | None = None) -> None:
        super().__init__(reason or "retry requested")
        self.delay = delay
        self.reason = reason


class TaskTimeoutError(OffloadError, TimeoutError):
    """Raised inside a running task when its soft timeout expires, so it can clean up.

    When the task keeps running until the hard timeout, its process is killed and the
    attempt fails with this error.
    """


class TaskCancelledError(OffloadError):
    """Raised inside a running task that did not stop within the grace period after `cancel()`.

    A task should check `ctx.cancelled` and return; one that does not gets this exception
    `cancel_grace_s` after the request, and its process is ended if it still runs after
    another grace period. The run ends CANCELLED either way.
    """
