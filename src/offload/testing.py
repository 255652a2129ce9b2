"""Helpers for tests of applications that use offload. Real parts only: nothing here fakes.

```python
from offload.testing import wait_for_state_sync

run = render_report.defer_sync(user_id=7, kind="pdf")
status = wait_for_state_sync(run, RunState.PROGRESS, timeout=10)
```
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from typing import Any

from offload.core.handle import RunHandle
from offload.core.run import TERMINAL_STATES, RunState, RunStatus
from offload.errors import ResultTimeoutError, RunFailedError


def _wanted(state: RunState | Collection[RunState]) -> frozenset[RunState]:
    return frozenset([state]) if isinstance(state, RunState) else frozenset(state)


def _check(run: RunHandle[Any], status: RunStatus, wanted: frozenset[RunState]) -> bool:
    if status.state in wanted:
        return True
    if status.is_terminal:
        # It can never reach the wanted state now: fail loudly, with the run's own error.
        raise RunFailedError(run.id, status.task, status.state, status.error)
    return False


def wait_for_state_sync(
    run: RunHandle[Any],
    state: RunState | Collection[RunState],
    timeout: float = 10.0,
    poll_s: float = 0.02,
) -> RunStatus:
    """Poll the ledger until `run` is in `state` (or one of several); return its status.

    Raises `RunFailedError` if the run finishes in another state, `ResultTimeoutError` after
    `timeout` seconds.
    """
    wanted = _wanted(state)
    deadline = time.monotonic() + timeout
    while True:
        status = run.status_sync()
        if _check(run, status, wanted):
            return status
        if time.monotonic() > deadline:
            raise ResultTimeoutError(
                f"run {run.id} ({status.task}) is {status.state}, not {sorted(wanted)}, "
                f"after {timeout}s"
            )
        time.sleep(poll_s)


async def wait_for_state(
    run: RunHandle[Any],
    state: RunState | Collection[RunState],
    timeout: float = 10.0,  # noqa: ASYNC109 - mirrors result(timeout=)
    poll_s: float = 0.02,
) -> RunStatus:
    """Async twin of `wait_for_state_sync()`."""
    wanted = _wanted(state)
    deadline = time.monotonic() + timeout
    while True:
        status = await run.status()
        if _check(run, status, wanted):
            return status
        if time.monotonic() > deadline:
            raise ResultTimeoutError(
                f"run {run.id} ({status.task}) is {status.state}, not {sorted(wanted)}, "
                f"after {timeout}s"
            )
        await asyncio.sleep(poll_s)


__all__ = ["TERMINAL_STATES", "wait_for_state", "wait_for_state_sync"]
