"""Crash-safe SQLite transport for kombu: offload's embedded broker.

URL: ``sqlite:///relative/path.sqlite`` or ``sqlite:////absolute/path.sqlite`` (SQLAlchemy's
convention). Call :func:`offload.transport.register` first: kombu resolves URL schemes only
through its alias table.

Why not kombu's ``sqla+sqlite://``: it hides a message when it is delivered and keeps the ack in
the worker's memory, so a ``kill -9`` loses the running task; it also polls, and never deletes rows.

Design:

* A message is a row in ``messages`` until it is acked. Delivery claims a *lease* with one
  ``UPDATE … RETURNING`` on the first ready row of the queue (``priority DESC, id``), inside a
  ``BEGIN IMMEDIATE`` transaction, so two consumers can never claim one row and a poison or
  garbage row moves to ``dead_letters`` atomically with its claim. Ack deletes the row: once a
  consumer loop runs in the process, in the transaction of its next claim (or
  ``ACK_DELAY_MAX_S`` after the loop found nothing to claim, or from the lease thread if the
  loop stopped), one write transaction per run instead of two; the row stays leased until
  then. Requeue and restore release the lease in place: no copies, so a reconnect or a
  shutdown never duplicates a message (kombu's virtual QoS would re-publish one).
* A daemon thread extends the leases of every row a channel holds (prefetched, running, or a
  countdown/ETA message Celery keeps in memory) every ``lease_s / 3``. A run may last any time
  while its worker lives; a killed worker's rows are deliverable again within one lease.
  Consumers reset expired leases at least once per poll cap.
* A row claimed more than ``max_deliveries`` times (the worker probably crashes running it), a
  payload that is not a JSON kombu message, and a reject without requeue all move the row to
  ``dead_letters`` (trimmed to ``dead_letters_max``); :func:`add_dead_letter_listener` hooks run.
* Wake-ups (:mod:`offload.transport._wake`): consumers wait on a UNIX datagram socket for at
  most ``polling_interval`` (1 s); a producer pokes every consumer after its commit, and an ack
  pokes its own consumer (a prefetch slot reopened, where kombu would sleep a whole polling
  interval).
* Celery's workers consume from their event loop (``asynchronous=True``,
  `Transport.register_with_event_loop`), as on Redis: a prefork worker then has no result and
  task handler threads contending for the GIL with its consumer. The loop's claims use a
  connection with a 50 ms busy timeout and retry from a timer, so a held write lock never
  stalls the loop that enforces time limits. Outside an event loop (``drain_events``: kombu
  consumers, ``celery worker`` on gevent/eventlet) a consumer reads its wake-ups only when it
  found nothing to claim, then looks once more before it waits.
* WAL, ``synchronous=NORMAL``, one connection per thread and per process (a forked child never
  touches its parent's handle), a 60 s busy timeout with SQLite's own busy handler (its first
  sleep is 1 ms: retrying every 20-200 µs, as the ledger does, let two consumers claiming back to
  back collide so often that a drain ran 20 % slower). sqlite3 errors are *channel* errors, never
  connection errors: a held write lock must not look like a lost connection, because Celery's
  reconnect path restores and re-runs work. The consumer rides out busy/locked errors itself.

* The file may also hold offload's ledger (tables ``offload_*``), as it does by default: the
  ledger then writes each new run's message in the run's own transaction (`message_row`,
  `insert_messages`, then a `ProcessWaker`), an outbox with one commit per defer. With
  ``shared_with_ledger``, the event loop's claims wait for the write lock with sleeps from
  20 µs, as the ledger's writers do, instead of SQLite's busy handler: its first sleep is
  1 ms, and the ledger's writers took the lock again and again meanwhile (drain 0.64x).

Transport options (Celery ``broker_transport_options``): ``lease_s`` (30), ``max_deliveries``
(10, 0 disables), ``busy_timeout_s`` (60), ``dead_letters_max`` (10,000), ``polling_interval``
(1.0 s), ``synchronous`` ("NORMAL" or "FULL"), ``shared_with_ledger`` (False; offload sets
it when the ledger is this file). Leases use the wall clock shared by processes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import secrets
import socket
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from queue import Empty
from typing import Any, TypeAlias

from kombu.exceptions import ContentDisallowed
from kombu.transport import virtual

from offload.errors import ConfigurationError
from offload.transport._wake import Waker, wake_directory

__all__ = [
    "SCHEMA_VERSION",
    "BrokerSchemaError",
    "Channel",
    "DeadLetterListener",
    "MessageRow",
    "Options",
    "ProcessWaker",
    "Transport",
    "add_dead_letter_listener",
    "count_messages",
    "database_path",
    "ensure_schema",
    "insert_messages",
    "message_row",
    "remove_dead_letter_listener",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
JSON_CONTENT_TYPE = "application/json"

#: A kombu message envelope as stored (``headers``, ``properties``, ``body``…): the JSON boundary.
KombuMessage: TypeAlias = dict[str, Any]
DeadLetterListener: TypeAlias = Callable[[str, KombuMessage, str], None]
#: A message as the broker stores it: (queue, priority, JSON payload, created).
MessageRow: TypeAlias = tuple[str, int, str, float]
#: Tables the file may hold besides the broker's: offload's ledger may share it (its outbox).
LEDGER_TABLE_PREFIX = "offload_"

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids (= delivery tags) never reused
        queue TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        payload TEXT NOT NULL,
        created REAL NOT NULL,
        deliveries INTEGER NOT NULL DEFAULT 0,
        lease_until REAL,
        owner TEXT
    )""",
    "CREATE INDEX messages_ready ON messages (queue, priority DESC, id) WHERE lease_until IS NULL",
    "CREATE INDEX messages_leased ON messages (lease_until) WHERE lease_until IS NOT NULL",
    "CREATE INDEX messages_owner ON messages (owner) WHERE owner IS NOT NULL",
    """CREATE TABLE dead_letters (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        message_id INTEGER NOT NULL,
        queue TEXT NOT NULL,
        payload TEXT NOT NULL,
        reason TEXT NOT NULL,
        deliveries INTEGER NOT NULL,
        created REAL NOT NULL,
        dead_at REAL NOT NULL
    )""",
)
# One statement claims the head of the queue; CAST: a row that is not UTF-8 must still reach the
# dead-letter path instead of failing inside sqlite3's text decoding.
_CLAIM = """
    UPDATE messages SET lease_until = ?, owner = ?, deliveries = deliveries + 1
    WHERE id = (SELECT id FROM messages WHERE queue = ? AND lease_until IS NULL
                ORDER BY priority DESC, id LIMIT 1)
    RETURNING id, CAST(payload AS BLOB), deliveries
"""
_READY = "SELECT 1 FROM messages WHERE queue = ? AND lease_until IS NULL LIMIT 1"
_POISON = (
    "delivered {} times without an ack (max_deliveries={}); "
    "the worker probably crashes while running it"
)
_REJECTED = (
    "rejected by the consumer without requeue (for example an unknown task name, "
    "or a task raising Reject(requeue=False))"
)
_TRANSIENT_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_FULL})
_WRITE_ATTEMPTS = 5  # for acks and releases, each attempt already waits busy_timeout_s
_MAINTENANCE_S = 60.0
_VACUUM_FREE_PAGES = 1024
_VACUUM_SLICE_EVERY_S = 1.0
#: How long a consumer that found nothing to claim keeps its acks, for a claim to take along.
ACK_DELAY_MAX_S = 0.05
_POLL_WITHOUT_WAKEUPS_S = 0.05
#: The busy timeout of the event loop's own connection: a claim that finds the write lock held
#: longer gives up and is retried from a timer, so the loop goes on with time limits and results.
_LOOP_BUSY_TIMEOUT_S = 0.05
_LOOP_BUSY_RETRY_S = 0.05
_BUSY_LOG_EVERY_S = 10.0

