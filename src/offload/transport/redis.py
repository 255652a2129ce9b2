"""kombu's Redis transport, without duplicate long runs and with a bounded recovery time.

Select it with Celery's ``broker_transport="offload.transport.redis:Transport"`` while
``broker_url`` stays ``redis://…`` (kombu only imports dotted transport paths given explicitly).

kombu emulates acks on Redis: a delivered message waits in the ``unacked`` hash, scored by its
delivery time in ``unacked_index``, and any consumer's sweep pushes it back onto the queue once
that score is older than ``visibility_timeout``. Stock kombu never refreshes the score, so a run
(or a countdown/ETA message the worker holds) that outlives the timeout is delivered again while
it still runs (celery#2481), and the default sweep cadence adds up to ~100 s to a crash recovery.

This transport:

* re-scores every delivery a live worker holds (prefetched, running, held for an ETA) to "now"
  from a daemon thread every ``visibility_timeout / 3`` (``ZADD XX``: an acked or restored tag is
  never re-added), so a held message is never restored while its worker lives;
* builds one redis-py client per channel for publishes, bookkeeping and acks, where kombu
  builds one per operation (~0.1 ms each; see ``Channel.conn_or_acquire``);
* defaults ``visibility_timeout`` to 30 s, and sweeps every ``unacked_restore_interval`` = 5 s
  (``unacked_restore_throttle`` = 1, so every sweep scans) with ``unacked_mutex_expire`` = 20 s.

Recovery bound after ``kill -9`` (while another worker runs, or after a restart): the killed
worker's last re-score is at most ``visibility_timeout / 3`` old, so its messages are eligible
within ``visibility_timeout`` (30 s) and restored at the next sweep, ≤ 5 s later: **≤ 35 s**.
If the worker died holding the sweep mutex, add up to ``unacked_mutex_expire``: **≤ 55 s**.
Transport options given by the user override all of these defaults.

A worker that cannot reach Redis for longer than 2/3 of the visibility timeout can have its
messages restored elsewhere, as with stock kombu: every broker is at-least-once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis

__all__ = ["DEFAULT_OPTIONS", "QoS", "Transport"]

logger = logging.getLogger(__name__)

#: Our defaults; ``broker_transport_options`` given by the user win.
DEFAULT_OPTIONS: dict[str, Any] = {
    "visibility_timeout": 30,
    "unacked_restore_interval": 5,
    "unacked_restore_throttle": 1,
    "unacked_mutex_expire": 20,
}


class QoS(redis.QoS):
    """kombu's Redis QoS, plus the set of held tags the visibility keeper re-scores."""

    channel: redis.Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # _delivered is only safe to read from the consuming thread: keep our own set.
        self._held: set[str] = set()
        self._held_lock = threading.Lock()

    def append(self, message: Any, delivery_tag: str) -> None:
        super().append(message, delivery_tag)
        with self._held_lock:
            self._held.add(delivery_tag)
        transport = self.channel.connection
        if isinstance(transport, Transport):
            transport.keep_visibility()

    def ack(self, delivery_tag: str) -> None:
        super().ack(delivery_tag)
        with self._held_lock:
            self._held.discard(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        super().reject(delivery_tag, requeue=requeue)
        with self._held_lock:
            self._held.discard(delivery_tag)

    def restore_unacked(self, client: Any | None = None) -> None:
        super().restore_unacked(client)
        with self._held_lock:
            self._held.clear()

    def extend_visibility(self) -> int:
        """Re-score every held delivery to now; return how many were held."""
        with self._held_lock:
            tags = list(self._held)
        if not tags:
            return 0
        now = time.time()
        with self.channel.conn_or_acquire() as client:
            client.zadd(self.unacked_index_key, dict.fromkeys(tags, now), xx=True)
        return len(tags)


class Channel(redis.Channel):
    QoS = QoS

    # kombu internals that the kombu stubs leave out
    _pool: Any
    _create_client: Callable[..., Any]

    _shared_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any | None = None) -> Iterator[Any]:
        """The client for one short operation: one per connection pool, not one per call.

        Stock kombu builds a ``redis.Redis`` (~0.1 ms) for every publish, unacked-bookkeeping
        write and ack: about a quarter of a no-op task's worker CPU.
        """
        if client:
            yield client
            return
        # Sharing is safe because such a client has no state of its own: each command borrows a
        # connection from the pool and gives it back (so threads can share the client), and the
        # pool replaces dead connections (killed, server restarted) just as it did for fresh
        # clients. kombu swaps the pool on close and after fork, and redis-py resets a pool that
        # finds itself in a forked child, so following the pool object is all the invalidation
        # needed. _create_client builds kombu's class, so global_keyprefix still applies. The
        # consuming `self.client` is not reused: it pins the BRPOP connection.
        shared = self._shared_client
        if shared is None or shared.connection_pool is not self._pool:
            shared = self._shared_client = self._create_client()
        yield shared


class _VisibilityKeeper(threading.Thread):
    """Re-scores a transport's held deliveries every ``visibility_timeout / 3``."""

    def __init__(self, transport: Transport, interval: float) -> None:
        super().__init__(name="offload-redis-visibility", daemon=True)
        self.pid = os.getpid()
        self.stopped = threading.Event()
        self._transport = weakref.ref(transport)
        self._interval = interval

    def run(self) -> None:
        while not self.stopped.wait(self._interval):
            transport = self._transport()
            if transport is None:
                return
            transport.extend_visibility()
            del transport


class Transport(redis.Transport):
    """kombu's Redis transport with visibility extension; see the module docstring."""

    Channel = Channel

    def __init__(self, client: Any, *args: Any, **kwargs: Any) -> None:
        # kombu reads some options from the client (register_with_event_loop) and some from the
        # channel class, so the defaults go where both look: the connection's options.
        client.transport_options = {**DEFAULT_OPTIONS, **(client.transport_options or {})}
        super().__init__(client, *args, **kwargs)
        self.visibility_timeout_s = float(client.transport_options["visibility_timeout"])
        self._keeper: _VisibilityKeeper | None = None
        self._keeper_lock = threading.Lock()

    def keep_visibility(self) -> None:
        keeper = self._keeper
        if keeper is not None and keeper.pid == os.getpid() and keeper.is_alive():
            return
        with self._keeper_lock:
            if self._keeper is keeper:
                self._keeper = _VisibilityKeeper(self, self.visibility_timeout_s / 3)
                self._keeper.start()

    def extend_visibility(self) -> None:
        for channel in list(self.channels or ()):
            qos = getattr(channel, "_qos", None)
            if not isinstance(qos, QoS):
                continue
            try:
                qos.extend_visibility()
            except Exception:
                logger.warning("cannot extend the visibility of held messages", exc_info=True)

    def close_connection(self, connection: Any) -> None:
        try:
            super().close_connection(connection)
        finally:
            with self._keeper_lock:
                keeper, self._keeper = self._keeper, None
            if keeper is not None:
                keeper.stopped.set()
