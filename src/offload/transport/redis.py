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
* records delivered messages with one Lua script (``TAKE_SCRIPT``) that also pops what else
  waits, up to the free prefetch, and carries the acks of the runs that finished since: one
  round trip per take, often for several runs, plus a BRPOP when the queue was empty, where
  kombu makes three per message (BRPOP, unacked bookkeeping, ack). An ack waits for the next
  round trip of its event loop, or ``ACK_DELAY_MAX_S`` (0.2 s) when the queue is empty. A
  message the script pops is never popped and unrecorded, kombu's window for losing one;
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

import contextlib
import hashlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from queue import Empty
from typing import Any

from kombu.transport import redis, virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from redis import Redis
from redis.exceptions import NoScriptError

__all__ = ["DEFAULT_OPTIONS", "QoS", "Transport"]

logger = logging.getLogger(__name__)

#: Our defaults; ``broker_transport_options`` given by the user win.
DEFAULT_OPTIONS: dict[str, Any] = {
    "visibility_timeout": 30,
    "unacked_restore_interval": 5,
    "unacked_restore_throttle": 1,
    "unacked_mutex_expire": 20,
}

TAKE_MAX = 10
"""Most messages one take may return when the prefetch limit is off (``prefetch_count=0``)."""

ACK_DELAY_MAX_S = 0.2
"""How long an ack may wait, while the queue is empty, for a take to carry it."""

#: Acks ARGV[3] delivery tags (ARGV[4]...), records the (tag, record) pairs after them as
#: unacked (a message the caller popped with BRPOP), then pops up to ARGV[2] more messages
#: from the queue keys, in priority order, and records each as unacked, exactly as kombu's
#: ``QoS.append`` would (``unacked`` hash: ``[message, exchange, routing_key]``;
#: ``unacked_index``: ARGV[1], the time). Returns ``[key number, message, held]`` triples;
#: held is 0 for a message it could not read, which Python then handles as kombu does. A
#: script that has written may finish its writes on a server over ``maxmemory`` (Redis
#: refuses only a script's first write), so a message it pops is always recorded.
TAKE_SCRIPT = """
local index, unacked, now = KEYS[1], KEYS[2], ARGV[1]
local acks = 3 + tonumber(ARGV[3])
for i = 4, acks do
  redis.call('ZREM', index, ARGV[i])
  redis.call('HDEL', unacked, ARGV[i])
end
for i = acks + 1, #ARGV, 2 do
  redis.call('ZADD', index, now, ARGV[i])
  redis.call('HSET', unacked, ARGV[i], ARGV[i + 1])
end
local taken, limit, key = {}, tonumber(ARGV[2]), 3
while #taken < 3 * limit and key <= #KEYS do
  local item = redis.call('RPOP', KEYS[key])
  if item then
    local held = 0
    local ok, message = pcall(cjson.decode, item)
    if ok and type(message) == 'table' and type(message.properties) == 'table' then
      local info, tag = message.properties.delivery_info, message.properties.delivery_tag
      if type(info) == 'table' and type(tag) == 'string' then
        redis.call('ZADD', index, now, tag)
        redis.call('HSET', unacked, tag, '[' .. item .. ',' .. cjson.encode(info.exchange)
          .. ',' .. cjson.encode(info.routing_key) .. ']')
        held = 1
      end
    end
    taken[#taken + 1] = key - 2
    taken[#taken + 1] = item
    taken[#taken + 1] = held
  else
    key = key + 1
  end
end
return taken
"""
TAKE_SCRIPT_SHA = hashlib.sha1(TAKE_SCRIPT.encode()).hexdigest()


