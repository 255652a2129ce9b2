"""The scheduler: turns the app's schedules into durable runs, one run per fire.

Any number may run (one per `offload serve`, `offload beat` on other machines); the one that
holds the ledger's lease fires, the others try again every `TICK_S`. A holder renews the lease
at every tick; a standby takes it when it expires, or at once when the holder was a process on
this machine that no longer exists. So a holder that is killed hands over within
`scheduler_lease_s` + `TICK_S` (at once on one machine), and one that stops hands over at once.

Each fire is a normal durable run, recorded in the transaction that moves the schedule's next
fire time on (`ledger/schedules.py`) and published after it commits. A run whose publish fails
stays in the ledger and the workers' orphan sweep publishes it later: a fire is never lost and
never doubled.

Why not Celery beat: beat keeps its state in a local shelve file, has no lease (two beats fire
everything twice) and sends with `apply_async`, which bypasses the ledger; a beat scheduler
class would have to rebuild all of this inside beat's loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from offload.core.process import is_alive, worker_identity
from offload.core.run import Lane, new_run_id
from offload.core.schedule import ON_TIME_S, Schedule
from offload.core.task import Call, Task
from offload.errors import OffloadError, ScheduleNotFoundError
from offload.ledger import Ledger, queries
from offload.ledger import schedules as ledger_schedules

logger = logging.getLogger("offload.scheduler")

TICK_S = 1.0
"""Longest sleep between two ticks: how late a fire may be, and how often a standby tries."""

Publish = Callable[[Task[Any, Any], Sequence[tuple[str, Call]]], None]
Fired = tuple[Task[Any, Any], list[tuple[str, Call]]]


class Scheduler:
    """Fires `schedules` (the app's declarations, by name) while it holds the lease.

    `tick()` does one round and says how long to sleep; `start()`/`stop()` run it on a thread,
    `run_forever(stop)` on the caller's. `clock` is the app's (tests inject one).
    """

    def __init__(
        self,
        ledger: Ledger,
        schedules: Mapping[str, Schedule],
        tasks: Mapping[str, Task[Any, Any]],
        publish: Publish,
        *,
        lease_s: float,
        clock: Callable[[], float],
        identity: str | None = None,
    ) -> None:
        self._ledger = ledger
        self._schedules = schedules
        self._tasks = tasks
        self._publish = publish
        self._lease_s = lease_s
        self._clock = clock
        self.identity = identity or worker_identity()
        self.holding = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- one round -----------------------------------------------------------------------------

    def tick(self) -> float:
        """Renew or take the lease and, if held, fire what is due: one transaction. Returns
        the seconds until the next tick."""
        now = self._clock()
        was_holding = self.holding
        fired, upcoming = self._ledger.write(lambda conn: self._round(conn, now, was_holding))
        if self.holding != was_holding:
            logger.info(
                "scheduler %s %s the lease", self.identity, "took" if self.holding else "lost"
            )
        for task, calls in fired:
            self._send(task, calls)
        if upcoming is None:
            return TICK_S
        return max(0.0, min(TICK_S, upcoming - self._clock()))

    def _round(self, conn: Any, now: float, was_holding: bool) -> tuple[list[Fired], float | None]:
        self.holding = self._take(conn, now)
        if not self.holding:
            return [], None
        if not was_holding:
            ledger_schedules.sync(conn, list(self._schedules.values()), now)
        fired = []
        for name, seen_next in ledger_schedules.due(conn, now):
            schedule = self._schedules.get(name)
            task = self._tasks.get(schedule.task) if schedule is not None else None
            if schedule is None or task is None:
                continue  # declared by another version of the app: its scheduler fires it
            new = [_run_of(schedule, task, at) for at in _fires(schedule, seen_next, now)]
            following = schedule.next_fire(now)
            inserted = set(ledger_schedules.record_fire(conn, name, seen_next, following, new, now))
            calls = [(run.id, _call_of(task, run)) for run in new if run.id in inserted]
            if calls:
                fired.append((task, calls))
        return fired, ledger_schedules.next_fire_at(conn)

    def _take(self, conn: Any, now: float) -> bool:
        if ledger_schedules.take_lease(conn, self.identity, now, self._lease_s):
            return True
        lease = ledger_schedules.get_lease(conn)
        if lease is None or is_alive(lease.holder):
            return False
        # Its process is gone (it ran on this machine): no need to wait for the lease to end.
        taken = ledger_schedules.take_lease(
            conn, self.identity, now, self._lease_s, from_holder=lease.holder
        )
        if taken:
            logger.warning("scheduler %s is gone; %s takes over", lease.holder, self.identity)
        return taken

    def _send(self, task: Task[Any, Any], calls: Sequence[tuple[str, Call]]) -> None:
        try:
            self._publish(task, calls)
        except OffloadError as exc:
            logger.warning(
                "%d fire(s) of %s are in the ledger but not yet published (%s); the workers' "
                "orphan sweep publishes them",
                len(calls),
                task.name,
                exc,
            )

    # --- by hand -------------------------------------------------------------------------------

    def run_now(self, name: str) -> str:
        """Fire `name` now, outside its timing (its next fire stays); the run's id."""
        schedule = self._schedules.get(name)
        task = self._tasks.get(schedule.task) if schedule is not None else None
        if schedule is None or task is None:
            raise ScheduleNotFoundError(name, list(self._schedules))
        now = self._clock()
        run = _run_of(schedule, task, now)
        self._ledger.write(lambda conn: ledger_schedules.record_run_now(conn, schedule, run, now))
        self._publish(task, [(run.id, _call_of(task, run))])
        return run.id

    # --- running -------------------------------------------------------------------------------

    def run_forever(self, stop: threading.Event) -> None:
        """Tick until `stop` is set; then give the lease up so that a standby takes over."""
        try:
            while not stop.is_set():
                try:
                    delay = self.tick()
                except OffloadError as exc:
                    logger.warning("scheduler tick failed, trying again: %s", exc)
                    self.holding = False
                    delay = TICK_S
                stop.wait(delay)
        finally:
            self.release()

    def release(self) -> None:
        if self.holding:
            try:
                self._ledger.write(lambda conn: ledger_schedules.release_lease(conn, self.identity))
            except OffloadError as exc:
                logger.warning("could not release the scheduler lease: %s", exc)
            self.holding = False

    def start(self) -> None:
        """Run on a daemon thread (inside `offload serve`)."""
        self._stop.clear()
        self._thread = threading.Thread(
            target=self.run_forever, args=(self._stop,), name="offload-scheduler", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


def _fires(schedule: Schedule, seen_next: float, now: float) -> list[float]:
    """The fires to run now, by the schedule's catch-up policy, of those due since
    `seen_next`."""
    latest = schedule.fires(seen_next, now, 2)
    missed = len(latest) > 1
    if schedule.catch_up == "all":
        fires = schedule.fires(seen_next, now, schedule.max_catch_up) if missed else latest
    else:
        fires = latest[-1:]
        if schedule.catch_up == "skip" and fires and now - fires[-1] > ON_TIME_S:
            fires = []
    if missed:
        logger.info(
            "schedule %s missed fires since %.0f; catch_up=%s runs %d",
            schedule.name,
            seen_next,
            schedule.catch_up,
            len(fires),
        )
    return fires


def _run_of(schedule: Schedule, task: Task[Any, Any], fire_at: float) -> queries.NewRun:
    return queries.NewRun(
        id=new_run_id(),
        task=task.name,
        lane=Lane.DURABLE,
        queue=task.queue,
        priority=task.policy.priority,
        args=schedule.args,
        idempotency_key=None,
        schedule=schedule.name,
        scheduled_for=fire_at,
    )


def _call_of(task: Task[Any, Any], run: queries.NewRun) -> Call:
    return Call(task.name, run.args, run.queue or task.queue, run.priority, None, None)
