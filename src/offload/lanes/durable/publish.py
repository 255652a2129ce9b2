"""Publishing durable runs: one Celery protocol-2 message per run, built here.

The message carries the run id as Celery's task id and the validated arguments as JSON keyword
arguments, so plain `celery` workers and `send_task()` interoperate.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from celery import Celery, signals
from celery.utils.nodenames import anon_nodename

from offload.core.task import MAX_PRIORITY
from offload.errors import BrokerUnavailableError
from offload.settings import Settings, mask_url
from offload.transport import sqlite

if TYPE_CHECKING:
    from offload.core.task import Call, Task
    from offload.ledger.queries import RunMessage

    Batches = Sequence[tuple[Task[Any, Any], Sequence[tuple[str, Call]]]]
    """Runs to publish: each task with the `(run id, call)` of its runs."""

CPU_QUEUE_SUFFIX = ".cpu"
"""`cpu_bound` tasks wait in `<queue>.cpu`, consumed by prefork workers; the rest by threads."""

PUBLISH_BATCH = 500
"""Most messages one broker batch (one pipeline on Redis) carries."""

PERSISTENT_DELIVERY_MODE = 2
REPR_MAX_CHARS = 1024
"""Celery's `kwargsrepr_maxsize`: what worker logs and `celery inspect` show of the arguments."""

_NO_CANVAS = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def broker_queue(queue: str, cpu_bound: bool) -> str:
    """The broker queue a task's runs are published to."""
    return queue + CPU_QUEUE_SUFFIX if cpu_bound else queue


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= REPR_MAX_CHARS else text[: REPR_MAX_CHARS - 3] + "..."