_pid = os.getpid()


def _current_pid() -> int:
    """``os.getpid()`` without its syscall: a claim and its ack asked about eight times."""
    return _pid


def _pid_after_fork() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_pid_after_fork)

_dead_letter_listeners: list[DeadLetterListener] = []
# Handles and sockets inherited through fork(): the child must never use or close them (closing a
# SQLite handle can checkpoint or delete the parent's WAL), so they are kept alive here instead.
_inherited: list[object] = []


class BrokerSchemaError(ConfigurationError):
    """Raised when the broker file has a schema this offload cannot read (newer, or not ours)."""


@dataclass(frozen=True)
class Options:
    """Transport options, from Celery's ``broker_transport_options``; unknown keys are ignored."""

    lease_s: float = 30.0
    max_deliveries: int = 10
    busy_timeout_s: float = 60.0
    dead_letters_max: int = 10_000
    polling_interval: float = 1.0
    synchronous: str = "NORMAL"
    shared_with_ledger: bool = False

    @classmethod
    def from_transport_options(cls, options: Mapping[str, Any]) -> Options:
        values = {f.name: options[f.name] for f in fields(cls) if options.get(f.name) is not None}
        result = cls(**values)
        for name in ("lease_s", "busy_timeout_s", "polling_interval"):
            value = getattr(result, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(
                    f"broker_transport_options {name}={value!r}; expected seconds > 0, e.g. 30"
                )
        for name in ("max_deliveries", "dead_letters_max"):
            value = getattr(result, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"broker_transport_options {name}={value!r}; expected an integer >= 0"
                )
        if not isinstance(result.shared_with_ledger, bool):
            raise ValueError(
                f"broker_transport_options shared_with_ledger={result.shared_with_ledger!r}; "
                "expected true or false"
            )
        if str(result.synchronous).upper() not in ("NORMAL", "FULL"):
            raise ValueError(
                f"broker_transport_options synchronous={result.synchronous!r}; "
                "expected 'NORMAL' or 'FULL'"
            )
        return result


def add_dead_letter_listener(listener: DeadLetterListener) -> None:
    """Call ``listener(queue, payload, reason)`` whenever a message moves to ``dead_letters``.

    It runs in the consuming (worker main) process, after the move is committed. ``payload`` is
    the kombu envelope (for Celery, ``payload["headers"]["id"]`` is the task id), or
    ``{"raw": text}`` when the row was not JSON. A listener that raises is logged and skipped.
    """
    if listener not in _dead_letter_listeners:
        _dead_letter_listeners.append(listener)


def remove_dead_letter_listener(listener: DeadLetterListener) -> None:
    """Stop calling a listener added with :func:`add_dead_letter_listener`."""
    with contextlib.suppress(ValueError):
        _dead_letter_listeners.remove(listener)


def database_path(url: str) -> str:
    """Return the absolute file path of a ``sqlite:///…`` broker URL, or raise ``ValueError``."""
    prefix = "sqlite://"
    example = "sqlite:///offload-data/broker.sqlite or sqlite:////var/lib/app/broker.sqlite"
    if not url.startswith(prefix) or not url[len(prefix) :].startswith("/"):
        raise ValueError(f"broker URL {url!r} is not a SQLite file URL; example: {example}")
    path = url[len(prefix) + 1 :]
    if "?" in path:
        raise ValueError(
            f"broker URL {url!r} has query parameters; set broker_transport_options instead"
        )
    if path in ("", ":memory:"):
        raise ValueError(
            f"broker URL {url!r} names no file; workers share the broker through a file, "
            f"e.g. {example}"
        )
    return os.path.abspath(path)


def _is_transient(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and (code & 0xFF) in _TRANSIENT_CODES


class _SpinningConnection(sqlite3.Connection):
    """A connection without SQLite's busy handler, whose transactions wait for the write lock
    with sleeps from 20 µs (`_begin`), as the ledger's do: for the event loop's claims in a
    file the ledger writes too. The handler's first sleep is 1 ms, and the ledger's writers,
    retrying every 20-200 µs, would take the lock again and again before a claim woke."""

    lock_wait_s = 0.0


def _begin(db: sqlite3.Connection) -> None:
    if not isinstance(db, _SpinningConnection):
        db.execute("BEGIN IMMEDIATE")  # SQLite's busy handler waits
        return
    began, pause = time.monotonic(), 20e-6
    while True:
        try:
            db.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if not _is_transient(exc) or time.monotonic() - began > db.lock_wait_s:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 200e-6)


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    _begin(db)
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _delete_rows(db: sqlite3.Connection, ids: list[int]) -> None:
    for start in range(0, len(ids), 500):  # under SQLite's bound-parameter limit
        chunk = ids[start : start + 500]
        db.execute(f"DELETE FROM messages WHERE id IN ({','.join('?' * len(chunk))})", chunk)


def _connect(
    path: str, options: Options, busy_timeout_s: float | None = None, *, spin: bool = False
) -> sqlite3.Connection:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    timeout = options.busy_timeout_s if busy_timeout_s is None else busy_timeout_s
    # Not bound to a thread: the event loop's connection may be closed by whoever stops it.
    db = sqlite3.connect(
        path,
        timeout=0 if spin else timeout,
        isolation_level=None,
        check_same_thread=False,
        factory=_SpinningConnection if spin else sqlite3.Connection,
    )
    if isinstance(db, _SpinningConnection):
        db.lock_wait_s = timeout
    try:
        db.execute(f"PRAGMA synchronous={options.synchronous.upper()}")  # validated value
        db.execute("PRAGMA journal_size_limit=67108864")  # truncate the WAL back to 64 MB
        _ensure_schema(db, path)
    except BaseException:
        db.close()
        raise
    return db


def _ensure_schema(db: sqlite3.Connection, path: str) -> None:
    def version() -> int | None:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" in tables:
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            return int(row[0]) if row else 0
        if {t for t in tables if not t.startswith(LEDGER_TABLE_PREFIX)} - {"sqlite_sequence"}:
            raise BrokerSchemaError(
                f"{path} holds tables {sorted(tables)} but no offload broker schema; "
                "point the broker URL at a file of its own"
            )
        return None

    found = version()  # a plain read: WAL readers never wait for a writer
    if found is None:
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # only takes effect before the first table
        db.execute("PRAGMA journal_mode=WAL")  # persistent in the file
        with _transaction(db):
            found = version()  # another process may have created it meanwhile
            if found is None:
                for statement in _SCHEMA:
                    db.execute(statement)
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                found = SCHEMA_VERSION
    if found != SCHEMA_VERSION:
        raise BrokerSchemaError(
            f"{path} has broker schema version {found}, this offload reads version "
            f"{SCHEMA_VERSION}; upgrade offload, or point the broker URL at a new file"
        )


def _decode(raw: bytes) -> tuple[KombuMessage | None, str | None]:
    """Return (message, None) or (None, why it cannot be delivered)."""
    try:
        message = json.loads(raw)
    except ValueError as exc:
        return None, f"payload is not JSON ({exc}); it starts with {raw[:60]!r}"
    if not isinstance(message, dict) or not isinstance(message.get("properties"), dict):
        return None, "payload is JSON but not a kombu message (no 'properties' object)"
    if message.get("content-type") != JSON_CONTENT_TYPE:
        return None, (
            f"content type {message.get('content-type')!r} is not accepted: "
            "the SQLite broker carries JSON messages only"
        )
    return message, None


def _notify_dead_letter(queue: str, raw: bytes, reason: str) -> None:
    message, _ = _decode(raw)
    payload = message if message is not None else {"raw": raw.decode("utf-8", "replace")}
    headers = payload.get("headers")
    if not isinstance(headers, dict):
        headers = {}
    logger.error(
        "message %s (task %s) of queue %r moved to dead_letters: %s",
        headers.get("id"),
        headers.get("task"),
        queue,
        reason,
    )
    for listener in list(_dead_letter_listeners):
        try:
            listener(queue, payload, reason)
        except Exception:
            logger.exception("dead-letter listener %r failed for queue %r", listener, queue)


class QoS(virtual.QoS):
    """Acks, rejects and restores change the rows; ``_delivered`` only counts the prefetch."""

    channel: Channel

    def ack(self, delivery_tag: str) -> None:
        self.channel.ack_row(delivery_tag)
        super().ack(delivery_tag)
        self.channel.transport.waker().notify_self()  # a prefetch slot is free: claim now

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            self.channel.release_row(delivery_tag)
        else:
            self.channel.dead_letter_row(delivery_tag, _REJECTED)
        super().ack(delivery_tag)  # virtual.QoS.reject would re-publish a copy
        self.channel.transport.waker().notify_self()

    def restore_unacked(self) -> None:
        if self._delivered:
            self._delivered.clear()  # restore_unacked_once() asserts it is empty afterwards
        self.channel.flush_acks()  # an acked row is done: never give it back
        self.channel.release_all()


_INSERT_MESSAGE = "INSERT INTO messages (queue, priority, payload, created) VALUES (?, ?, ?, ?)"


def message_row(
    queue: str,
    body: str,
    headers: dict[str, Any],
    properties: dict[str, Any],
    priority: int | None,
    created: float,
) -> MessageRow:
    """The row a kombu `Producer.publish` of the JSON `body` to `queue` (default exchange)
    stores, built without the producer, which cost a third of a defer: for a ledger that
    writes its runs' messages itself. The delivery tag is the row id, set when claimed."""
    level = max(0, min(priority or 0, Channel.max_priority))
    message = {
        "body": body,
        "content-encoding": "utf-8",
        "content-type": JSON_CONTENT_TYPE,
        "headers": headers,
        "properties": {
            **properties,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": level,
            "body_encoding": "utf-8",
        },
    }
    return (queue, level, json.dumps(message, separators=(",", ":")), created)


def ensure_schema(path: str, transport_options: Mapping[str, Any]) -> None:
    """Create the broker's tables in the file at `path` if they are missing (what connecting
    does): for a ledger that writes messages there before any channel opened it."""
    _connect(path, Options.from_transport_options(transport_options)).close()


def count_messages(path: str) -> int:
    """How many messages wait or run in the broker file at `path` (0: none, or no broker
    there); opened read-only, so that asking creates nothing."""
    if not os.path.isfile(path):
        return 0
    uri = pathlib.Path(path).resolve().as_uri() + "?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        try:
            return int(db.execute("SELECT count(*) FROM messages").fetchone()[0])
        except sqlite3.OperationalError:  # not a broker file
            return 0


def insert_messages(db: sqlite3.Connection, rows: list[MessageRow]) -> None:
    """Write rows (`message_row`, `Channel.collecting`) in the caller's transaction on the
    broker file, the ledger's when it shares it; its `ProcessWaker` after the commit."""
    db.executemany(_INSERT_MESSAGE, rows)


class ProcessWaker:
    """The `Waker` of one broker file for the calling process, made on first use: a forked
    child makes its own and leaves its parent's alone (kept in `_inherited`). Consumers listen
    on theirs; a producer that commits rows itself calls `get().notify_all()` afterwards."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.current: Waker | None = None  # this process's, or one inherited and not yet replaced
        self._lock = threading.Lock()

    def get(self) -> Waker:
        waker = self.current
        if waker is None or waker.pid != _current_pid():
            with self._lock:
                waker = self.current
                if waker is None or waker.pid != _current_pid():
                    if waker is not None:
                        _inherited.append(waker)
                    waker = self.current = Waker(wake_directory(self.path))
        return waker

    def close(self) -> None:
        """Close the current waker (`get()` makes a new one)."""
        with self._lock:
            waker, self.current = self.current, None
        if waker is not None:
            waker.close()


class PublishBatch:
    """Messages published inside `Producer.batch()`: one write transaction (one commit) per
    `max_size` of them instead of one each. All or none of a flush is in the broker."""

    def __init__(self, channel: Channel, max_size: int) -> None:
        self.channel = channel
        self.max_size = max_size
        self._rows: list[MessageRow] = []
        self._aborted = False

    def publish(self, message: Any, **kwargs: Any) -> None:
        if self._aborted:
            raise RuntimeError("SQLite publish batch is aborted")
        self.channel.basic_publish(message, _publish_batch=self, **kwargs)
        if len(self._rows) >= self.max_size:
            self.flush()

    def add(self, row: MessageRow) -> None:
        self._rows.append(row)

    def flush(self) -> None:
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        with _transaction(self.channel.transport.db()) as db:
            db.executemany(_INSERT_MESSAGE, rows)
        self.channel.transport.waker().notify_all()

    def discard(self) -> None:
        self._aborted = True
        self._rows = []

    def close(self) -> None:
        self._rows = []


class Channel(virtual.Channel):
    """A kombu virtual channel whose messages are rows in the broker file."""

    QoS = QoS
    supports_fanout = False
    # No fanout: bindings live in each process's memory, so a broadcast would reach nobody.
    exchange_types = {  # noqa: RUF012 (kombu's own class attribute, read-only in practice)
        k: v for k, v in virtual.Channel.exchange_types.items() if k != "fanout"
    }

    def __init__(self, connection: Transport, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self.transport = connection  # kombu drops .connection on close; late acks still need it
        self.holds_leases = False
        self._no_ack_queues: set[str] = set()
        self._pending_acks: list[int] = []
        self._pending_since = 0.0  # monotonic time of the oldest pending ack
        self._pending_lock = threading.Lock()
        self._owner = ""
        self._owner_pid = -1
        self._collected: list[MessageRow] | None = None
        connection.db()  # open the file and check its schema now: a bad file fails at connect

    @property
    def owner(self) -> str:
        """Lease owner id, new in every process so a forked child never extends or frees ours."""
        pid = _current_pid()
        if self._owner_pid != pid:
            self._owner = f"{socket.gethostname()}:{pid}:{secrets.token_hex(4)}"
            self._owner_pid = pid
        return self._owner

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        if message.get("content-type") != JSON_CONTENT_TYPE:
            raise ContentDisallowed(
                f"the SQLite broker carries JSON messages only, got content type "
                f"{message.get('content-type')!r}; use serializer='json'"
            )
        payload = json.dumps(message, separators=(",", ":"))
        row = (queue, self._get_message_priority(message), payload, self.transport.clock())
        if self._collected is not None:
            self._collected.append(row)
            return
        batch: PublishBatch | None = kwargs.get("_publish_batch")
        if batch is not None:
            batch.add(row)
            return
        self.transport.db().execute(_INSERT_MESSAGE, row)
        self.transport.waker().notify_all()

    @contextlib.contextmanager
    def collecting(self) -> Iterator[list[MessageRow]]:
        """Messages published on this channel meanwhile become rows in the list, not writes: a
        ledger sharing the broker's file writes them with its runs (`insert_messages`)."""
        rows: list[MessageRow] = []
        self._collected = rows
        try:
            yield rows
        finally:
            self._collected = None

    def create_publish_batch(self, max_size: int) -> PublishBatch:
        """kombu's `Producer.batch()`: the messages of a batch go in one transaction."""
        return PublishBatch(self, max_size)

    def encode_body(self, body: Any, encoding: str | None = None) -> tuple[Any, str]:
        # Keep JSON bodies readable in the table and in dead_letters; base64 only binary bodies.
        if isinstance(body, bytes):
            with contextlib.suppress(UnicodeDecodeError):
                return body.decode("utf-8"), "utf-8"
        elif isinstance(body, str):
            return body, "utf-8"
        return super().encode_body(body, "base64")

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        message = self.claim(queue, no_ack=queue in self._no_ack_queues)
        if message is None:
            raise Empty()
        return message

    def claim(self, queue: str, no_ack: bool = False) -> KombuMessage | None:
        """Lease the next message of ``queue`` (delete it at once if ``no_ack``), or None."""
        transport = self.transport
        transport.maybe_reap()
        db = transport.consumer_db()
        if not db.execute(_READY, (queue,)).fetchone():
            return None  # a read: idle polls of empty queues never take the write lock
        dead: list[tuple[str, bytes, str]] = []
        acks = self._take_acks()
        try:
            with _transaction(db):
                _delete_rows(db, acks)  # the acks given since the last claim ride along
                message, row_id, deliveries = self._claim_one(db, queue, no_ack, dead)
        except BaseException:
            self._unsent_acks(acks)
            raise
        for args in dead:
            _notify_dead_letter(*args)
        if message is None:
            return None
        properties = message["properties"]
        properties["delivery_tag"] = str(row_id)
        if deliveries > 1:
            properties.setdefault("delivery_info", {})["redelivered"] = True
            if isinstance(message.get("headers"), dict):
                message["headers"]["redelivered"] = True  # as kombu's Redis transport does
        if not no_ack:
            self.holds_leases = True
            transport.keep_leases()
        return message

    def _claim_one(
        self, db: sqlite3.Connection, queue: str, no_ack: bool, dead: list[tuple[str, bytes, str]]
    ) -> tuple[KombuMessage | None, int, int]:
        """Lease the next readable message inside the caller's transaction; poison goes dead."""
        transport, options = self.transport, self.transport.options
        reason: str | None
        while True:
            until = transport.clock() + options.lease_s
            rows = db.execute(_CLAIM, (until, self.owner, queue)).fetchall()
            if not rows:
                return None, 0, 0
            row_id, raw, deliveries = rows[0]
            if options.max_deliveries and deliveries > options.max_deliveries:
                message, reason = None, _POISON.format(deliveries - 1, options.max_deliveries)
            else:
                message, reason = _decode(raw)
            if message is not None:
                if no_ack:
                    db.execute("DELETE FROM messages WHERE id = ?", (row_id,))
                return message, row_id, deliveries
            dead.append((queue, bytes(raw), str(reason)))
            transport.move_to_dead_letters(db, row_id, str(reason))

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        raw = self.claim(queue, no_ack=no_ack)
        if raw is None:
            return None
        message = self.Message(raw, channel=self)
        if not no_ack:
            self.qos.append(message, str(message.delivery_tag))
        return message

    def basic_consume(
        self,
        queue: str,
        no_ack: bool,
        callback: Callable[..., Any] | None,
        consumer_tag: str | None,
        **kwargs: Any,
    ) -> str:
        if no_ack:
            self._no_ack_queues.add(queue)
        self.transport.waker().listen()
        return super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)

    def basic_cancel(self, consumer_tag: str) -> Any:
        self._no_ack_queues.discard(self._tag_to_queue.get(consumer_tag, ""))
        self.flush_acks()
        return super().basic_cancel(consumer_tag)

    def close(self) -> None:
        try:
            self.flush_acks()
        except sqlite3.Error:
            logger.warning("acks not recorded before closing; their runs may be delivered again")
        finally:
            super().close()

    def ack_row(self, delivery_tag: str) -> None:
        """Delete an acked row: with the consumer's next claim once this process consumes.

        The ack wakes the consumer loop, which claims again at once and deletes the row in the
        same transaction, or, finding nothing to claim, deletes it ``ACK_DELAY_MAX_S`` later
        (`flush_overdue_acks`): one transaction less per run. The lease keeper deletes what is
        left every ``lease_s / 3`` (a loop that stopped), and keeps such rows leased
        meanwhile, so an acked row is never delivered again while this process lives. Without
        a consumer loop in this process (a forked child, `basic_get`) the row goes at once.
        Whoever acks first wins: a late ack of a row someone else re-claimed still means "done".
        """
        if self.transport.consumes_here():
            with self._pending_lock:
                if not self._pending_acks:
                    self._pending_since = time.monotonic()
                self._pending_acks.append(int(delivery_tag))
            return
        self.transport.write("ack", "DELETE FROM messages WHERE id = ?", (int(delivery_tag),))

    def _take_acks(self) -> list[int]:
        with self._pending_lock:
            acks, self._pending_acks = self._pending_acks, []
        return acks

    def _unsent_acks(self, acks: list[int]) -> None:
        if acks:
            with self._pending_lock:
                if not self._pending_acks:
                    self._pending_since = time.monotonic()
                self._pending_acks[:0] = acks

    def acks_due_in(self) -> float | None:
        """Seconds until the pending acks should be flushed (<= 0: now), None without any."""
        with self._pending_lock:
            if not self._pending_acks:
                return None
            return self._pending_since + ACK_DELAY_MAX_S - time.monotonic()

    def flush_acks(self, patient: bool = True) -> None:
        """Delete the acked rows that no claim took along.

        ``patient`` (closing, cancelling, the lease keeper) rides out a held lock for minutes;
        the event loop tries once on its 50 ms connection and keeps the acks if that fails.
        """
        acks = self._take_acks()
        if not acks:
            return
        try:
            if patient:
                self.transport.retry("ack", lambda: _delete_rows(self.transport.db(), acks))
            else:
                _delete_rows(self.transport.consumer_db(), acks)
        except BaseException:
            self._unsent_acks(acks)
            raise

    def release_row(self, delivery_tag: str) -> None:
        self.transport.write(
            "requeue",
            "UPDATE messages SET lease_until = NULL, owner = NULL WHERE id = ? AND owner = ?",
            (int(delivery_tag), self.owner),
        )
        self.transport.waker().notify_all()

    def release_all(self) -> None:
        """Give back every lease we hold (graceful stop, reconnect): not counted as a delivery."""
        if not self.holds_leases:
            return
        self.transport.write(
            "restore",
            "UPDATE messages SET lease_until = NULL, owner = NULL, deliveries = deliveries - 1 "
            "WHERE owner = ?",
            (self.owner,),
        )
        self.transport.waker().notify_all()

    def dead_letter_row(self, delivery_tag: str, reason: str) -> None:
        def move() -> tuple[str, bytes] | None:
            with _transaction(self.transport.db()) as db:
                return self.transport.move_to_dead_letters(db, int(delivery_tag), reason)

        moved = self.transport.retry("dead-letter", move)
        if moved is not None:
            _notify_dead_letter(moved[0], moved[1], reason)

    def _restore(self, message: Any) -> None:
        self.release_row(message.delivery_tag)  # release in place: never a copy

    def _restore_at_beginning(self, message: Any) -> None:
        self.release_row(message.delivery_tag)

    def _size(self, queue: str) -> int:
        sql = "SELECT count(*) FROM messages WHERE queue = ? AND lease_until IS NULL"
        return int(self.transport.db().execute(sql, (queue,)).fetchone()[0])

    def _purge(self, queue: str) -> int:
        sql = "DELETE FROM messages WHERE queue = ? AND lease_until IS NULL"
        return self.transport.db().execute(sql, (queue,)).rowcount

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        self.transport.db().execute("DELETE FROM messages WHERE queue = ?", (queue,))

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        return True  # queues are implicit: a queue exists once a message names it

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        pass


