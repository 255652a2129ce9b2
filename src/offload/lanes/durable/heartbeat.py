"""The worker bootstep that tells the ledger which runs this worker is running.

Every `heartbeat_interval_s` it marks the worker's running runs alive and reports the worker
itself (`offload workers` reads it, on every broker). Between beats it does the lane's chores,
each at its own interval: publishing again the runs whose message never arrived, and deleting
the finished runs retention no longer keeps.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from celery import bootsteps
from celery.worker import state as worker_state

from offload.core.process import worker_identity
from offload.errors import LedgerError
from offload.lanes.durable.poison import dead_letter_listener
from offload.ledger import Ledger, queries
from offload.settings import Settings

logger = logging.getLogger("offload.durable")


Chore = tuple[float, Callable[[], object]]
"""`(interval in seconds, function)`: a periodic job of the lane's workers."""


def heartbeat_step(
    ledger: Ledger, settings: Settings, chores: Sequence[Chore]
) -> type[bootsteps.StartStopStep]:
    """The bootstep class for one lane's workers. The first chore also runs at start-up."""

    class LedgerHeartbeat(bootsteps.StartStopStep):
        label = "offload heartbeat"
        # After the pool: its first children fork before this step starts a thread.
        requires = ("celery.worker.components:Pool",)

        def __init__(self, worker: Any, **kwargs: Any) -> None:
            super().__init__(worker, **kwargs)
            self._stop = threading.Event()
            self._threads: list[threading.Thread] = []
            self._listener: Any = None
            self._identity = worker_identity()
            self._started_at = ledger.clock()

        def start(self, worker: Any) -> None:
            if settings.broker_scheme == "sqlite":
                from offload.transport import sqlite

                self._listener = dead_letter_listener(ledger)
                sqlite.add_dead_letter_listener(self._listener)
            # The first beat and sweep run here, on the main thread: they import and connect
            # whatever the ledger and broker need (psycopg, dialects) before any thread of ours
            # exists. A prefork child forked while another thread held an import lock would
            # wait for that lock forever.
            self._tick(worker)
            self._chore(chores[0][1])
            self._threads = [
                threading.Thread(
                    target=self._loop, args=(worker,), name="offload-heartbeat", daemon=True
                ),
                threading.Thread(target=self._chores, name="offload-chores", daemon=True),
            ]
            for thread in self._threads:
                thread.start()

        def stop(self, worker: Any) -> None:
            self._stop.set()
            if self._listener is not None:
                from offload.transport import sqlite

                sqlite.remove_dead_letter_listener(self._listener)
            try:
                ledger.write(lambda conn: queries.forget_worker(conn, self._identity))
            except LedgerError:
                logger.warning(
                    "could not remove worker %s from the ledger", self._identity, exc_info=True
                )

        def _beat(self, conn: Any, worker: Any, run_ids: list[str]) -> None:
            now = ledger.clock()
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
            while not self._stop.wait(settings.heartbeat_interval_s):
                self._tick(worker)

        def _chores(self) -> None:
            # Apart from the beats: a long purge must not make running runs look lost.
            due = [time.monotonic() + every for every, _ in chores]
            while not self._stop.wait(max(0.0, min(due) - time.monotonic())):
                for index, (every, chore) in enumerate(chores):
                    if time.monotonic() >= due[index] and not self._stop.is_set():
                        self._chore(chore)
                        due[index] = time.monotonic() + every

        def _tick(self, worker: Any) -> None:
            run_ids = [request.id for request in list(worker_state.active_requests)]
            try:
                ledger.write(functools.partial(self._beat, worker=worker, run_ids=run_ids))
            except Exception:
                # Ledger trouble: the heartbeat must outlive it and try again.
                logger.exception("heartbeat failed; trying again")

        def _chore(self, chore: Callable[[], object]) -> None:
            try:
                chore()
            except Exception:
                logger.exception("%s failed; trying again later", getattr(chore, "__name__", chore))

    return LedgerHeartbeat