class QoS(redis.QoS):
    """kombu's Redis QoS, plus the set of held tags the visibility keeper re-scores."""

    channel: Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # _delivered is only safe to read from the consuming thread: keep our own set.
        self._held: set[str] = set()
        self._held_lock = threading.Lock()

    def append(self, message: Any, delivery_tag: str) -> None:
        if self.channel._delivering_taken:
            # The take script recorded it as unacked already.
            virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)
        with self._held_lock:
            self._held.add(delivery_tag)
        transport = self.channel.connection
        if isinstance(transport, Transport):
            transport.keep_visibility()

    def ack(self, delivery_tag: str) -> None:
        if self.channel._defer_ack(delivery_tag):
            virtual.QoS.ack(self, delivery_tag)
        else:
            super().ack(delivery_tag)
        with self._held_lock:
            self._held.discard(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        super().reject(delivery_tag, requeue=requeue)
        with self._held_lock:
            self._held.discard(delivery_tag)

    def restore_unacked(self, client: Any | None = None) -> None:
        # kombu restores every delivery it still lists, acked ones included (their unacked
        # record is gone, so nothing happens): an ack still waiting to go out must go first.
        self.channel.flush_acks()
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
    _queue_cycle: Any
    _q_for_pri: Callable[[str, int], str]
    _flush_brpop_reauth: Callable[[], None]
    connection_errors: tuple[type[BaseException], ...]

    _shared_client: Any = None

    # The take script (see TAKE_SCRIPT): used while the last take or BRPOP found a message.
    _take_next = False
    _take_sent: list[str] | None = None  # queue keys of the take in flight
    _take_acks: tuple[str, ...] = ()  # what the take in flight acks
    _delivering_taken = False
    _script_loaded = False
    _pending_acks: list[str] | None = None
    _pending_since = 0.0
    _ack_timer_armed = False
    _unprefixed_client: Any = None

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

    def _defer_ack(self, delivery_tag: str) -> bool:
        """Keep an ack for the next take when the event loop's thread gives it.

        The loop runs its callbacks (acks included) and then its tick, which sends the next
        take; while a BRPOP waits instead, the ack waits for the take that follows the next
        message, at most `ACK_DELAY_MAX_S` (a timer wakes the loop). Acks from other threads,
        or from a consumer without an event loop (which may never poll again), go out at once.
        """
        transport: Any = self.connection
        if getattr(transport, "event_loop_thread", None) != threading.get_ident():
            return False
        if self._pending_acks is None:
            self._pending_acks = []
            self._pending_since = time.monotonic()
            if self._in_poll and self._take_sent is None:  # a BRPOP waits for a message
                self._arm_ack_timer(ACK_DELAY_MAX_S)
        self._pending_acks.append(delivery_tag)
        return True

    def _arm_ack_timer(self, delay_s: float) -> None:
        loop: Any = getattr(self.connection, "event_loop", None)
        if loop is not None and not self._ack_timer_armed:
            self._ack_timer_armed = True
            loop.call_later(delay_s, self._flush_overdue_acks)

    def _flush_overdue_acks(self) -> None:
        self._ack_timer_armed = False
        if not self._pending_acks or self.closed:
            return
        waited = time.monotonic() - self._pending_since
        if waited < ACK_DELAY_MAX_S:  # younger acks than the ones the timer was set for
            self._arm_ack_timer(ACK_DELAY_MAX_S - waited)
            return
        # On a connection error the acks stay pending: the next tick tries again.
        with contextlib.suppress(*self.connection_errors):
            self.flush_acks()

    def _take_acks_out(self) -> list[str]:
        acks, self._pending_acks = self._pending_acks or [], None
        return acks

    def _unsent_acks(self, acks: list[str]) -> None:
        if acks:
            if self._pending_acks is None:
                self._pending_since = time.monotonic()
            self._pending_acks = acks + (self._pending_acks or [])

    def flush_acks(self) -> None:
        """Send the acks that no take carried."""
        acks = self._take_acks_out()
        if not acks:
            return
        try:
            with self.conn_or_acquire() as client, client.pipeline() as pipe:
                pipe.zrem(self.unacked_index_key, *acks).hdel(self.unacked_key, *acks).execute()
        except BaseException:
            self._unsent_acks(acks)
            raise

    def _take_command(self, keys: list[str], acks: list[str], hold: list[str]) -> list[Any]:
        credit = self.qos.can_consume_max_estimate()
        limit = TAKE_MAX if credit is None else max(credit - len(hold) // 2, 0)
        prefix = self.global_keyprefix
        return [
            "EVALSHA",
            TAKE_SCRIPT_SHA,
            2 + len(keys),
            prefix + self.unacked_index_key,
            prefix + self.unacked_key,
            *[prefix + key for key in keys],
            time.time(),
            limit,
            len(acks),
            *acks,
            *hold,
        ]

    def _load_take_script(self) -> None:
        if not self._script_loaded:
            with self.conn_or_acquire() as client:
                client.script_load(TAKE_SCRIPT)
            self._script_loaded = True

    def _consumed_keys(self) -> list[str]:
        queues = self._queue_cycle.consume(len(self.active_queues))
        return [self._q_for_pri(q, pri) for pri in self.priority_steps for q in queues]

    def _brpop_start(self, timeout: float | None = None) -> None:
        """Take waiting messages with the script, or wait for one with kombu's BRPOP."""
        if not self._take_next:
            super()._brpop_start(timeout)  # type: ignore[misc]
            return
        self._load_take_script()
        keys = self._consumed_keys()
        if not keys:
            return
        acks = self._take_acks_out()
        self._take_sent, self._take_acks = keys, tuple(acks)
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()
        try:
            self.client.connection.send_command(*self._take_command(keys, acks, []))
        except BaseException:
            self._take_sent, self._in_poll = None, None
            self._unsent_acks(acks)
            raise

    def _brpop_read(self, **options: Any) -> bool:
        keys = self._take_sent
        if keys is None:
            return self._read_brpop(**options)
        self._take_sent = None
        acks, self._take_acks = list(self._take_acks), ()
        try:
            try:
                taken = self.client.parse_response(self.client.connection, "EVALSHA", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                self._unsent_acks(acks)  # acks are idempotent: send them again
                raise
            except self.ResponseError as exc:
                self._take_failed(exc, acks)
                raise Empty() from None
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()
        self._take_next = bool(taken)
        if not taken:
            raise Empty()
        self._deliver_taken(self._taken(keys, taken))
        return True

    def _take_failed(self, exc: Exception, acks: list[str]) -> None:
        # NOSCRIPT (a restarted or flushed server): nothing ran. Anything else (a queue key
        # that is not a list) is BRPOP's to report, as in stock kombu.
        if "NOSCRIPT" in str(exc):
            self._script_loaded = False
        else:
            logger.warning("the take script failed (%s); waiting with BRPOP", exc)
        self._take_next = False
        self._unsent_acks(acks)

    def _read_brpop(self, **options: Any) -> bool:
        """kombu's `_brpop_read`, except that the take script records the popped message.

        The same round trip carries the acks waiting to go out and takes whatever else
        waits, where kombu would record the message alone (a MULTI/EXEC pipeline).
        """
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()
        if not reply:
            raise Empty()
        key, item = bytes_to_str(reply[0]), bytes_to_str(reply[1])
        message = loads(item)  # not JSON: raises, and the item is gone, as with kombu
        record = _unacked_record(item, message)
        if record is None:  # no delivery tag: kombu's own bookkeeping says what is wrong
            dest = key.rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            self.connection._deliver(message, dest)
            return True
        keys = self._consumed_keys()
        acks = self._take_acks_out()
        try:
            taken = self._run_take(self._take_command(keys, acks, list(record)))
        except self.ResponseError as exc:
            self._take_failed(exc, acks)
            self._record_unacked(*record)  # kombu's bookkeeping, as kombu does it
            taken = []
        except BaseException:
            # Popped and maybe not recorded, as when kombu's bookkeeping fails after its BRPOP.
            self._unsent_acks(acks)
            raise
        self._take_next = bool(taken)
        self._deliver_taken([(key, item, 1), *self._taken(keys, taken)])
        return True

    def _run_take(self, command: list[Any]) -> list[Any]:
        self._load_take_script()
        with self._raw_client() as client:
            try:
                taken: list[Any] = client.execute_command(*command)
            except NoScriptError:  # the server restarted or flushed its scripts since
                self._script_loaded = False
                self._load_take_script()
                taken = client.execute_command(*command)
        return taken

    def _record_unacked(self, tag: str, record: str) -> None:
        with self.conn_or_acquire() as client, client.pipeline() as pipe:
            pipe.zadd(self.unacked_index_key, {tag: time.time()})
            pipe.hset(self.unacked_key, tag, record).execute()

    @contextmanager
    def _raw_client(self) -> Iterator[Any]:
        """A client on the shared pool that sends keys as given (the take prefixes its own)."""
        raw = self._unprefixed_client
        if raw is None or raw.connection_pool is not self._pool:
            raw = self._unprefixed_client = Redis(connection_pool=self._pool)
        yield raw

    def _taken(self, keys: list[str], taken: list[Any]) -> list[tuple[str, str, int]]:
        return [
            (keys[int(taken[i]) - 1], bytes_to_str(taken[i + 1]), int(taken[i + 2]))
            for i in range(0, len(taken), 3)
        ]

    def _deliver_taken(self, taken: list[tuple[str, str, int]]) -> None:
        for n, (key, item, held) in enumerate(taken):
            dest = key.rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            self._delivering_taken = bool(held)
            try:
                self.connection._deliver(loads(item), dest)
            except BaseException:
                # Put back what this take holds and nobody got (kombu's restore pushes it
                # back on its queue and drops its unacked record).
                qos: Any = self.qos
                for _, rest, rest_held in taken[n + 1 :]:
                    if rest_held:
                        qos.restore_by_tag(loads(rest)["properties"]["delivery_tag"], leftmost=True)
                raise
            finally:
                self._delivering_taken = False

    def close(self) -> None:
        try:
            if self._pending_acks and not self.closed:
                self.flush_acks()
        except self.connection_errors:
            logger.warning("acks not sent before closing; the runs may be delivered again")
        finally:
            super().close()


def _unacked_record(item: str, message: Any) -> tuple[str, str] | None:
    """(delivery tag, what kombu's `QoS.append` stores for it), from a popped message."""
    try:
        properties = message["properties"]
        tag, info = properties["delivery_tag"], properties["delivery_info"]
        tail = dumps([info["exchange"], info["routing_key"]])
    except (TypeError, KeyError):
        return None
    return tag, f"[{item},{tail[1:]}"


class _Poller(redis.MultiChannelPoller):
    """kombu's poller; at the end of a tick it sends the acks no take carried in time."""

    _channels: set[Any]

    def on_poll_start(self) -> None:
        try:
            super().on_poll_start()
        finally:
            now = time.monotonic()
            for channel in list(self._channels):
                if not isinstance(channel, Channel) or not channel._pending_acks:
                    continue
                waited = now - channel._pending_since
                if channel._in_poll and channel._take_sent is None and waited < ACK_DELAY_MAX_S:
                    channel._arm_ack_timer(ACK_DELAY_MAX_S - waited)  # a BRPOP waits: not long
                else:
                    channel.flush_acks()


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
        self.cycle = _Poller()
        self.visibility_timeout_s = float(client.transport_options["visibility_timeout"])
        self._keeper: _VisibilityKeeper | None = None
        self._keeper_lock = threading.Lock()
        self.event_loop_thread: int | None = None
        self.event_loop: Any = None

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        # The thread that runs the loop gives acks that can wait for its next round trip.
        self.event_loop, self.event_loop_thread = loop, threading.get_ident()
        super().register_with_event_loop(connection, loop)

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
