"""The durable lane on Celery: the Celery app, task registration, publishing, heartbeats.

Every offload task becomes a Celery task of the same name whose body is `Executor.execute`:
the message carries the run id as Celery's task id and the validated arguments as JSON
keyword arguments, so plain `celery` workers and `send_task()` interoperate. Results and
states live in the ledger, never in a Celery result backend.

Guarantees set here: messages are acknowledged after the attempt's outcome is in the ledger
(acks late), a pool process that dies hands its message back (reject on worker lost),
one message is prefetched per execution slot (long tasks do not hoard work), and the
ledger hears that running attempts are alive every `heartbeat_interval_s`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from celery import Celery, bootsteps, signals
from celery.utils.nodenames import anon_nodename
from celery.worker import state as worker_state
from celery.worker.consumer import Consumer

from offload import transport
from offload.errors import BrokerUnavailableError, LedgerError
from offload.executor import Executor, worker_identity
from offload.ledger import queries
from offload.run import Lane, new_run_id
from offload.settings import mask_url
from offload.task import MAX_PRIORITY

if TYPE_CHECKING:
    from offload.app import Offload
    from offload.task import Call, Task

logger = logging.getLogger("offload.durable")

CPU_QUEUE_SUFFIX = ".cpu"
"""`cpu_bound` tasks wait in `<queue>.cpu`, consumed by prefork workers; the rest by threads."""


ORPHAN_BATCH = 500
"""Most orphaned runs one sweep publishes again."""


def broker_queue(queue: str, cpu_bound: bool) -> str:
    """The broker queue a task's runs are published to."""
    return queue + CPU_QUEUE_SUFFIX if cpu_bound else queue


def _celery_config(app: Offload) -> dict[str, Any]:
    settings = app.settings
    scheme = settings.broker_scheme
    options: dict[str, Any] = {}
    broker_transport = None
    if scheme in ("redis", "rediss"):
        # kombu's Redis transport plus visibility extension and prompt restore sweeps.
        broker_transport = transport.REDIS_TRANSPORT
        options["visibility_timeout"] = settings.visibility_timeout_s
    elif scheme == "sqlite":
        options["lease_s"] = settings.visibility_timeout_s
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
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "worker_enable_remote_control": scheme != "sqlite",
        # A channel error must not reconnect the consumer: the reconnect hands back the
        # leases of runs still executing, and they would run twice.
        "broker_channel_error_retry": False,
        # Requeue the message of a pool process that died within 2 s, not Celery's 10 s.
        "worker_lost_wait": 2.0,
        "worker_consumer": _consumer_class(app),
        "enable_utc": True,
    }
    if scheme == "rediss":
        config["broker_use_ssl"] = True  # an explicit transport does not infer TLS
    return config


