"""`RunHandle`: a run id plus a way to ask about it."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from offload.core.run import RunState, RunStatus
from offload.errors import ResultTimeoutError, RunFailedError

if TYPE_CHECKING:
    from offload.core.ports import RunSource

R = TypeVar("R")

_FIRST_POLL_S = 0.002
_LONGEST_POLL_S = 0.2


class RunHandle(Generic[R]):
    """An id plus a way to ask about it. Holds no state: every call asks the app.

    The app answers from the inline lane's memory for inline runs, from the ledger otherwise.

    ```python
    run = await render_report.defer(user_id=7, kind="pdf")
    status = await run.status()          # RunStatus
    path = await run.result(timeout=60)  # raises RunFailedError / ResultTimeoutError
    ```
    """

    __slots__ = ("_source", "id")

    def __init__(self, source: RunSource, run_id: str) -> None:
        self._source = source
        self.id = run_id

    def __repr__(self) -> str:
        return f"RunHandle({self.id!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunHandle) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def status_sync(self) -> RunStatus:
        """The run's current status. Raises `RunNotFoundError` for an unknown id."""
        return self._source.status_sync(self.id)

    async def status(self) -> RunStatus:
        """The run's current status. Raises `RunNotFoundError` for an unknown id."""
        return await self._source.status(self.id)

    def result_sync(self, timeout: float | None = None) -> R:
        """Wait for the run to finish and return its result (typed by the task's return type).

        Raises `RunFailedError` if it ended in FAILURE or CANCELLED, `ResultTimeoutError`
        after `timeout` seconds (None waits forever), `RunNotFoundError` for an unknown id.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = _FIRST_POLL_S
        while True:
            status = self.status_sync()
            if status.is_terminal:
                if status.state is RunState.SUCCESS:
                    return self._result(status)
                raise self._failed(status, self._source.traceback_sync(self.id))
            time.sleep(self._pause(status, deadline, pause, timeout))
            pause = min(pause * 1.5, _LONGEST_POLL_S)

    async def result(self, timeout: float | None = None) -> R:  # noqa: ASYNC109 - API shape
        """Async twin of `result_sync()`; polls without blocking the event loop."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = _FIRST_POLL_S
        while True:
            status = await self.status()
            if status.is_terminal:
                if status.state is RunState.SUCCESS:
                    return self._result(status)
                raise self._failed(status, await self._source.traceback(self.id))
            await asyncio.sleep(self._pause(status, deadline, pause, timeout))
            pause = min(pause * 1.5, _LONGEST_POLL_S)

    def cancel_sync(self) -> RunStatus:
        """Cancel the run: at once if it waits, by asking the task (`ctx.cancelled`) if it runs.

        Returns the status after the request; a finished run is left as it is.
        """
        return self._source.cancel_sync(self.id)

    async def cancel(self) -> RunStatus:
        """Async twin of `cancel_sync()`."""
        return await self._source.cancel(self.id)

    def _pause(
        self, status: RunStatus, deadline: float | None, pause: float, timeout: float | None
    ) -> float:
        """How long to wait before asking again; `ResultTimeoutError` once the time is up."""
        if deadline is None:
            return pause
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ResultTimeoutError(
                f"Run {self.id} of {status.task!r} is still {status.state} after {timeout}s"
            )
        return min(pause, remaining)

    def _result(self, status: RunStatus) -> R:
        task = self._source.tasks.get(status.task)
        value: Any = status.result if task is None else task.decode_result(status.result)
        return value  # type: ignore[no-any-return]

    def _failed(self, status: RunStatus, traceback: str | None) -> RunFailedError:
        return RunFailedError(self.id, status.task, status.state, status.error, traceback)
