"""Stopping a running task: raising an exception inside it, and the threads that decide when.

`interrupt()` is shared by the durable lane's executor and the inline lane, and the inline
lane's processes raise the same exceptions. A task on its process's main thread (a prefork
child runs its task there) gets the exception from a signal handler, so sleeps and blocking
calls are interrupted too; a task on another thread gets an asynchronous exception, which it
sees at its next Python instruction (a blocking C call sees it when it returns).

`Watchdog` enforces a durable attempt's soft and hard deadlines; `CancelWatcher` stops a
durable attempt whose run was cancelled. Each is one thread per process (started again in a
forked child). Ending the process is the only way to stop a thread that will not stop: the
attempt is recorded first, and `offload worker` starts a new process.
"""

from __future__ import annotations

import ctypes
import functools
import heapq
import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from offload.context import TaskContext
from offload.errors import LedgerError, TaskCancelledError, TaskTimeoutError
from offload.ledger import queries

if TYPE_CHECKING:
    from offload.executor import Executor

logger = logging.getLogger("offload.durable")

HARD_TIMEOUT_EXIT_CODE = 70
"""Exit status of a worker process ended by a hard timeout or an ignored cancel."""

INTERRUPT_SIGNAL = signal.SIGUSR2
"""Delivers an interrupt to a task on its process's main thread."""


class SoftTimeoutExpired(TaskTimeoutError):
    """`TaskTimeoutError` raised in a running task when its soft timeout expires."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(args or ("soft timeout expired",)))


class CancelExpired(TaskCancelledError):
    """`TaskCancelledError` raised in a running task that ignored `cancel()`."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(args or ("cancelled: the task ignored ctx.cancelled too long",)))


INTERRUPTS = (SoftTimeoutExpired, CancelExpired)
"""What `interrupt()` raises; code that ends an attempt catches these around its bookkeeping."""

_main_pending: type[BaseException] | None = None


def _on_interrupt_signal(_signum: int, _frame: object) -> None:
    global _main_pending
    pending, _main_pending = _main_pending, None
    if pending is not None:
        raise pending()


def watch_thread(thread_id: int) -> None:
    """Prepare to interrupt `thread_id`; call it from that thread before the task starts."""
    if thread_id == threading.main_thread().ident:
        signal.signal(INTERRUPT_SIGNAL, _on_interrupt_signal)


def interrupt(thread_id: int, exc_type: type[BaseException]) -> None:
    """Raise `exc_type` in a thread of this process, soon."""
    global _main_pending
    if thread_id == threading.main_thread().ident:
        _main_pending = exc_type
        os.kill(os.getpid(), INTERRUPT_SIGNAL)
    else:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(thread_id), ctypes.py_object(exc_type)
        )


def clear_interrupt(thread_id: int) -> None:
    """Forget an interrupt that was sent to `thread_id` but not yet seen."""
    global _main_pending
    if thread_id == threading.main_thread().ident:
        _main_pending = None
    else:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), None)


@dataclass(order=True)
class _Deadline:
    at: float
    token: int
    soft: bool = field(compare=False)
    thread_id: int = field(compare=False)
    on_hard: Callable[[], None] = field(compare=False)


