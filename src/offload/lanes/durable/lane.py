"""The durable lane on Celery: the Celery app, task registration, recording and publishing.

Every offload task of this lane becomes a Celery task of the same name whose body is
`Executor.execute`; results and states live in the ledger, never in a Celery result backend.

Guarantees set here: a run is in the ledger before its message is published, and a run the
broker refused is removed again (nothing half-written); messages are acknowledged after the
attempt's outcome is in the ledger (acks late), a pool process that dies hands its message back
(reject on worker lost), one message is prefetched per execution slot (long tasks do not hoard
work), and the ledger hears that running attempts are alive every `heartbeat_interval_s`.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import sqlalchemy as sa
from celery import Celery
from celery.exceptions import Reject

from offload import transport
from offload.core.run import Lane, new_run_id
from offload.core.task import MAX_PRIORITY, Call, Task
from offload.errors import IdempotencyConflictError, TaskArgumentsError
from offload.lanes.durable.celery_events import RunFailed, report
from offload.lanes.durable.eager import EagerPublisher
from offload.lanes.durable.executor import Executor, HandBack
from offload.lanes.durable.heartbeat import heartbeat_step
from offload.lanes.durable.poison import consumer_class
from offload.lanes.durable.publish import Publisher, broker_queue
from offload.ledger import Ledger, queries, retention
from offload.settings import Settings
from offload.transport import sqlite

logger = logging.getLogger("offload.durable")

ORPHAN_BATCH = 500
"""Most orphaned runs one sweep publishes again."""
HELD_BATCH = 500
"""Held runs one step of a queue's resume takes from the ledger and publishes."""

RETENTION_BATCH = 100
"""Runs one retention transaction deletes: 1.7 ms of SQLite write lock (median, 20,000
finished runs of three attempts each; 25 took 0.8 ms, 200 took 2.8 ms; `bench/retention.py`),
so deferring never waits long behind it."""
RETENTION_PAUSE_S = 0.02
"""Between two retention batches, the ledger is left to other writers this long."""


def celery_config(settings: Settings, ledger: Ledger) -> dict[str, Any]:
    """The Celery configuration of a durable lane: JSON only, acks late, the ledger as store."""
    scheme = settings.broker_scheme
    options: dict[str, Any] = {}
    broker_transport = None
    if scheme in ("redis", "rediss"):
        # kombu's Redis transport plus visibility extension and prompt restore sweeps.
        broker_transport = transport.REDIS_TRANSPORT
        options["visibility_timeout"] = settings.visibility_timeout_s
    elif scheme == "sqlite":
        options["lease_s"] = settings.visibility_timeout_s
        options["shared_with_ledger"] = shares_broker_file(settings)
    options.update(settings.broker_options)
    config: dict[str, Any] = {
        "broker_url": settings.resolved_broker_url,
        "broker_transport": broker_transport,
        "broker_transport_options": options,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": settings.publish_timeout_s,
        # JSON only: pickle would let whoever can publish run code in the worker.
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        # The ledger stores results and states.
        "task_ignore_result": True,
        "task_store_errors_even_if_ignored": False,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": settings.default_queue,
        "task_create_missing_queues": True,
        "task_queue_max_priority": MAX_PRIORITY + 1,
        "task_default_priority": None,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        # Off unless asked for: an event per received, started and finished run costs a
        # broker publish each; Flower and celery-exporter need them.
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": False,
        "worker_enable_remote_control": scheme != "sqlite",
        # A channel error must not reconnect the consumer: the reconnect hands back the
        # leases of runs still executing, and they would run twice.
        "broker_channel_error_retry": False,
        # Requeue the message of a pool process that died within 2 s, not Celery's 10 s.
        "worker_lost_wait": 2.0,
        "worker_consumer": consumer_class(ledger),
        "enable_utc": True,
    }
    if scheme == "rediss":
        config["broker_use_ssl"] = True  # an explicit transport does not infer TLS
    return config


def shares_broker_file(settings: Settings) -> bool:
    """Whether the ledger and the embedded broker are one SQLite file (the default)."""
    if settings.broker_scheme != "sqlite" or not settings.resolved_ledger_url.startswith("sqlite"):
        return False
    try:
        broker = sqlite.database_path(settings.resolved_broker_url)
        return broker == sqlite.database_path(settings.resolved_ledger_url)
    except ValueError:  # an in-memory ledger, or one with query parameters
        return False


