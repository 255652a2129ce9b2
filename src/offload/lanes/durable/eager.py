"""Durable runs run at once in the calling process: what `offload.testing` puts in place of
the broker, so that a test that passes here does not fail under a real worker.

Nothing else changes: each run is recorded in the ledger as `defer()` records it, its
arguments make the same JSON round trip a broker message makes, and the worker's own
`Executor` claims, runs, retries and records it. Only the waiting is gone: a run due later (a
`delay`, a retry's backoff) moves the test's clock forward to its due time instead.
"""

from __future__ import annotations

import heapq
import itertools
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from offload.lanes.durable.executor import Executor
from offload.lanes.durable.poison import bury
from offload.ledger import Ledger
from offload.settings import Settings

if TYPE_CHECKING:
    from offload.core.task import Call, Task
    from offload.ledger.queries import RunMessage


class EagerPublisher:
    """Publishes a run by running it: in the order runs are due, one at a time.

    A run deferred while another runs (from inside a task, or from another thread) waits
    until the current one ends, as on a worker; the caller that started the loop runs it.
    """

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        tasks: Mapping[str, Task[Any, Any]],
        advance_clock: Callable[[float], None],
    ) -> None:
        self._ledger = ledger
        self._tasks = tasks
        self._advance_clock = advance_clock
        self.executor = Executor(settings, ledger, self.publish_one, may_end_process=False)
        self._due: list[tuple[float, int, str, str, str]] = []
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._running = False
        self.attempts = 0
        """Deliveries run so far (a retry is one more)."""

    def publish(self, batches: Sequence[tuple[Task[Any, Any], Sequence[tuple[str, Call]]]]) -> None:
        now = self._ledger.clock()
        for task, calls in batches:
            for run_id, call in calls:
                self._push(now + (call.countdown_s or 0.0), run_id, task.name, call.kwargs)
        self._run_due()

    def publish_one(self, message: RunMessage, countdown_s: float | None = None) -> None:
        due = self._ledger.clock() + (countdown_s or 0.0)
        self._push(due, message.id, message.task, message.args)
        self._run_due()

    def _push(self, due: float, run_id: str, task: str, args: Any) -> None:
        # The round trip a broker message makes: what cannot travel as JSON fails here too.
        body = json.dumps(args)
        with self._lock:
            heapq.heappush(self._due, (due, next(self._order), run_id, task, body))

    def _run_due(self) -> None:
        with self._lock:
            if self._running:
                return  # the loop already running below us (or in another thread) takes it
            self._running = True
        try:
            while True:
                with self._lock:
                    if not self._due:
                        return
                    due, _, run_id, name, body = heapq.heappop(self._due)
                wait = due - self._ledger.clock()
                if wait > 0:
                    self._advance_clock(wait)
                self._deliver(run_id, name, json.loads(body))
        finally:
            with self._lock:
                self._running = False

    def _deliver(self, run_id: str, name: str, args: dict[str, Any]) -> None:
        self.attempts += 1
        task = self._tasks.get(name)
        if task is None or not task.policy.runs_on_workers:
            reason = f"UnknownTask: no task named {name!r} in this worker"
            bury(self._ledger, {"id": run_id, "task": name}, [[], args, {}], None, reason)
            return
        self.executor.execute(task, run_id, args)
