"""The durable lane's watchers: the threads that decide when a running attempt is stopped.

`Watchdog` enforces an attempt's soft and hard deadlines; `CancelWatcher` stops an attempt
whose run was cancelled. Each is one thread per process (started again in a forked child).
Ending the process is the only way to stop a thread that will not stop: the attempt is recorded
first, and `offload worker` starts a new process.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from offload.core.context import TaskContext
from offload.core.interrupt import (
    INTERRUPTS,
    CancelExpired,
    SoftTimeoutExpired,
    clear_interrupt,
    interrupt,
    watch_thread,
)
from offload.errors import LedgerError

logger = logging.getLogger("offload.durable")

HARD_TIMEOUT_EXIT_CODE = 70
"""Exit status of a worker process ended by a hard timeout or an ignored cancel."""

CancelQuery = Callable[[Sequence[str]], list[str]]
"""`ask(run_ids)`: which of these running runs were cancelled."""


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
        hard_s: float | None,
        on_hard: Callable[[], None],
        thread_id: int | None = None,
    ) -> int:
        """Watch the calling thread; returns a token for `disarm()`. Without `hard_s`, only
        the soft deadline is enforced (a test process runs attempts that must not end it)."""
        now = self._clock()
        token = next(self._tokens)
        ident = thread_id if thread_id is not None else threading.get_ident()
        self._start_if_needed()
        watch_thread(ident)
        with self._cond:
            self._armed.add(token)
            if soft_s is not None:
                heapq.heappush(self._heap, _Deadline(now + soft_s, token, True, ident, on_hard))
            if hard_s is not None:
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

    Every `poll_s` it asks the ledger which of this process's running runs were
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
        self._ask: CancelQuery | None = None
        self._grace_s = 0.0

    def add(self, run_id: str, running: Running, ask: CancelQuery, grace_s: float) -> None:
        """Watch `run_id`; `ask(run_ids)` says which of them were cancelled (the ledger)."""
        watch_thread(running.thread_id)
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                self._running = {}
                threading.Thread(target=self._loop, name="offload-cancel", daemon=True).start()
            self._ask = ask
            self._grace_s = grace_s
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
                ask, grace = self._ask, self._grace_s
            if not run_ids or ask is None:
                continue
            try:
                flagged = ask(run_ids)
            except LedgerError:
                logger.exception("checking %d running run(s) for cancellation failed", len(run_ids))
                continue
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