class DurableLane:
    """Owns the Celery app of one `Offload`: registration, publishing, the worker executor."""

    def __init__(self, app: Offload) -> None:
        transport.register()
        self.app = app
        self.executor = Executor(app)
        self.scheme = app.settings.broker_scheme
        self.celery = Celery(f"offload-{id(app):x}", set_as_current=False)
        self.celery.config_from_object(_celery_config(app))
        self._routes: dict[str, dict[str, str]] = {}
        self.celery.conf.task_routes = (self._routes,)
        self.celery.steps["worker"].add(_heartbeat_step(app))
        self._celery_tasks: dict[str, Any] = {}

    def register(self, task: Task[Any, Any]) -> None:
        """Declare `task` to Celery under its own name."""
        executor = self.executor
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
        }

        def run(celery_task: Any, **kwargs: Any) -> None:
            executor.execute(task, celery_task.request.id, kwargs)

        run.__name__ = task.name.rsplit(".", 1)[-1]
        run.__qualname__ = run.__name__
        run.__module__ = getattr(task.fn, "__module__", __name__)
        self._celery_tasks[task.name] = self.celery.task(**options)(run)
        self._routes[task.name] = {"queue": broker_queue(task.queue, task.policy.cpu_bound)}

    def queues(self, *, cpu_bound: bool) -> list[str]:
        """The broker queues of the registered tasks, for the I/O or the CPU workers."""
        names = {self.app.settings.default_queue} if not cpu_bound else set()
        for task in self.app.tasks.values():
            # Inline tasks that may spill run their overflow here too.
            durable = task.policy.lane is Lane.DURABLE or task.policy.spill
            if durable and task.policy.cpu_bound == cpu_bound:
                names.add(broker_queue(task.queue, cpu_bound))
        return sorted(names)

    def _message_priority(self, priority: int) -> int | None:
        if priority == 0:
            return None
        # kombu's Redis transport serves *lower* numbers first; AMQP and ours serve higher.
        return MAX_PRIORITY - priority if self.scheme in ("redis", "rediss") else priority

    def _publish_options(self) -> dict[str, Any]:
        timeout = self.app.settings.publish_timeout_s
        return {
            "retry": True,
            "retry_policy": {
                "max_retries": max(1, int(timeout / 0.5)),
                "interval_start": 0,
                "interval_step": 0.25,
                "interval_max": 0.5,
            },
        }

    def publish(self, task: Task[Any, Any], calls: Sequence[tuple[str, Call]]) -> None:
        """Publish one message per `(run id, call)`; `BrokerUnavailableError` if refused."""
        celery_task = self._celery_tasks[task.name]
        options = self._publish_options()
        try:
            with self.celery.producer_or_acquire() as producer:
                # Many runs go out in transport-owned batches (one pipeline on Redis).
                batch = producer.batch(max_size=500) if len(calls) > 1 else contextlib.nullcontext()
                with batch:
                    for run_id, call in calls:
                        self._send(
                            celery_task,
                            task,
                            run_id,
                            call.kwargs,
                            call.queue,
                            call.priority,
                            call.countdown_s,
                            producer,
                            options,
                        )
        except Exception as exc:
            url = mask_url(self.app.settings.resolved_broker_url)
            raise BrokerUnavailableError(
                f"The broker at {url} did not accept the message for {task.name!r}: {exc}; "
                "check that it is running (nothing was recorded)"
            ) from exc

    def publish_one(self, message: queries.RunMessage, countdown_s: float | None = None) -> None:
        """Publish a message for an existing run (a retry, a parked delivery, an orphan)."""
        task = self.app.tasks.get(message.task)
        with self.celery.producer_or_acquire() as producer:
            if task is None or message.task not in self._celery_tasks:
                # A task this process does not know: address it by name.
                self.celery.send_task(
                    message.task,
                    kwargs=message.args,
                    task_id=message.id,
                    queue=message.queue or self.app.settings.default_queue,
                    countdown=countdown_s or None,
                    producer=producer,
                    **self._publish_options(),
                )
                return
            self._send(
                self._celery_tasks[task.name],
                task,
                message.id,
                message.args,
                message.queue or task.queue,
                message.priority,
                countdown_s,
                producer,
                self._publish_options(),
            )

    def republish_orphans(self) -> int:
        """Publish again the waiting runs whose message has not shown up for too long."""
        settings = self.app.settings
        orphans = self.app.ledger.write(
            lambda conn: queries.take_orphans(
                conn, self.app.ledger.clock(), settings.orphan_after_s, ORPHAN_BATCH
            )
        )
        for orphan in orphans:
            logger.warning(
                "run %s %s waited %.0fs without a delivery; publishing it again",
                orphan.id,
                orphan.task,
                settings.orphan_after_s,
            )
            self.publish_one(orphan)
        return len(orphans)

    def _send(
        self,
        celery_task: Any,
        task: Task[Any, Any],
        run_id: str,
        kwargs: dict[str, Any],
        queue: str,
        priority: int,
        countdown_s: float | None,
        producer: Any,
        options: dict[str, Any],
    ) -> None:
        name = broker_queue(queue, task.policy.cpu_bound)
        if signals.before_task_publish.receivers or signals.after_task_publish.receivers:
            # Someone hooks Celery's publishing (tracing, say): let Celery send it.
            celery_task.apply_async(
                kwargs=kwargs,
                task_id=run_id,
                queue=name,
                priority=self._message_priority(priority),
                countdown=countdown_s or None,
                producer=producer,
                **options,
            )
            return
        # The message `apply_async` would send (Celery's protocol 2), built here: Celery's
        # routing, `saferepr` of the arguments and configuration lookups are a third of
        # `apply_async`'s cost (bench/publish_cost.py).
        eta = None
        if countdown_s:
            eta = (datetime.now(UTC) + timedelta(seconds=countdown_s)).isoformat()
        broker_q = self.celery.amqp.queues[name]
        # kombu declares a queue once per connection, but asking it costs three copies of the
        # entity and a retry wrapper on every publish: skip the question once it is declared.
        declared = hash(broker_q) in producer.connection.declared_entities
        producer.publish(
            ((), kwargs, _NO_CANVAS),
            exchange="",
            routing_key=name,
            serializer="json",
            headers={
                "lang": "py",
                "task": task.name,
                "id": run_id,
                "shadow": None,
                "eta": eta,
                "expires": None,
                "group": None,
                "group_index": None,
                "retries": 0,
                "timelimit": [None, None],
                "root_id": run_id,
                "parent_id": None,
                "argsrepr": "()",
                "kwargsrepr": _short_repr(kwargs),
                "origin": anon_nodename(),  # `gen<pid>@<host>`, as Celery sends it
                "ignore_result": True,
                "replaced_task_nesting": 0,
                "stamped_headers": None,
                "stamps": {},
            },
            delivery_mode=broker_q.exchange.delivery_mode or PERSISTENT_DELIVERY_MODE,
            priority=self._message_priority(priority),
            correlation_id=run_id,
            reply_to="",
            declare=None if declared else [broker_q],
            **options,
        )


