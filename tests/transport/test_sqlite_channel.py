"""The SQLite transport at the kombu level: rows, leases, dead letters, wake-ups, fork safety."""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection, Consumer, Producer, Queue
from kombu.exceptions import ContentDisallowed
from kombu.message import Message
from kombu.transport import TRANSPORT_ALIASES

import offload.transport
from offload.transport import sqlite as sqlite_transport
from offload.transport.sqlite import BrokerSchemaError, Transport, database_path
from tests.support import wait_until
from tests.transport.conftest import broker_rows

pytestmark = pytest.mark.timeout(30)

offload.transport.register()


@pytest.fixture
def connect(sqlite_url: str) -> Iterator[Any]:
    """`connect(**transport_options)` -> an open kombu Connection, closed after the test."""
    opened: list[Connection] = []

    def make(**options: Any) -> Connection:
        connection = Connection(sqlite_url, transport_options=options)
        connection.connect()
        opened.append(connection)
        return connection

    yield make
    for connection in opened:
        connection.close()


@pytest.fixture
def dead_letters() -> Iterator[list[tuple[str, dict[str, Any], str]]]:
    calls: list[tuple[str, dict[str, Any], str]] = []

    def listener(queue: str, payload: dict[str, Any], reason: str) -> None:
        calls.append((queue, payload, reason))

    sqlite_transport.add_dead_letter_listener(listener)
    yield calls
    sqlite_transport.remove_dead_letter_listener(listener)


def publish(connection: Connection, body: Any, queue: str = "q", **options: Any) -> None:
    producer = Producer(connection.default_channel, serializer="json")
    producer.publish(body, routing_key=queue, declare=[Queue(queue)], **options)


def get(connection: Connection, queue: str = "q") -> Message | None:
    channel: Any = connection.default_channel
    message: Message | None = channel.basic_get(queue)
    return message


def sql(url: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=30, isolation_level=None)
    try:
        return db.execute(statement, params).fetchall()
    finally:
        db.close()


def test_message_stays_until_acked(connect: Any, sqlite_url: str) -> None:
    connection = connect()
    publish(connection, {"n": 1})

    message = get(connection)

    assert message is not None
    assert message.payload == {"n": 1}
    assert not message.delivery_info.get("redelivered")
    [(_, queue, deliveries, lease_until, owner)] = broker_rows(sqlite_url)
    assert (queue, deliveries) == ("q", 1)
    assert lease_until > time.time()
    assert owner
    message.ack()
    assert broker_rows(sqlite_url) == []