class Watchdog:
    """One thread per process that enforces soft and hard deadlines of running attempts."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._heap: list[_Deadline] = []
        self._armed: set[int] = set()
        self._tokens = itertools.count(1)
        self._pid = 0
        self._start_lock = threading.Lock()

    def arm(
        self,
        *,
        soft_s: float | None,
        hard_s: float,
        on_hard: Callable[[], None],
        thread_id: int | None = None,
    ) -> int:
        """Watch the calling thread; returns a token for `disarm()`."""
        now = self._clock()
        token = next(self._tokens)
        ident = thread_id if thread_id is not None else threading.get_ident()
        self._start_if_needed()
        watch_thread(ident)
        with self._cond:
            self._armed.add(token)
            if soft_s is not None:
                heapq.heappush(self._heap, _Deadline(now + soft_s, token, True, ident, on_hard))
            heapq.heappush(self._heap, _Deadline(now + hard_s, token, False, ident, on_hard))
            self._cond.notify()
        return token

    def disarm(self, token: int, thread_id: int | None = None) -> None:
        """Stop watching; clears a soft timeout that was raised but not yet seen."""
        ident = thread_id if thread_id is not None else threading.get_ident()
        while True:
            try:
                with self._cond:
                    self._armed.discard(token)
                    clear_interrupt(ident)
                return
            except INTERRUPTS:
                # Landed between the deadline and the lock: the attempt is over, ignore it.
                continue

    def _start_if_needed(self) -> None:
        if self._pid == os.getpid():
            return
        with self._start_lock:
            if self._pid == os.getpid():
                return
            # A forked child inherits no threads and maybe a held lock: start afresh.
            self._cond = threading.Condition()
            self._heap = []
            self._armed = set()
            threading.Thread(target=self._loop, name="offload-watchdog", daemon=True).start()
            self._pid = os.getpid()

    def _loop(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while self._heap and self._heap[0].token not in self._armed:
                    heapq.heappop(self._heap)
                if not self._heap:
                    cond.wait()
                    continue
                due = self._heap[0]
                wait = due.at - self._clock()
                if wait > 0:
                    cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
                if due.soft:
                    interrupt(due.thread_id, SoftTimeoutExpired)
                    continue
            # Hard deadline: record the failure, then end the process (outside the lock).
            try:
                due.on_hard()
            except Exception:
                logger.exception("recording a hard timeout failed")
            logging.shutdown()
            os._exit(HARD_TIMEOUT_EXIT_CODE)


@dataclass
class Running:
    task: str
    attempt: int
    thread_id: int
    ctx: TaskContext
    on_forced_exit: Callable[[], None]
    cancel_seen_at: float | None = None
    interrupted: bool = False


class CancelWatcher:
    """One thread per process that stops running attempts whose run was cancelled.

    Every `CANCEL_POLL_S` it asks the ledger which of this process's running runs were
    cancelled. Their `ctx.cancelled` turns True at once; a task still running `grace_s` later
    gets `TaskCancelledError`; one still running after twice that has its process ended (the
    only way to stop a thread), with the run recorded CANCELLED first.
    """

    def __init__(self, poll_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.poll_s = poll_s
        self._clock = clock
        self._running: dict[str, Running] = {}
        self._lock = threading.Lock()
        self._pid = 0
        self._executor: Executor | None = None

    def add(self, executor: Executor, run_id: str, running: Running) -> None:
        watch_thread(running.thread_id)
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                self._running = {}
                threading.Thread(target=self._loop, name="offload-cancel", daemon=True).start()
            self._executor = executor
            self._running[run_id] = running

    def remove(self, run_id: str) -> None:
        while True:
            try:
                with self._lock:
                    running = self._running.pop(run_id, None)
                    if running is not None and running.interrupted:
                        clear_interrupt(running.thread_id)
                return
            except INTERRUPTS:
                continue  # landed after the attempt ended: ignore it

    def _loop(self) -> None:
        while True:
            time.sleep(self.poll_s)
            with self._lock:
                run_ids = list(self._running)
                executor = self._executor
            if not run_ids or executor is None:
                continue
            try:
                flagged = executor.ledger.read(
                    functools.partial(queries.cancel_requested_among, run_ids=run_ids)
                )
            except LedgerError:
                logger.exception("checking %d running run(s) for cancellation failed", len(run_ids))
                continue
            grace = executor.settings.cancel_grace_s
            now = self._clock()
            with self._lock:
                for run_id in flagged:
                    running = self._running.get(run_id)
                    if running is None:
                        continue
                    running.ctx.note_cancelled()
                    if running.cancel_seen_at is None:
                        running.cancel_seen_at = now
                    waited = now - running.cancel_seen_at
                    if waited >= 2 * grace and running.interrupted:
                        logger.error(
                            "run %s %s ignored cancel() for %.0fs; ending its process",
                            run_id,
                            running.task,
                            waited,
                        )
                        running.on_forced_exit()
                        logging.shutdown()
                        os._exit(HARD_TIMEOUT_EXIT_CODE)
                    if waited >= grace and not running.interrupted:
                        logger.warning(
                            "run %s %s ignored cancel() for %.0fs; interrupting it",
                            run_id,
                            running.task,
                            waited,
                        )
                        running.interrupted = True
                        interrupt(running.thread_id, CancelExpired)


watchdog = Watchdog()
cancel_watcher = CancelWatcher()