def _one_callers(exc: Exception) -> bool:
    """Whether a shared ledger write failed for one caller's runs, not for the ledger: an
    idempotency key reused with other arguments, or taken meanwhile by another process."""
    return isinstance(exc, IdempotencyConflictError) or isinstance(
        exc.__cause__, sa.exc.IntegrityError
    )


def _fresh(recorded: Sequence[tuple[str, bool]], calls: Sequence[Call]) -> list[tuple[str, Call]]:
    """The calls that made new runs (an idempotency key may name an existing one): these
    are published."""
    return [
        (run_id, call) for (run_id, created), call in zip(recorded, calls, strict=True) if created
    ]


class DurableLane:
    """The durable lane of one app: its Celery app, the runs it records and publishes, and the
    executor its workers run attempts with.

    `tasks` is the app's registry, read when a worker asks which queues to consume and when a
    message of a task this process does not know must be published by name.
    """

    def __init__(
        self, settings: Settings, ledger: Ledger, tasks: Mapping[str, Task[Any, Any]]
    ) -> None:
        transport.register()
        self._settings = settings
        self._ledger = ledger
        self._tasks = tasks
        self.celery = Celery(f"offload-{id(self):x}", set_as_current=False)
        self.celery.config_from_object(celery_config(settings, ledger))
        self._routes: dict[str, dict[str, str]] = {}
        self.celery.conf.task_routes = (self._routes,)
        self._celery_tasks: dict[str, Any] = {}
        self.publisher: Publisher | EagerPublisher = Publisher(
            self.celery, settings, tasks, self._celery_tasks
        )
        # The publisher that writes new runs' messages in their ledger transaction, when the
        # ledger is the embedded broker's file (the default): one commit per defer.
        self._outbox = self.publisher if shares_broker_file(settings) else None
        self.executor = Executor(settings, ledger, self.publisher.publish_one)
        sweep_every = max(1.0, settings.orphan_after_s / 4)
        chores = [
            (sweep_every, self.republish_orphans),
            (settings.retention_interval_s, self.expire),
        ]
        self.celery.steps["worker"].add(heartbeat_step(ledger, settings, chores))

    def run_in_process(self, advance_clock: Callable[[float], None]) -> EagerPublisher:
        """From now on, run each published run at once in this process (`offload.testing`)."""
        eager = EagerPublisher(self._settings, self._ledger, self._tasks, advance_clock)
        self.publisher = eager
        self._outbox = None
        self.executor = eager.executor
        return eager

    def register(self, task: Task[Any, Any]) -> None:
        """Declare `task` to Celery under its own name."""
        execute = self.executor.execute
        tell_celery = self._settings.task_events
        options: dict[str, Any] = {
            "name": task.name,
            # Not shared: Celery would otherwise add it to every app created later.
            "shared": False,
            "bind": True,
            "typing": False,
            "acks_late": True,
            "reject_on_worker_lost": True,
            "ignore_result": True,
            "serializer": "json",
            # Expected: Celery logs a failed attempt in one line (offload logged it already).
            "throws": (RunFailed,),
        }

        def run(celery_task: Any, **kwargs: Any) -> Any:
            try:
                ended = execute(task, celery_task.request.id, kwargs)
            except HandBack as exc:
                raise Reject(str(exc), requeue=True) from None
            return None if ended is None or not tell_celery else report(celery_task, ended)

        run.__name__ = task.name.rsplit(".", 1)[-1]
        run.__qualname__ = run.__name__
        run.__module__ = getattr(task.fn, "__module__", __name__)
        self._celery_tasks[task.name] = self.celery.task(**options)(run)
        self._routes[task.name] = {"queue": broker_queue(task.queue, task.policy.cpu_bound)}

    def queues(self, *, cpu_bound: bool) -> list[str]:
        """The broker queues of the registered tasks, for the I/O or the CPU workers."""
        names = {self._settings.default_queue} if not cpu_bound else set()
        for task in self._tasks.values():
            if task.policy.runs_on_workers and task.policy.cpu_bound == cpu_bound:
                names.add(broker_queue(task.queue, cpu_bound))
        return sorted(names)

    def submit(
        self, task: Task[Any, Any], calls: Sequence[Call], run_ids: Sequence[str] | None = None
    ) -> list[str]:
        """Record validated calls in the ledger and publish them (blocking); their run ids.

        A call whose idempotency key names an existing run returns that run's id and publishes
        nothing. `run_ids` keeps the ids inline runs already have when they spill.
        """
        if not calls:
            return []
        new = self._new_runs(task, calls, run_ids)
        recorded = self._record([(task, calls, new)])
        fresh = _fresh(recorded, calls)
        if fresh and self._outbox is None:
            self._publish([(task, fresh)])
        return [run_id for run_id, _ in recorded]

    def submit_group(
        self, group: Sequence[tuple[Task[Any, Any], Sequence[Call]]]
    ) -> list[list[str] | Exception]:
        """`submit()` for several callers at once: one ledger transaction, one broker batch.

        Each caller gets its run ids or its own error, as if it had submitted alone: if the
        shared transaction fails (one caller's idempotency conflict, say), each submits alone;
        if the broker refuses the batch, every caller with a new run gets that error and
        nothing of the batch stays recorded.
        """
        if len(group) == 1:
            return [self._alone(*group[0])]
        outcomes: list[list[str] | Exception] = [[] for _ in group]  # no calls: no runs
        taken: list[tuple[int, Task[Any, Any], Sequence[Call], list[queries.NewRun]]] = []
        for index, (task, calls) in enumerate(group):
            try:
                if calls:
                    taken.append((index, task, calls, self._new_runs(task, calls, None)))
            except Exception as exc:  # noqa: BLE001 - that caller's error, handed to it
                outcomes[index] = exc
        try:
            recorded = self._record([(task, calls, new) for _, task, calls, new in taken])
        except Exception as exc:  # noqa: BLE001 - handed to the callers it concerns
            if _one_callers(exc):
                for index, task, calls, _ in taken:  # alone, each meets its own outcome
                    outcomes[index] = self._alone(task, calls)
            else:  # the ledger itself failed: every caller's write did
                for index, *_ in taken:
                    outcomes[index] = exc
            return outcomes
        batches: list[tuple[Task[Any, Any], list[tuple[str, Call]]]] = []
        publishing: list[int] = []  # the callers with a new run, whom a refusal concerns
        position = 0
        for index, task, calls, _ in taken:
            mine = recorded[position : position + len(calls)]
            position += len(calls)
            outcomes[index] = [run_id for run_id, _ in mine]
            fresh = _fresh(mine, calls)
            if fresh:
                batches.append((task, fresh))
                publishing.append(index)
        if batches and self._outbox is None:
            try:
                self._publish(batches)
            except Exception as exc:  # noqa: BLE001 - handed to every caller it concerns
                for index in publishing:
                    outcomes[index] = exc
        return outcomes

    def _record(
        self, taken: Sequence[tuple[Task[Any, Any], Sequence[Call], list[queries.NewRun]]]
    ) -> list[tuple[str, bool]]:
        """Insert the runs in one ledger transaction; (run id, created) for each. When the
        ledger shares the embedded broker's file, their messages go in the same transaction:
        one commit, and no crash can leave a run without its message or a message without its
        run."""
        new = [run for *_, runs in taken for run in runs]
        outbox = self._outbox
        if outbox is None:
            return self._ledger.write(
                lambda conn: queries.insert_runs(conn, new, self._ledger.clock())
            )
        # Built before the transaction, so the write lock is held only for the inserts.
        rows = outbox.message_rows(
            [
                (task, [(run.id, call) for run, call in zip(runs, calls, strict=True)])
                for task, calls, runs in taken
            ]
        )

        def write(conn: sa.Connection) -> list[tuple[str, bool]]:
            recorded = queries.insert_runs(conn, new, self._ledger.clock())
            sent = [row for row, (_, created) in zip(rows, recorded, strict=True) if created]
            # The ledger is SQLite here (`shares_broker_file`): its driver is sqlite3.
            sqlite.insert_messages(
                cast(sqlite3.Connection, conn.connection.driver_connection), sent
            )
            return recorded

        recorded = self._ledger.write(write)
        outbox.wake_consumers()
        return recorded

    def publish(self, task: Task[Any, Any], calls: Sequence[tuple[str, Call]]) -> None:
        """Publish runs already in the ledger (the scheduler's fires): no undo if refused."""
        self.publisher.publish([(task, calls)])

    def _alone(self, task: Task[Any, Any], calls: Sequence[Call]) -> list[str] | Exception:
        try:
            return self.submit(task, calls)
        except Exception as exc:  # noqa: BLE001 - that caller's error, handed to it
            return exc

    def _new_runs(
        self, task: Task[Any, Any], calls: Sequence[Call], run_ids: Sequence[str] | None
    ) -> list[queries.NewRun]:
        if len(calls) > 1 and any(c.idempotency_key for c in calls):
            raise TaskArgumentsError(
                f"{task.name}: an idempotency_key names one run; defer_many() cannot share it"
            )
        now = self._ledger.clock()
        return [
            queries.NewRun(
                id=run_ids[index] if run_ids else new_run_id(),
                task=task.name,
                lane=Lane.DURABLE,
                queue=call.queue,
                priority=call.priority,
                args=call.kwargs,
                idempotency_key=call.idempotency_key,
                next_attempt_at=now + call.countdown_s if call.countdown_s else None,
            )
            for index, call in enumerate(calls)
        ]

    def _publish(
        self, batches: Sequence[tuple[Task[Any, Any], Sequence[tuple[str, Call]]]]
    ) -> None:
        try:
            self.publisher.publish(batches)
        except Exception:
            # Nothing half-written: a run the broker never got is not a run.
            sent = [run_id for _, fresh in batches for run_id, _ in fresh]
            self._ledger.write(lambda conn: queries.delete_runs(conn, sent))
            raise

    def replay(self, replays: Sequence[tuple[queries.NewRun, Call]], *, strict: bool) -> list[str]:
        """Record replays (new runs linked to the runs they replay) and publish them.

        `strict`: an original that is not replayable raises `RunStateError` and nothing is
        written; otherwise it is left out (another replay got it first). If the broker
        refuses, the replays are removed and their originals unlinked before the error
        propagates. Returns the ids of the replays published.
        """
        now = self._ledger.clock()
        new = [replay for replay, _ in replays]
        recorded = self._ledger.write(
            lambda conn: queries.record_replays(conn, new, now, strict=strict)
        )
        taken = {replay.id for replay in recorded}
        by_task: dict[str, list[tuple[str, Call]]] = {}
        for replay, call in replays:
            if replay.id in taken:
                by_task.setdefault(replay.task, []).append((replay.id, call))
        published: set[str] = set()
        try:
            for name, calls in by_task.items():
                self.publisher.publish([(self._tasks[name], calls)])
                published.update(run_id for run_id, _ in calls)
        except Exception:
            # Nothing half-written: replays the broker never got are unrecorded again.
            unsent = [replay for replay in recorded if replay.id not in published]
            self._ledger.write(lambda conn: queries.undo_replays(conn, unsent))
            raise
        return [replay.id for replay in recorded]

    def expire(self) -> int:
        """Retention: delete the finished runs older than the settings keep them."""
        deleted = 0
        for where in retention.expired(self._settings, self._ledger.clock()):
            deleted += retention.purge(
                self._ledger, where, batch=RETENTION_BATCH, pause_s=RETENTION_PAUSE_S
            )
        if deleted:
            logger.info("retention deleted %d finished runs", deleted)
        return deleted

    def republish_orphans(self) -> int:
        """Publish again the waiting runs whose message has not shown up for too long."""
        after_s = self._settings.orphan_after_s
        orphans = self._ledger.write(
            lambda conn: queries.take_orphans(conn, self._ledger.clock(), after_s, ORPHAN_BATCH)
        )
        for orphan in orphans:
            logger.warning(
                "run %s %s waited %.0fs without a delivery; publishing it again",
                orphan.id,
                orphan.task,
                after_s,
            )
            self.publisher.publish_one(orphan)
        return len(orphans)

    def release_held(self, queue: str) -> int:
        """Publish again the runs workers held while `queue` was paused, a batch at a time;
        how many. A run whose publish fails is an orphan that the workers' sweep publishes."""
        released = 0
        while True:
            held = self._ledger.write(
                lambda conn: queries.take_held(conn, queue, self._ledger.clock(), HELD_BATCH)
            )
            for message in held:
                self.publisher.publish_one(message)
            released += len(held)
            if len(held) < HELD_BATCH:
                return released

    def earlier_broker_file(self) -> tuple[str, int] | None:
        """The broker file an earlier offload kept apart from the ledger in `data_dir`, and
        how many messages it still holds; None if there is none (or it is the broker)."""
        if self._settings.broker_url or not shares_broker_file(self._settings):
            return None
        path = str((self._settings.data_dir / "broker.sqlite").resolve())
        waiting = sqlite.count_messages(path)
        return (path, waiting) if waiting else None

    def close(self) -> None:
        """Release the broker connections (the lane can publish again afterwards)."""
        if self._outbox is not None:
            self._outbox.close()
        self.celery.close()