def test_claims_race_two_connections_each_message_once(connect: Any, sqlite_url: str) -> None:
    # Given 300 messages and four consumers, each with its own connection and thread
    producer = connect()
    for n in range(300):
        publish(producer, {"n": n})
    seen: list[int] = []

    def consume() -> None:
        with Connection(sqlite_url) as connection:
            while (message := get(connection)) is not None:
                seen.append(message.payload["n"])
                message.ack()

    # When they all claim at once
    threads = [threading.Thread(target=consume) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Then every message was delivered exactly once
    assert sorted(seen) == list(range(300))
    assert broker_rows(sqlite_url) == []


def test_leased_message_is_invisible_to_other_connections(connect: Any) -> None:
    first, second = connect(lease_s=0.3), connect(lease_s=0.3)
    publish(first, {"n": 1})
    message = get(first)
    assert message is not None

    time.sleep(1.0)  # three lease periods: only the holder's lease keeper keeps it hidden

    assert get(second) is None
    message.ack()


def test_killed_holder_lease_expires_and_message_is_redelivered(
    connect: Any, sqlite_url: str
) -> None:
    # Given a consumer process that claims the message and dies without a word
    publish(connect(), {"n": 1})
    script = (
        "import os, offload.transport; offload.transport.register()\n"
        "from kombu import Connection\n"
        f"c = Connection({sqlite_url!r}, transport_options={{'lease_s': 0.5}})\n"
        "m = c.default_channel.basic_get('q')\n"
        "print(m.delivery_tag, flush=True)\n"
        "os._exit(0)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, check=True)
    tag = killed.stdout.decode().strip()
    consumer = connect(lease_s=0.5)
    assert get(consumer) is None  # still leased

    # When its lease runs out
    message = wait_until(lambda: get(consumer), 5, "the lease to expire")

    # Then the same row is delivered again, flagged redelivered
    assert message is not None
    assert message.delivery_tag == tag
    info: dict[str, Any] = dict(message.delivery_info)
    assert info["redelivered"] is True
    headers: dict[str, Any] = dict(message.headers)
    assert headers["redelivered"] is True
    message.ack()


def test_acks_from_pool_threads_ride_with_the_next_claim_and_none_comes_back(
    connect: Any, sqlite_url: str
) -> None:
    # Given 30 messages, and a consumer loop whose callbacks hand each one to a thread that acks
    # it, the way a threads pool acks a finished run
    connection = connect()
    for n in range(30):
        publish(connection, {"n": n})
    got: list[int] = []
    ackers: list[threading.Thread] = []

    def on_message(body: Any, message: Message) -> None:
        got.append(body["n"])
        ackers.append(threading.Thread(target=message.ack))
        ackers[-1].start()

    consumer = Consumer(connection, [Queue("q")], callbacks=[on_message], accept=["json"])
    consumer.qos(prefetch_count=4)
    consumer.consume()

    # When the loop has consumed them all and finds nothing more to claim
    while len(got) < 30:
        connection.drain_events(timeout=5)
    for acker in ackers:
        acker.join(5)
    with pytest.raises(TimeoutError):
        connection.drain_events(timeout=0.3)

    # Then each message came once, and every acked row is gone once the loop found nothing
    # to claim for ACK_DELAY_MAX_S (0.05 s)
    assert sorted(got) == list(range(30))
    assert sql(sqlite_url, "SELECT count(*) FROM messages") == [(0,)]


def test_acks_a_stopped_consumer_loop_left_are_recorded_and_never_redelivered(
    connect: Any, sqlite_url: str
) -> None:
    # Given a consumer loop that delivered one message and stopped, and a thread that acks it
    # afterwards (nobody claims again to take the ack along)
    connection = connect(lease_s=1.5)
    publish(connection, {"n": 1})
    received: list[Message] = []
    consumer = Consumer(
        connection, [Queue("q")], callbacks=[lambda _, m: received.append(m)], accept=["json"]
    )
    consumer.consume()
    connection.drain_events(timeout=5)
    acker = threading.Thread(target=received[0].ack)
    acker.start()
    acker.join(5)

    # When another consumer looks for work for two lease periods
    other = connect(lease_s=1.5)
    deadline = time.monotonic() + 3.0
    stolen = []
    while time.monotonic() < deadline:
        message = get(other)
        if message is not None:
            stolen.append(message)
        time.sleep(0.1)

    # Then it never got the acked message, and the row was deleted by the lease keeper
    assert stolen == []
    assert sql(sqlite_url, "SELECT count(*) FROM messages") == [(0,)]


def test_reject_with_requeue_releases_the_row_without_a_copy(connect: Any, sqlite_url: str) -> None:
    connection = connect()
    publish(connection, {"n": 1})
    message = get(connection)
    assert message is not None

    message.reject(requeue=True)

    [(row_id, _, deliveries, lease_until, owner)] = broker_rows(sqlite_url)
    assert (deliveries, lease_until, owner) == (1, None, None)
    again = get(connection)
    assert again is not None
    assert again.delivery_tag == str(row_id)
    assert again.delivery_info["redelivered"] is True
    again.ack()


def test_reject_without_requeue_moves_to_dead_letters(
    connect: Any, sqlite_url: str, dead_letters: list[Any]
) -> None:
    connection = connect()
    publish(connection, {"n": 1})
    message = get(connection)
    assert message is not None

    message.reject(requeue=False)

    assert broker_rows(sqlite_url) == []
    [(queue, reason)] = sql(sqlite_url, "SELECT queue, reason FROM dead_letters")
    assert queue == "q"
    assert "without requeue" in reason
    assert [(q, p["properties"]["priority"]) for q, p, _ in dead_letters] == [("q", 0)]


def test_close_restores_unacked_in_place_without_duplicates(connect: Any, sqlite_url: str) -> None:
    # Given a consumer that prefetched two messages and acked neither
    connection = connect()
    publish(connection, {"n": 1})
    publish(connection, {"n": 2})
    received: list[Message] = []
    consumer = Consumer(connection, [Queue("q")], accept=["json"], prefetch_count=2)
    consumer.register_callback(lambda body, message: received.append(message))
    consumer.consume()
    while len(received) < 2:
        connection.drain_events(timeout=5)

    # When it shuts down gracefully (or reconnects)
    connection.close()

    # Then both rows are released in place, not copied, and not counted as deliveries
    rows = broker_rows(sqlite_url)
    assert [(deliveries, lease, owner) for _, _, deliveries, lease, owner in rows] == [
        (0, None, None),
        (0, None, None),
    ]
    with Connection(sqlite_url) as again:
        message = get(again)
        assert message is not None
        assert message.payload == {"n": 1}
        assert not message.delivery_info.get("redelivered")
        message.ack()


def test_priority_higher_first_then_fifo(connect: Any) -> None:
    connection = connect()
    for n, priority in enumerate([0, 5, 9, 5, 0]):
        publish(connection, {"n": n}, priority=priority)

    order = []
    while (message := get(connection)) is not None:
        order.append(message.payload["n"])
        message.ack()

    assert order == [2, 1, 3, 0, 4]


def test_poison_message_moves_to_dead_letters(
    connect: Any, sqlite_url: str, dead_letters: list[Any]
) -> None:
    # Given a message whose consumer "crashes" (requeues) every time
    connection = connect(max_deliveries=2)
    publish(connection, {"n": 1})
    publish(connection, {"n": 2})
    for _ in range(2):
        message = get(connection)
        assert message is not None
        assert message.payload == {"n": 1}
        message.reject(requeue=True)

    # When it would be delivered a third time
    message = get(connection)

    # Then it is dead-lettered with the reason, and the next message is delivered instead
    assert message is not None
    assert message.payload == {"n": 2}
    message.ack()
    [(reason, deliveries)] = sql(sqlite_url, "SELECT reason, deliveries FROM dead_letters")
    assert reason.startswith("delivered 2 times without an ack (max_deliveries=2)")
    assert deliveries == 3
    [(queue, payload, listener_reason)] = dead_letters
    assert (queue, json.loads(payload["body"]), listener_reason) == ("q", {"n": 1}, reason)


def test_garbage_rows_move_to_dead_letters_and_consumer_goes_on(
    connect: Any, sqlite_url: str, dead_letters: list[Any]
) -> None:
    # Given a row that is not JSON and a row carrying pickle, ahead of a good message
    connection = connect()
    pickled = json.dumps({"body": "gASVAAAA", "content-type": "application/x-python-serialize",
                          "properties": {}})  # fmt: skip
    insert = "INSERT INTO messages (queue, payload, created) VALUES ('q', ?, 0)"
    sql(sqlite_url, insert, ("not json \x00\xff",))
    sql(sqlite_url, insert, (pickled,))
    publish(connection, {"n": 1})

    # When the consumer polls
    message = get(connection)

    # Then it gets the good message; the others are dead letters with readable reasons
    assert message is not None
    assert message.payload == {"n": 1}
    message.ack()
    reasons = [r for (r,) in sql(sqlite_url, "SELECT reason FROM dead_letters ORDER BY id")]
    assert reasons[0].startswith("payload is not JSON")
    assert reasons[1].startswith("content type 'application/x-python-serialize' is not accepted")
    assert dead_letters[0][1] == {"raw": "not json \x00\xff"}


def test_dead_letters_are_trimmed(connect: Any, sqlite_url: str) -> None:
    connection = connect(dead_letters_max=3)
    for n in range(6):
        publish(connection, {"n": n})
    while (message := get(connection)) is not None:
        message.reject(requeue=False)

    bodies = [json.loads(p)["body"] for (p,) in sql(sqlite_url, "SELECT payload FROM dead_letters")]
    assert [json.loads(b)["n"] for b in bodies] == [3, 4, 5]


def test_a_drained_backlog_gives_its_space_back_to_the_filesystem(
    connect: Any, sqlite_url: str
) -> None:
    # Given a backlog of 2,000 messages of 8 KB, all consumed and acked
    connection = connect()
    for n in range(2000):
        publish(connection, {"n": n, "blob": "x" * 8000})
    while (message := get(connection)) is not None:
        message.ack()
    path = database_path(sqlite_url)
    [(full_pages,)] = sql(sqlite_url, "PRAGMA page_count")

    # When the consumer's maintenance runs for a minute (its clock moved on), polling as it does
    transport = connection.transport
    assert isinstance(transport, Transport)
    started = now = time.time()
    transport.clock = lambda: now
    for second in range(60, 121):
        now = started + second
        assert get(connection) is None

    # Then the file shrank to under 4 MB of free pages (1,024), and the broker still works
    sql(sqlite_url, "PRAGMA wal_checkpoint(TRUNCATE)")
    [(pages,)] = sql(sqlite_url, "PRAGMA page_count")
    assert full_pages > 4000
    assert pages < 1100, (full_pages, pages)
    assert os.path.getsize(path) < 1100 * 4096
    publish(connection, {"n": "after"})
    message = get(connection)
    assert message is not None
    assert message.payload == {"n": "after"}


def test_a_publish_batch_is_one_transaction_all_or_nothing(connect: Any, sqlite_url: str) -> None:
    connection = connect()
    producer: Any = Producer(connection.default_channel, serializer="json")  # batch(): unstubbed
    statements: list[str] = []
    connection.transport.db().set_trace_callback(statements.append)

    # A batch that fails half-way leaves nothing in the broker
    def fails_half_way() -> None:
        with producer.batch(max_size=500):
            for n in range(10):
                producer.publish({"n": n}, routing_key="q", declare=[Queue("q")])
            raise RuntimeError("half-way")

    with pytest.raises(RuntimeError, match="half-way"):
        fails_half_way()
    assert broker_rows(sqlite_url) == []
    # A batch that ends well is there whole, in order, written by one commit
    with producer.batch(max_size=500):
        for n in range(200):
            producer.publish({"n": n}, routing_key="q", priority=9 if n == 150 else 0)
        assert broker_rows(sqlite_url) == []  # nothing before the batch ends
        statements.clear()
    connection.transport.db().set_trace_callback(None)
    transactions = [s for s in statements if s in ("BEGIN IMMEDIATE", "COMMIT")]
    assert transactions == ["BEGIN IMMEDIATE", "COMMIT"]  # one commit for the 200
    assert (statements[0], statements[-1]) == ("BEGIN IMMEDIATE", "COMMIT")
    order = []
    while (message := get(connection)) is not None:
        order.append(message.payload["n"])
        message.ack()
    assert order == [150, *range(150), *range(151, 200)]


def test_pickle_is_refused_at_publish(connect: Any, sqlite_url: str) -> None:
    connection = connect()
    producer = Producer(connection.default_channel, serializer="pickle")

    with pytest.raises(ContentDisallowed, match="JSON messages only"):
        producer.publish({"n": 1}, routing_key="q", declare=[Queue("q")])
    assert broker_rows(sqlite_url) == []


def test_newer_schema_version_is_refused(connect: Any, sqlite_url: str) -> None:
    connect().close()
    sql(sqlite_url, "UPDATE meta SET value = '99' WHERE key = 'schema_version'")

    with pytest.raises(BrokerSchemaError, match="schema version 99, this offload reads version 1"):
        connect()


def test_foreign_sqlite_file_is_refused(sqlite_url: str, connect: Any) -> None:
    sql(sqlite_url, "CREATE TABLE kombu_message (id INTEGER PRIMARY KEY)")

    with pytest.raises(BrokerSchemaError, match="no offload broker schema"):
        connect()


def _child_uses_inherited_connection(connection: Connection, parent_db: int, results: Any) -> None:
    transport = connection.transport
    assert isinstance(transport, Transport)
    publish(connection, {"from": "child"})
    message = get(connection)
    assert message is not None
    message.ack()
    results.put((id(transport.db()) != parent_db, message.payload, os.getpid()))


def test_forked_child_opens_its_own_connection(connect: Any, sqlite_url: str) -> None:
    # Given a parent connection in use, with a consumer's wake-up socket bound
    connection = connect()
    transport = connection.transport
    assert isinstance(transport, Transport)
    Consumer(connection, [Queue("q")], accept=["json"]).consume()
    parent_db = id(transport.db())
    wake_socket = transport.waker().path
    assert wake_socket is not None
    assert os.path.exists(wake_socket)

    # When a forked child uses the inherited kombu connection, then exits
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(
        target=_child_uses_inherited_connection, args=(connection, parent_db, results)
    )
    child.start()
    own_connection, payload, child_pid = results.get(timeout=10)
    child.join(10)

    # Then it used a handle of its own, and the parent's handle and socket still work
    assert child.exitcode == 0
    assert (own_connection, payload, child_pid != os.getpid()) == (True, {"from": "child"}, True)
    assert id(transport.db()) == parent_db
    assert os.path.exists(wake_socket)
    publish(connection, {"from": "parent"})
    assert transport.db().execute("SELECT count(*) FROM messages").fetchone() == (1,)


def test_consumer_wakes_when_another_process_publishes(connect: Any, sqlite_url: str) -> None:
    # Given a consumer that would otherwise poll only every 5 s
    connection = connect(polling_interval=5.0)
    received: list[float] = []
    consumer = Consumer(connection, [Queue("q")], accept=["json"])

    def on_message(body: Any, message: Message) -> None:
        received.append(time.time())
        message.ack()

    consumer.register_callback(on_message)
    consumer.consume()
    script = (
        "import time, offload.transport; offload.transport.register()\n"
        "from kombu import Connection, Producer, Queue\n"
        f"with Connection({sqlite_url!r}) as c:\n"
        "    p = Producer(c.default_channel, serializer='json')\n"
        "    time.sleep(0.5)\n"
        "    for n in range(3):\n"
        "        print(time.time(), flush=True)\n"
        "        p.publish({'n': n}, routing_key='q', declare=[Queue('q')])\n"
    )
    producer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)

    # When the other process publishes three messages (one prefetch slot: acks must wake us too)
    try:
        while len(received) < 3:
            connection.drain_events(timeout=10)
    finally:
        out, _ = producer.communicate(timeout=10)
    published = [float(line) for line in out.split()]

    # Then each is received in milliseconds, not at the next poll
    latencies = [r - p for r, p in zip(received, published, strict=True)]
    assert max(latencies) < 0.5, latencies


def test_url_forms_and_register() -> None:
    offload.transport.register()
    offload.transport.register()
    assert TRANSPORT_ALIASES["sqlite"] == "offload.transport.sqlite:Transport"
    assert database_path("sqlite:///data/b.sqlite") == os.path.abspath("data/b.sqlite")
    assert database_path("sqlite:////var/b.sqlite") == "/var/b.sqlite"
    for bad in ("sqlite://", "sqlite:///", "sqlite://host/b.sqlite", "sqlite:///b?x=1", "redis://"):
        with pytest.raises(ValueError, match="broker URL"):
            database_path(bad)


def test_sqlite_errors_are_channel_errors_not_connection_errors() -> None:
    # A held write lock must never look like a lost connection: Celery would reconnect, restore
    # and run the work again.
    assert issubclass(sqlite3.OperationalError, Transport.channel_errors)
    assert not issubclass(sqlite3.OperationalError, Transport.connection_errors)


def test_bad_transport_options_are_refused(sqlite_url: str) -> None:
    with pytest.raises(ValueError, match="lease_s=0; expected seconds > 0"):
        Connection(sqlite_url, transport_options={"lease_s": 0}).transport  # noqa: B018