_NO_CANVAS = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
PERSISTENT_DELIVERY_MODE = 2
REPR_MAX_CHARS = 1024
"""Celery's `kwargsrepr_maxsize`: what worker logs and `celery inspect` show of the arguments."""


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= REPR_MAX_CHARS else text[: REPR_MAX_CHARS - 3] + "..."


def _bury(app: Offload, headers: dict[str, Any], body: Any, queue: str | None, reason: str) -> None:
    """Record a message that can never run as a dead run, with `reason`."""
    run_id = str(headers.get("id") or new_run_id())
    task = str(headers.get("task") or "?")
    args: dict[str, Any] = {}
    if isinstance(body, list | tuple) and len(body) >= 2 and isinstance(body[1], dict):
        args = body[1]
    elif body is not None:
        args = {"raw": repr(body)[:2000]}
    logger.error("run %s %s is poison, recorded as dead: %s", run_id, task, reason)
    try:
        app.ledger.write(
            lambda conn: queries.bury(
                conn,
                run_id=run_id,
                task=task,
                args=args,
                queue=queue,
                reason=reason,
                now=app.ledger.clock(),
            )
        )
    except LedgerError:
        logger.exception("recording poison run %s failed", run_id)


def _consumer_class(app: Offload) -> type[Consumer]:
    """Celery's consumer, plus: every message it cannot run becomes a dead run in the ledger."""

    def bury(message: Any, body: Any, reason: str) -> None:
        queue = (message.delivery_info or {}).get("routing_key")
        if body is None:
            # Celery leaves protocol-2 bodies undecoded until a pool process runs them.
            try:
                body = message.decode()
            except Exception:  # noqa: BLE001 - undecodable is what we record, as raw bytes
                body = message.body
        _bury(app, dict(message.headers or {}), body, queue, reason)

    class OffloadConsumer(Consumer):
        def on_decode_error(self, message: Any, exc: Exception) -> None:
            bury(
                message,
                message.body,
                f"PoisonMessage: cannot decode the message ({type(exc).__name__}: {exc})",
            )
            super().on_decode_error(message, exc)

        def on_unknown_message(self, body: Any, message: Any) -> None:
            bury(message, body, "PoisonMessage: not a task message (no task name in it)")
            super().on_unknown_message(body, message)

        def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
            name = (message.headers or {}).get("task")
            bury(
                message,
                body,
                f"UnknownTask: no task named {name!r} in this worker; was it "
                "renamed or removed by a deploy?",
            )
            super().on_unknown_task(body, message, exc)

        def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
            bury(message, body, f"PoisonMessage: invalid task message: {exc}")
            super().on_invalid_task(body, message, exc)

    return OffloadConsumer


