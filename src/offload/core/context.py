"""TaskContext: what a running task may ask for by declaring `ctx: TaskContext` first."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, MutableMapping
from typing import Any

_ProgressWriter = Callable[[float, str | None], None]
_CancelProbe = Callable[[], bool]


class _RunLogger(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with the run id and task name."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        extra = self.extra or {}
        return f"[{extra['task']} {extra['run_id']}] {msg}", kwargs


class TaskContext:
    """Handed to a task that declares `ctx: TaskContext` as its first parameter.

    ```python
    @jobs.task(retries=3)
    def render_report(ctx: TaskContext, user_id: int) -> str:
        ctx.logger.info("rendering for %s", user_id)   # lines carry the run id
        for page in range(10):
            if ctx.cancelled:                            # someone asked the run to stop
                return "cancelled"
            ctx.progress((page + 1) / 10, f"page {page + 1}")
        ...
    ```
    Fields set by offload: `run_id`, `task`, `attempt` (1 for the first try).
    """

    def __init__(
        self,
        *,
        run_id: str,
        task: str,
        attempt: int,
        write_progress: _ProgressWriter,
        probe_cancel: _CancelProbe,
        progress_interval_s: float = 0.5,
        cancel_check_interval_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.run_id = run_id
        self.task = task
        self.attempt = attempt
        self.logger: logging.LoggerAdapter[logging.Logger] = _RunLogger(
            logging.getLogger(f"offload.task.{task}"), {"run_id": run_id, "task": task}
        )
        self._write_progress = write_progress
        self._probe_cancel = probe_cancel
        self._progress_interval_s = progress_interval_s
        self._cancel_check_interval_s = cancel_check_interval_s
        self._clock = clock
        self._last_write = -math.inf
        self._unwritten: tuple[float, str | None] | None = None
        self._cancelled = False
        self._last_cancel_check = -math.inf

    def __repr__(self) -> str:
        return f"TaskContext(run_id={self.run_id!r}, task={self.task!r}, attempt={self.attempt})"

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Report progress: `fraction` in [0, 1], an optional short message.

        Writes are throttled (at most one per `progress_interval_s`, default 0.5 s); the
        latest value is always written before the run finishes.
        """
        if not 0.0 <= fraction <= 1.0 or math.isnan(fraction):
            raise ValueError(f"progress fraction must be between 0 and 1, got {fraction!r}")
        now = self._clock()
        if now - self._last_write >= self._progress_interval_s:
            self._write_progress(fraction, message)
            self._last_write = now
            self._unwritten = None
        else:
            self._unwritten = (fraction, message)

    @property
    def cancelled(self) -> bool:
        """True once someone asked this run to stop; check it between steps and return early."""
        if self._cancelled:
            return True
        now = self._clock()
        if now - self._last_cancel_check >= self._cancel_check_interval_s:
            self._last_cancel_check = now
            self._cancelled = self._probe_cancel()
        return self._cancelled

    def note_cancelled(self) -> None:
        """Mark the run cancelled (offload's worker saw the request in the ledger)."""
        self._cancelled = True

    def flush(self) -> None:
        """Write the progress a throttle held back. Called by offload when the attempt ends."""
        if self._unwritten is not None:
            fraction, message = self._unwritten
            self._unwritten = None
            self._write_progress(fraction, message)
