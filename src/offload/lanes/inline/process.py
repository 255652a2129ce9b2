"""`cpu_bound` inline runs: a pool of spawned processes that yield the CPU to the API.

Each process starts its own session (so its own scheduling autogroup) and yields the CPU to the
API (`core.process.lower_priority`: autogroup nice 19, nice 19 and the idle scheduling policy).
Processes are spawned, never forked from the threaded API process, and die with it
(`PR_SET_PDEATHSIG`). An attempt's end is described in the child (`core.attempt.describe`),
since tracebacks do not pickle, and its `Failure` sent back.

A child finds the task by importing its module: `cpu_bound` inline tasks must be declared at
module level. Progress and start events come back on one queue read by a parent thread;
cancellation is a marker file per run the child's `ctx.cancelled` looks for (no signals, so a
late request can never hit the next run of the same process).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from offload.core import attempt
from offload.core.attempt import Failure
from offload.core.context import TaskContext
from offload.core.interrupt import CancelExpired, SoftTimeoutExpired
from offload.core.process import die_with_parent, lower_priority
from offload.core.run import ACTIVE_STATES, JSONValue, RunState
from offload.core.task import Task
from offload.errors import TaskDefinitionError, TaskTimeoutError

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from offload.lanes.inline.run import InlineRun

logger = logging.getLogger("offload.inline")

CHILD_PROGRESS_INTERVAL_S = 0.1


class ChildFailure(Exception):
    """An attempt that failed in a child process, as the child described it."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.error)
        self.failure = failure


class ProcessPool:
    """The lane's processes for `cpu_bound` runs; at most `size` runs are handed over at once.

    `on_started(run)` is called on the event loop when a child starts a run.
    """

    def __init__(self, size: int, *, on_started: Callable[[InlineRun], None]) -> None:
        self.size = size
        self._on_started = on_started
        context = multiprocessing.get_context("spawn")
        # A pipe, not a queue: a queue's locks are named semaphores the resource tracker
        # reports as leaked when the API exits. Each event is one write below PIPE_BUF, which
        # the kernel keeps whole even with several children writing.
        self._events, self._sender = context.Pipe(duplex=False)
        self._cancel_dir = Path(tempfile.mkdtemp(prefix="offload-cancel-"))
        self._context = context
        self._modules: list[str] = []
        self._executor = self._new_executor()
        self._slots = asyncio.Semaphore(size)
        self._loop = asyncio.get_running_loop()
        self._submitted: dict[str, InlineRun] = {}
        self._pids: set[int] = set()
        self._reader = threading.Thread(
            target=self._read_events, name="offload-inline-events", daemon=True
        )

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self.size, mp_context=self._context, initializer=_child_init, initargs=(self._sender,)
        )

    def start(self, modules: list[str]) -> None:
        """Spawn every process now and import the task modules there, off the request path."""
        self._modules = modules
        self._reader.start()
        self._warm()

    def _warm(self) -> None:
        for _ in range(self.size):
            self._executor.submit(_child_warm, self._modules).add_done_callback(self._warmed)

    def _replace_broken(self, broken: ProcessPoolExecutor) -> None:
        """A process died (killed, out of memory, a crash in C): every run it held failed;
        start a fresh pool so the lane keeps working."""
        if self._executor is not broken:
            return  # another failed run already replaced it
        logger.error("an inline cpu process died; starting the process pool again")
        broken.shutdown(wait=False, cancel_futures=True)
        self._executor = self._new_executor()
        self._warm()

    def _warmed(self, future: Any) -> None:
        try:
            self._pids.add(future.result())
        except Exception:
            logger.exception("an inline cpu process failed to import the task modules")

    def _read_events(self) -> None:
        while True:
            try:
                event = self._events.recv()
            except (EOFError, OSError):
                return
            if event is None:
                return
            try:
                self._loop.call_soon_threadsafe(self._on_event, event)
            except RuntimeError:
                return  # the loop is closed

    def _on_event(self, event: tuple[Any, ...]) -> None:
        kind, run_id, *rest = event
        run = self._submitted.get(run_id)
        if run is None or (run.state is not RunState.PENDING and run.state not in ACTIVE_STATES):
            return
        if kind == "started":
            run.pid = rest[0]
            self._pids.add(rest[0])
            self._on_started(run)
        elif kind == "progress":
            run.report_progress(rest[0], rest[1])

    async def run(self, run: InlineRun) -> JSONValue:
        """Run one attempt in a child; returns the JSON result or raises `ChildFailure`."""
        task = run.task
        timeout = task.policy.timeout
        async with self._slots:
            if run.cancel_requested:
                raise asyncio.CancelledError
            self._submitted[run.id] = run
            executor = self._executor
            try:
                future = self._loop.run_in_executor(
                    executor,
                    _child_run,
                    task.fn.__module__,
                    task.fn.__qualname__,
                    run.id,
                    run.attempts,
                    run.kwargs,
                    None if timeout is None else timeout.soft,
                    str(self._cancel_dir / run.id),
                )
                if timeout is None:
                    outcome = await asyncio.shield(future)
                else:
                    try:
                        outcome = await asyncio.wait_for(asyncio.shield(future), timeout.hard_s)
                    except TimeoutError:
                        if future.done():
                            raise
                        raise _hard_timeout(timeout.hard_s) from None
            except BrokenProcessPool:
                self._replace_broken(executor)
                raise
            finally:
                self._submitted.pop(run.id, None)
                with contextlib.suppress(FileNotFoundError):
                    (self._cancel_dir / run.id).unlink()
        ok, value, last_progress = outcome
        if last_progress is not None:
            # The events pipe and the result travel apart: the last progress may still be in
            # the pipe, where it would arrive after the run ended and be dropped.
            run.report_progress(*last_progress)
        if ok:
            return value
        raise ChildFailure(value)

    def interrupt(self, run: InlineRun) -> None:
        """Raise `TaskCancelledError` in the child running `run` (it checks the run's marker,
        so a late signal cannot hit the next run of that process)."""
        if run.pid is not None and run.id in self._submitted:
            with contextlib.suppress(ProcessLookupError):
                os.kill(run.pid, signal.SIGUSR1)

    def cancel(self, run: InlineRun) -> bool:
        """Ask a run a child holds to stop (it sees `ctx.cancelled`); False if none holds it."""
        if run.id not in self._submitted:
            return False
        (self._cancel_dir / run.id).touch()
        return True

    async def aclose(self) -> None:
        """Stop the processes; a run still going (abandoned after a hard timeout) is killed."""
        busy = {r.pid for r in self._submitted.values() if r.pid is not None}
        for pid in busy:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        self._sender.send(None)
        await asyncio.to_thread(self._reader.join, 5)
        self._sender.close()
        self._events.close()
        shutil.rmtree(self._cancel_dir, ignore_errors=True)