class _LeaseKeeper(threading.Thread):
    """Extends a transport's leases every ``lease_s / 3``, whatever its consumer loop does, and
    records the acks that loop left behind."""

    def __init__(self, transport: Transport) -> None:
        super().__init__(name="offload-sqlite-leases", daemon=True)
        self.pid = _current_pid()
        self.stopped = threading.Event()
        self._transport = weakref.ref(transport)
        self._interval = transport.options.lease_s / 3

    def run(self) -> None:
        while not self.stopped.wait(self._interval):
            transport = self._transport()
            if transport is None:
                return
            transport.extend_leases()
            try:
                transport.flush_acks()  # a consumer loop that stopped leaves its acks here
            except sqlite3.Error:
                logger.warning("cannot record acks in %s; retrying", transport.path, exc_info=True)
            del transport


class Transport(virtual.Transport):
    """kombu transport for ``sqlite:///path`` URLs; see the module docstring."""

    Channel = Channel
    can_parse_url = True
    driver_type = "sqlite"
    driver_name = "sqlite3"
    polling_interval: float = 1.0
    implements = virtual.Transport.implements.extend(
        asynchronous=True, exchange_type=frozenset(["direct", "topic"]), heartbeats=False
    )
    # OperationalError must stay a channel error: see the module docstring.
    channel_errors = (*virtual.Transport.channel_errors, sqlite3.OperationalError, sqlite3.Error)

    def __init__(self, client: Any, **kwargs: Any) -> None:
        self.options = Options.from_transport_options(client.transport_options or {})
        super().__init__(client, **kwargs)
        self.polling_interval = self.options.polling_interval
        self.path = database_path(client.hostname or "")
        self.clock: Callable[[], float] = time.time
        self._local = threading.local()
        self._lock = threading.Lock()
        self._wakers = ProcessWaker(self.path)
        self._keeper: _LeaseKeeper | None = None
        self._next_reap = 0.0
        self._next_maintenance = 0.0
        self._consumer_pid = -1
        self._loop: Any = None  # kombu's Hub, once Celery's event loop consumes from us
        self._loop_thread = -1
        self._loop_db: sqlite3.Connection | None = None
        self._loop_fds: tuple[int, ...] = ()
        self._loop_poll: Any = None
        self._loop_timer: Any = None  # the one pending retry or ack flush
        self._loop_timer_at = 0.0
        self._busy_since: float | None = None  # monotonic time the loop's claims met a lock
        self._busy_logged = 0.0

    def driver_version(self) -> str:
        return sqlite3.sqlite_version

    def as_uri(self, uri: str, include_password: bool = False, mask: str = "**") -> str:
        return uri  # a file path holds no secret

    def db(self) -> sqlite3.Connection:
        """This thread's connection to the broker file (a forked child opens its own)."""
        local, pid = self._local, _current_pid()
        db: sqlite3.Connection | None = getattr(local, "db", None)
        if db is None or local.pid != pid:
            if db is not None:
                _inherited.append(db)
            db = local.db = _connect(self.path, self.options)
            local.pid = pid
        return db

    def consumer_db(self) -> sqlite3.Connection:
        """The connection claims and acks use: on the event loop's thread, one whose busy timeout
        is 50 ms, so a held write lock never stalls the loop (`register_with_event_loop`)."""
        if self._loop_thread == threading.get_ident() and self.consumes_here():
            db = self._loop_db
            if db is None:
                db = self._loop_db = _connect(
                    self.path,
                    self.options,
                    _LOOP_BUSY_TIMEOUT_S,
                    spin=self.options.shared_with_ledger,
                )
            return db
        return self.db()

    def waker(self) -> Waker:
        return self._wakers.get()

    def keep_leases(self) -> None:
        keeper = self._keeper
        if keeper is None or keeper.pid != _current_pid() or not keeper.is_alive():
            with self._lock:
                if self._keeper is keeper:
                    self._keeper = _LeaseKeeper(self)
                    self._keeper.start()

    def extend_leases(self) -> None:
        for channel in list(self.channels or ()):
            if not isinstance(channel, Channel) or not channel.holds_leases:
                continue
            try:
                self.db().execute(
                    "UPDATE messages SET lease_until = ? WHERE owner = ?",
                    (self.clock() + self.options.lease_s, channel.owner),
                )
            except sqlite3.Error:
                logger.warning("cannot extend leases in %s; retrying", self.path, exc_info=True)

    def write(self, what: str, sql: str, params: tuple[Any, ...]) -> None:
        self.retry(what, lambda: self.db().execute(sql, params))

    def retry(self, what: str, operation: Callable[[], Any]) -> Any:
        """Run a write that must not be lost, riding out a busy or full database a few times."""
        for attempt in range(1, _WRITE_ATTEMPTS + 1):
            try:
                return operation()
            except sqlite3.OperationalError as exc:
                if not _is_transient(exc) or attempt == _WRITE_ATTEMPTS:
                    raise
                logger.warning(
                    "SQLite broker %s: %s failed (%s); retry %d of %d",
                    self.path,
                    what,
                    exc,
                    attempt,
                    _WRITE_ATTEMPTS - 1,
                )
                time.sleep(0.1 * attempt)
        raise AssertionError("unreachable")

    def move_to_dead_letters(
        self, db: sqlite3.Connection, row_id: int, reason: str
    ) -> tuple[str, bytes] | None:
        """Move one row inside the caller's transaction; return (queue, payload), None if gone."""
        row = db.execute(
            "SELECT queue, CAST(payload AS BLOB) FROM messages WHERE id = ?", (row_id,)
        ).fetchone()
        if row is None:
            return None
        db.execute(
            "INSERT INTO dead_letters (message_id, queue, payload, reason, deliveries, created, "
            "dead_at) SELECT id, queue, payload, ?, deliveries, created, ? "
            "FROM messages WHERE id = ?",
            (reason, self.clock(), row_id),
        )
        db.execute("DELETE FROM messages WHERE id = ?", (row_id,))
        db.execute(
            "DELETE FROM dead_letters WHERE id <= (SELECT max(id) FROM dead_letters) - ?",
            (self.options.dead_letters_max,),
        )
        return str(row[0]), bytes(row[1])

    def consumes_here(self) -> bool:
        """Whether a consumer loop (`drain_events`, or Celery's event loop) runs in this process."""
        return self._consumer_pid == _current_pid()

    def flush_acks(self) -> None:
        for channel in list(self.channels or ()):
            if isinstance(channel, Channel):
                channel.flush_acks()

    def flush_overdue_acks(self, patient: bool = True) -> float | None:
        """Flush the acks kept for ``ACK_DELAY_MAX_S``; return seconds until the next are due."""
        next_due = None
        for channel in list(self.channels or ()):
            if not isinstance(channel, Channel) or (due := channel.acks_due_in()) is None:
                continue
            if due <= 0:
                channel.flush_acks(patient)
            elif next_due is None or due < next_due:
                next_due = due
        return next_due

    def drain_events(self, connection: Any, timeout: float | None = None) -> None:  # type: ignore[override]
        self._consumer_pid = _current_pid()
        deadline = None if timeout is None else time.monotonic() + timeout
        waker = self.waker()
        while True:
            acks_due = None
            try:
                self.maybe_reap()
                self.cycle.get(self._deliver, timeout=timeout)  # type: ignore[union-attr]
                return
            except Empty:
                if not waker.cleared:
                    # Read the wake-ups only now, then look once more: a commit after this
                    # leaves a byte for select(). While messages keep coming the loop reads
                    # none (each read is a syscall, and a GIL hand-off in a prefork worker),
                    # and a producer's wake-up to a full queue fails at once, waking no one.
                    waker.clear()
                    continue
                try:
                    acks_due = self.flush_overdue_acks()  # a claim soon takes the rest along
                except sqlite3.OperationalError as exc:
                    if not _is_transient(exc):
                        raise
                    logger.warning("SQLite broker %s: acks wait (%s)", self.path, exc)
            except sqlite3.OperationalError as exc:
                if not _is_transient(exc):
                    raise
                logger.warning("SQLite broker %s is busy (%s); consumer waits", self.path, exc)
                waker.clear()
            wait = self._poll_cap(waker)
            if acks_due is not None:
                wait = min(wait, acks_due)
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError()  # socket.timeout
            waker.wait(wait)

    def _poll_cap(self, waker: Waker) -> float:
        """How long a consumer waits for a wake-up before it looks anyway."""
        return self.polling_interval if waker.path is not None else _POLL_WITHOUT_WAKEUPS_S

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        """Consume from Celery's event loop (kombu's Hub), once the worker's loop starts.

        The loop watches our wake-up sockets (a producer's commit, an ack that freed a prefetch
        slot) and polls every ``polling_interval`` (expired leases, maintenance, a lost
        wake-up). Acks wake us through the socket, never ``loop.call_soon``: kombu's loop does
        not shorten its poll for callbacks its own thread adds, so such a claim could wait a
        whole poll, and prefork's job writes are only scheduled by the loop turn after a
        delivery. Claims and acks on the loop's thread use a connection with a 50 ms busy
        timeout: a held write lock must never stall the loop that also enforces time limits and
        reads the pool's results, so a busy claim is retried from a timer instead.
        """
        self._leave_event_loop()
        self._consumer_pid = _current_pid()
        self._loop, self._loop_thread = loop, threading.get_ident()
        waker = self.waker()
        waker.listen()
        self._loop_poll = loop.call_repeatedly(self._poll_cap(waker), self._consume_in_loop)
        self._watch_wakeups()
        loop.call_soon(self._consume_in_loop)

    def _watch_wakeups(self) -> None:
        fds = self.waker().filenos()
        if fds != self._loop_fds:
            for fd in self._loop_fds:
                self._loop.remove_reader(fd)
            for fd in fds:
                self._loop.add_reader(fd, self._on_wakeup, fd)
            self._loop_fds = fds

    def _on_wakeup(self, fd: int) -> None:
        self.waker().clear(fd)
        self._consume_in_loop()

    def _consume_in_loop(self) -> None:
        """Deliver what the prefetch allows; acks no claim took along wait for a timer."""
        if self._loop is None:
            return  # a timer or call_soon that outlived `_leave_event_loop`
        try:
            with contextlib.suppress(Empty):
                while True:
                    self.cycle.get(self._deliver)  # type: ignore[union-attr]
            acks_due = self.flush_overdue_acks(patient=False)
        except sqlite3.OperationalError as exc:
            if not _is_transient(exc):
                raise
            self._log_busy(exc)
            self._consume_later(_LOOP_BUSY_RETRY_S)
            return
        if self._busy_since is not None:
            busy_s, self._busy_since = time.monotonic() - self._busy_since, None
            logger.warning("SQLite broker %s: consuming again after %.1f s", self.path, busy_s)
        if acks_due is not None:
            self._consume_later(acks_due)

    def _log_busy(self, exc: sqlite3.Error) -> None:
        """Once when the lock is met, then every ``_BUSY_LOG_EVERY_S``: not every 0.1 s retry."""
        now = time.monotonic()
        if self._busy_since is None:
            self._busy_since = self._busy_logged = now
            logger.warning(
                "SQLite broker %s is busy (%s); consumer retries every %.0f ms",
                self.path,
                exc,
                1000 * (_LOOP_BUSY_TIMEOUT_S + _LOOP_BUSY_RETRY_S),
            )
        elif now - self._busy_logged >= _BUSY_LOG_EVERY_S:
            self._busy_logged = now
            logger.warning(
                "SQLite broker %s still busy after %.0f s (%s): another process holds its "
                "write lock; consumer retries",
                self.path,
                now - self._busy_since,
                exc,
            )

    def _consume_later(self, delay: float) -> None:
        """One timer at a time: the earliest of the retries and ack flushes asked for."""
        delay = max(delay, 0.0)
        at = time.monotonic() + delay
        if self._loop_timer is not None:
            if self._loop_timer_at <= at:
                return
            self._loop_timer.cancel()
        self._loop_timer_at = at
        self._loop_timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._loop_timer = None
        self._consume_in_loop()

    def _leave_event_loop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        for timer in (self._loop_poll, self._loop_timer):
            if timer is not None:
                timer.cancel()
        self._loop_poll = self._loop_timer = None
        for fd in self._loop_fds:
            loop.remove_reader(fd)
        self._loop_fds = ()
        self._loop_thread = -1

    def maybe_reap(self) -> None:
        """Make expired leases (their worker died) deliverable; a read when there are none."""
        now = self.clock()
        if now < self._next_reap:
            return
        self._next_reap = now + min(self.polling_interval, self.options.lease_s / 3)
        db = self.consumer_db()
        if db.execute("SELECT 1 FROM messages WHERE lease_until < ? LIMIT 1", (now,)).fetchone():
            count = db.execute(
                "UPDATE messages SET lease_until = NULL, owner = NULL WHERE lease_until < ?",
                (now,),
            ).rowcount
            logger.warning("%d message lease(s) expired in %s; redelivering", count, self.path)
            self.waker().notify_all()
        if now >= self._next_maintenance:
            self._next_maintenance = now + _MAINTENANCE_S
            waker = self._wakers.current
            if waker is not None and waker.path is not None:
                waker.listen()  # rebinds if someone removed our socket file
                if self._loop is not None:
                    self._watch_wakeups()  # the loop watches the new socket instead
            free = int(db.execute("PRAGMA freelist_count").fetchone()[0])
            if free > _VACUUM_FREE_PAGES:
                # In slices of ~8 ms, one a second: vacuuming holds the write lock. Each step of
                # the statement frees one page, and sqlite3 steps a statement that returns no
                # rows only once: hence one execute per page.
                with _transaction(db):
                    for _ in range(_VACUUM_FREE_PAGES):
                        db.execute("PRAGMA incremental_vacuum(1)")
                self._next_maintenance = now + _VACUUM_SLICE_EVERY_S

    def close_connection(self, connection: Any) -> None:
        try:
            super().close_connection(connection)
        finally:
            with self._lock:
                keeper, self._keeper = self._keeper, None
            if keeper is not None:
                keeper.stopped.set()
            self._leave_event_loop()
            self._wakers.close()
            db = getattr(self._local, "db", None)
            if db is not None and self._local.pid == _current_pid():
                self._local.db = None
                db.close()
            loop_db, self._loop_db = self._loop_db, None
            if loop_db is not None:
                if self._consumer_pid == _current_pid():
                    loop_db.close()
                else:
                    _inherited.append(loop_db)
