"""Testing an application that uses offload, with real parts only: nothing here fakes.

```python
# conftest.py
import pytest
from offload.testing import isolated
from myapp.main import app, jobs

@pytest.fixture
def offload(tmp_path):
    with isolated(jobs, tmp_path) as harness:   # its own SQLite ledger and broker
        yield harness

@pytest.fixture
def client(offload):
    with offload.client(app) as client:         # a TestClient that runs the lifespan
        yield client

# test_reports.py
def test_report(client, offload):
    run_id = client.post("/reports", json={"kind": "pdf"}).json()["task_id"]
    offload.drain_inline()                      # inline runs end after the response
    assert offload.jobs.run(run_id).result_sync() == "report-7.pdf"
```

`isolated()` runs durable runs in the test process, at once, through the path a worker takes
(ledger record, JSON round trip, claim, attempt, retries with their backoff skipped, dead
runs): a test that passes here does not fail for a reason a worker would find.
`RecordingContext` calls a task function directly; `wait_for_state_sync` polls a real run.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from offload.app import Offload
from offload.core.context import TaskContext
from offload.core.handle import RunHandle
from offload.core.run import TERMINAL_STATES, RunState, RunStatus
from offload.errors import ResultTimeoutError, RunFailedError
from offload.settings import Settings

if TYPE_CHECKING:
    from starlette.testclient import TestClient

    from offload.lanes.durable.eager import EagerPublisher

LOOPBACK_CLIENT = ("127.0.0.1", 50000)
"""The peer a test client claims to be. Starlette's default, `testclient`, is not a loopback
address, so the status router's default `authorize` (loopback callers only) would answer 404
for every run."""


class TestClock:
    """An isolated app's clock: real time, plus every wait that eager runs skipped."""

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        self._skipped = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return time.time() + self._skipped

    @property
    def skipped(self) -> float:
        """Seconds of waiting (delays, backoffs) the clock jumped over so far."""
        return self._skipped

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._skipped += max(0.0, seconds)


@dataclass
class Harness:
    """One test's offload, from `isolated()`: the app, its data directory and its clock."""

    jobs: Offload
    data_dir: Path
    clock: TestClock
    _eager: EagerPublisher

    @property
    def attempts(self) -> int:
        """Durable attempts run so far in this test (a retry is one more)."""
        return self._eager.attempts

    def client(self, app: Any, **options: Any) -> TestClient:
        """Starlette's `TestClient` for `app`, calling from a loopback address so that the
        default `authorize` lets it see runs. Use it as a context manager (`with`): that runs
        the app's lifespan, which starts the inline lane."""
        from starlette.testclient import TestClient

        options.setdefault("client", LOOPBACK_CLIENT)
        return TestClient(app, **options)

    def drain_inline(self, timeout: float = 10.0) -> None:
        """Wait until every inline run has ended (they run after the response). Raises
        `ResultTimeoutError` naming how many are left after `timeout` seconds."""
        lane = self.jobs.inline
        deadline = time.monotonic() + timeout
        while lane.unfinished:
            if time.monotonic() > deadline:
                raise ResultTimeoutError(
                    f"{lane.unfinished} inline run(s) still unfinished after {timeout}s"
                )
            time.sleep(0.002)


@contextlib.contextmanager
def isolated(jobs: Offload, data_dir: str | Path, **settings: Any) -> Iterator[Harness]:
    """Point `jobs` at a new embedded ledger and broker in `data_dir`, with durable runs run
    in this process as they are deferred, until the block ends; then restore it.

    `settings` override the app's own (`retries` live on tasks; `default_queue=...` here).
    Runs never wait: a `delay` or a retry's backoff moves `harness.clock` forward instead.
    In this process a hard timeout or an ignored cancel cannot end the worker, so neither is
    enforced; soft timeouts are. `cpu_bound` durable tasks run in the calling thread.
    """
    directory = Path(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    values = {
        **jobs.settings.model_dump(),
        "broker_url": None,
        "ledger_url": None,
        "data_dir": directory,
        "task_events": False,
        **settings,
    }
    clock = TestClock()
    restore = jobs._rebind(Settings(**values), clock)
    jobs.inline.forget_finished()  # inline runs live in memory: an earlier test's are gone
    try:
        eager = jobs.durable.run_in_process(clock.advance)
        yield Harness(jobs, directory, clock, eager)
    finally:
        restore()
        jobs.inline.forget_finished()


class RecordingContext(TaskContext):
    """A `TaskContext` for calling a task's function directly in a unit test.

    ```python
    ctx = RecordingContext("render_report")
    assert render_report(ctx, 7, "pdf") == "report-7.pdf"
    assert ctx.reports[-1] == (1.0, "done")
    ```
    Every `ctx.progress()` is kept in `reports` (no throttle); `cancel()` makes
    `ctx.cancelled` true, as a cancel request would.
    """

    def __init__(self, task: str = "task", *, run_id: str = "test-run", attempt: int = 1) -> None:
        self.reports: list[tuple[float, str | None]] = []
        self._cancel_requested = False
        super().__init__(
            run_id=run_id,
            task=task,
            attempt=attempt,
            write_progress=lambda fraction, message: self.reports.append((fraction, message)),
            probe_cancel=lambda: self._cancel_requested,
            progress_interval_s=0.0,
            cancel_check_interval_s=0.0,
        )

    def cancel(self) -> None:
        """Ask the run to stop: `ctx.cancelled` is true from now on."""
        self._cancel_requested = True


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


__all__ = [
    "LOOPBACK_CLIENT",
    "TERMINAL_STATES",
    "Harness",
    "RecordingContext",
    "TestClock",
    "isolated",
    "wait_for_state",
    "wait_for_state_sync",
]