class HardTimeout(TaskTimeoutError):
    """The attempt outlived its hard timeout; its thread or process is abandoned."""


def _hard_timeout(hard_s: float) -> TaskTimeoutError:
    return HardTimeout(
        f"hard timeout of {hard_s:g}s expired; the process is abandoned and keeps "
        "running until the task returns"
    )


# --- in the child process ---------------------------------------------------------------------

_events: Connection | None = None
_cancel_marker = ""  # the running run's marker: SIGUSR1 interrupts only a cancelled run


def _child_init(events: Connection) -> None:
    global _events
    _events = events
    with contextlib.suppress(OSError):
        os.setsid()  # our own session, so our own autogroup: nice then weighs against the API
    die_with_parent(signal.SIGKILL)
    lower_priority()
    signal.signal(signal.SIGUSR1, _on_cancel_signal)


def _child_warm(modules: list[str]) -> int:
    for module in modules:
        importlib.import_module(module)
    return os.getpid()


def _on_alarm(_signum: int, _frame: FrameType | None) -> None:
    raise SoftTimeoutExpired


def _on_cancel_signal(_signum: int, _frame: FrameType | None) -> None:
    if _cancel_marker and os.path.exists(_cancel_marker):
        raise CancelExpired


def _find_task(module: str, qualname: str) -> Task[Any, Any]:
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if not isinstance(found, Task):
        raise TaskDefinitionError(
            f"{module}.{qualname} is not a task in the child process; declare cpu_bound "
            "inline tasks at module level with @jobs.task(...)"
        )
    return found


def _child_run(
    module: str,
    qualname: str,
    run_id: str,
    attempt_number: int,
    kwargs: dict[str, JSONValue],
    soft_s: float | None,
    cancel_marker: str,
) -> tuple[bool, Any, tuple[float, str | None] | None]:
    global _cancel_marker
    task = _find_task(module, qualname)
    _cancel_marker = cancel_marker
    events = _events
    assert events is not None
    events.send(("started", run_id, os.getpid()))

    last: list[tuple[float, str | None]] = []  # the latest progress written, sent back too

    def write_progress(fraction: float, message: str | None) -> None:
        report = (fraction, None if message is None else message[:500])
        last[:] = [report]
        events.send(("progress", run_id, *report))

    ctx = TaskContext(
        run_id=run_id,
        task=task.name,
        attempt=attempt_number,
        write_progress=write_progress,
        probe_cancel=lambda: os.path.exists(cancel_marker),
        progress_interval_s=CHILD_PROGRESS_INTERVAL_S,
        cancel_check_interval_s=0.2,
    )
    if soft_s is not None:
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, soft_s)
    try:
        value = attempt.call(task, ctx, attempt.arguments(task, kwargs))
        if asyncio.iscoroutine(value):
            value = asyncio.run(value)
        ctx.flush()
        return True, task.encode_result(value), last[0] if last else None
    except BaseException as exc:  # noqa: BLE001 - described and sent back to the parent
        ctx.flush()
        return False, attempt.describe(exc, task.policy), last[0] if last else None
    finally:
        _cancel_marker = ""
        if soft_s is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