def _dead_letter_listener(app: Offload) -> Any:
    """For the SQLite broker: a message it dead-lettered (poison) becomes a dead run."""

    def listen(queue: str, payload: dict[str, Any], reason: str) -> None:
        body: Any = payload.get("raw")
        with contextlib.suppress(ValueError, TypeError):
            body = json.loads(payload["body"])
        _bury(app, dict(payload.get("headers") or {}), body, queue, f"PoisonMessage: {reason}")

    return listen


def _heartbeat_step(app: Offload) -> type[bootsteps.StartStopStep]:
    """A worker bootstep that tells the ledger which runs this worker is running."""

    class LedgerHeartbeat(bootsteps.StartStopStep):
        label = "offload heartbeat"
        # After the pool: its first children fork before this step starts a thread.
        requires = ("celery.worker.components:Pool",)

        def __init__(self, worker: Any, **kwargs: Any) -> None:
            super().__init__(worker, **kwargs)
            self._stop = threading.Event()
            self._thread: threading.Thread | None = None
            self._listener: Any = None
            self._identity = worker_identity()
            self._started_at = app.ledger.clock()

        def start(self, worker: Any) -> None:
            if app.settings.broker_scheme == "sqlite":
                from offload.transport import sqlite

                self._listener = _dead_letter_listener(app)
                sqlite.add_dead_letter_listener(self._listener)
            # The first beat and sweep run here, on the main thread: they import and connect
            # whatever the ledger and broker need (psycopg, dialects) before any thread of ours
            # exists. A prefork child forked while another thread held an import lock would
            # wait for that lock forever.
            self._tick(worker, sweep=True)
            self._thread = threading.Thread(
                target=self._loop, args=(worker,), name="offload-heartbeat", daemon=True
            )
            self._thread.start()

        def stop(self, worker: Any) -> None:
            self._stop.set()
            if self._listener is not None:
                from offload.transport import sqlite

                sqlite.remove_dead_letter_listener(self._listener)
            try:
                app.ledger.write(lambda conn: queries.forget_worker(conn, self._identity))
            except LedgerError:
                logger.warning(
                    "could not remove worker %s from the ledger", self._identity, exc_info=True
                )

        def _beat(self, conn: Any, worker: Any, run_ids: list[str]) -> None:
            now = app.ledger.clock()
            if run_ids:
                queries.heartbeat(conn, run_ids, now)
            pool = getattr(worker.pool_cls, "__module__", str(worker.pool_cls))
            queries.report_worker(
                conn,
                worker_id=self._identity,
                name=str(worker.hostname),
                queues=sorted(worker.app.amqp.queues.consume_from or ()),
                pool=pool.rsplit(".", 1)[-1],
                concurrency=int(worker.concurrency or 0),
                running=len(run_ids),
                started_at=self._started_at,
                now=now,
            )

        def _loop(self, worker: Any) -> None:
            interval = app.settings.heartbeat_interval_s
            # Sweep for lost messages a few times per orphan_after_s, at most once a second.
            sweep_every = max(1.0, app.settings.orphan_after_s / 4)
            next_sweep = time.monotonic() + sweep_every
            while not self._stop.wait(min(interval, sweep_every)):
                sweep = time.monotonic() >= next_sweep
                if sweep:
                    next_sweep = time.monotonic() + sweep_every
                self._tick(worker, sweep=sweep)

        def _tick(self, worker: Any, *, sweep: bool) -> None:
            run_ids = [request.id for request in list(worker_state.active_requests)]
            try:
                app.ledger.write(functools.partial(self._beat, worker=worker, run_ids=run_ids))
                if sweep:
                    app.durable.republish_orphans()
            except Exception:
                # Ledger or broker trouble: the heartbeat must outlive it and try again.
                logger.exception("heartbeat or orphan sweep failed; trying again")

    return LedgerHeartbeat