class Publisher:
    """Sends the messages of one durable lane through its Celery app's producer pool.

    `celery_tasks` maps task names to the Celery tasks the lane registered; `tasks` is the
    app's registry (a run of a task this process does not know is sent by name).
    """

    def __init__(
        self,
        celery: Celery,
        settings: Settings,
        tasks: Mapping[str, Task[Any, Any]],
        celery_tasks: Mapping[str, Any],
    ) -> None:
        self._celery = celery
        self._settings = settings
        self._tasks = tasks
        self._celery_tasks = celery_tasks
        self._broker_file_ready = False  # `message_rows` checked the broker's tables
        self._wakers: sqlite.ProcessWaker | None = None  # the embedded broker's consumers
        if settings.broker_scheme == "sqlite":
            self._broker_file = sqlite.database_path(settings.resolved_broker_url)
            self._wakers = sqlite.ProcessWaker(self._broker_file)
        # kombu's Redis transport serves *lower* numbers first; AMQP and ours serve higher.
        self._lower_first = settings.broker_scheme in ("redis", "rediss")
        timeout = settings.publish_timeout_s
        self._options: dict[str, Any] = {
            "retry": True,
            "retry_policy": {
                "max_retries": max(1, int(timeout / 0.5)),
                "interval_start": 0,
                "interval_step": 0.25,
                "interval_max": 0.5,
            },
        }

    def publish(self, batches: Batches) -> None:
        """Publish one message per `(run id, call)` of each task, in one broker batch (one
        pipeline on Redis) when there are several; `BrokerUnavailableError` if refused."""
        try:
            with self._celery.producer_or_acquire() as producer:
                several = len(batches) > 1 or len(batches[0][1]) > 1
                batch = (
                    producer.batch(max_size=PUBLISH_BATCH) if several else contextlib.nullcontext()
                )
                with batch:
                    self._send_all(batches, producer)
        except Exception as exc:
            raise self._refused(batches, exc) from exc

    def message_rows(self, batches: Batches) -> list[sqlite.MessageRow]:
        """The embedded broker's rows of `publish(batches)`, one per call in order, built but
        not written: the ledger writes them with the runs when it shares the broker's file."""
        rows: list[sqlite.MessageRow]
        if _publishing_is_hooked():  # let Celery build them, through a collecting channel
            try:
                with (
                    self._celery.producer_or_acquire() as producer,
                    producer.channel.collecting() as rows,
                ):
                    self._send_all(batches, producer)
            except Exception as exc:
                raise self._refused(batches, exc) from exc
            return rows
        if not self._broker_file_ready:
            options = self._celery.conf.broker_transport_options
            sqlite.ensure_schema(self._broker_file, options)
            self._broker_file_ready = True
        now = time.time()
        rows = []
        for task, calls in batches:
            for run_id, call in calls:
                queue = broker_queue(call.queue, task.policy.cpu_bound)
                headers = self._headers(task, run_id, call.kwargs, call.countdown_s)
                rows.append(
                    sqlite.message_row(
                        queue,
                        json.dumps(((), call.kwargs, _NO_CANVAS)),
                        headers,
                        self._properties(run_id),
                        self._message_priority(call.priority),
                        now,
                    )
                )
        return rows

    def wake_consumers(self) -> None:
        """Tell the embedded broker's consumers that rows from `message_rows` are committed."""
        if self._wakers is not None:
            self._wakers.get().notify_all()

    def close(self) -> None:
        """Close the socket `wake_consumers` opened (it opens another if called again)."""
        if self._wakers is not None:
            self._wakers.close()

    def _send_all(self, batches: Batches, producer: Any) -> None:
        for task, calls in batches:
            celery_task = self._celery_tasks[task.name]
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
                )

    def _refused(self, batches: Batches, exc: Exception) -> BrokerUnavailableError:
        url = mask_url(self._settings.resolved_broker_url)
        names = ", ".join(sorted({repr(task.name) for task, _ in batches}))
        return BrokerUnavailableError(
            f"The broker at {url} did not accept the message for {names}: {exc}; "
            "check that it is running (nothing was recorded)"
        )

    def publish_one(self, message: RunMessage, countdown_s: float | None = None) -> None:
        """Publish a message for an existing run (a retry, a parked delivery, an orphan)."""
        task = self._tasks.get(message.task)
        with self._celery.producer_or_acquire() as producer:
            if task is None or message.task not in self._celery_tasks:
                # A task this process does not know: address it by name.
                self._celery.send_task(
                    message.task,
                    kwargs=message.args,
                    task_id=message.id,
                    queue=message.queue or self._settings.default_queue,
                    countdown=countdown_s or None,
                    producer=producer,
                    **self._options,
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
            )

    def _message_priority(self, priority: int) -> int | None:
        if priority == 0:
            return None
        return MAX_PRIORITY - priority if self._lower_first else priority

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
    ) -> None:
        name = broker_queue(queue, task.policy.cpu_bound)
        if _publishing_is_hooked():
            # Someone hooks Celery's publishing (tracing, say): let Celery send it.
            celery_task.apply_async(
                kwargs=kwargs,
                task_id=run_id,
                queue=name,
                priority=self._message_priority(priority),
                countdown=countdown_s or None,
                producer=producer,
                **self._options,
            )
            return
        # The message `apply_async` would send (Celery's protocol 2), built here: Celery's
        # routing, `saferepr` of the arguments and configuration lookups are a third of
        # `apply_async`'s cost (bench/publish_cost.py).
        broker_q = self._celery.amqp.queues[name]
        # kombu declares a queue once per connection, but asking it costs three copies of the
        # entity and a retry wrapper on every publish: skip the question once it is declared.
        declared = hash(broker_q) in producer.connection.declared_entities
        producer.publish(
            ((), kwargs, _NO_CANVAS),
            exchange="",
            routing_key=name,
            serializer="json",
            headers=self._headers(task, run_id, kwargs, countdown_s),
            delivery_mode=broker_q.exchange.delivery_mode or PERSISTENT_DELIVERY_MODE,
            priority=self._message_priority(priority),
            correlation_id=run_id,
            reply_to="",
            declare=None if declared else [broker_q],
            **self._options,
        )

    @staticmethod
    def _headers(
        task: Task[Any, Any], run_id: str, kwargs: dict[str, Any], countdown_s: float | None
    ) -> dict[str, Any]:
        """Celery's protocol-2 headers of a run's message."""
        eta = None
        if countdown_s:
            eta = (datetime.now(UTC) + timedelta(seconds=countdown_s)).isoformat()
        return {
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
        }

    @staticmethod
    def _properties(run_id: str) -> dict[str, Any]:
        """The AMQP properties kombu sends with them (a durable queue's delivery mode)."""
        return {"correlation_id": run_id, "reply_to": "", "delivery_mode": PERSISTENT_DELIVERY_MODE}


def _publishing_is_hooked() -> bool:
    """Whether someone hooks Celery's publishing (tracing, say): then Celery sends messages."""
    return bool(signals.before_task_publish.receivers or signals.after_task_publish.receivers)
