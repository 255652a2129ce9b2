"""The SQLite broker under real `celery worker` processes: kill -9, long runs, locks, poison."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import wait_until
from tests.transport.conftest import HarnessFactory, broker_rows

pytestmark = [pytest.mark.slow, pytest.mark.faults]

POLL_CAP_S = 1.0  # the transport's default polling_interval: bound on noticing an expired lease
STARTUP_SLACK_S = 4.0  # a worker process is ready 0.7-2 s after spawn on this box


@pytest.mark.timeout(60)
def test_worker_killed_mid_run_is_redelivered_within_the_lease(
    harness: HarnessFactory, sqlite_url: str
) -> None:
    # Given a run in progress on a worker with a 3 s lease
    lease_s = 3.0
    cluster = harness(sqlite_url, lease_s=lease_s)
    worker = cluster.start_worker()
    cluster.send("victim", seconds=4.0)
    wait_until(lambda: cluster.runs("victim"), 15, "the run to start")

    # When the whole worker is SIGKILLed and started again
    killed_at = worker.kill9()
    cluster.start_worker()

    # Then the run is delivered again within one lease, flagged redelivered, and completes
    first, second = cluster.wait_finished("victim", timeout=30)
    assert first.finished is None
    assert not first.redelivered
    assert second.redelivered
    assert second.task_id == first.task_id
    assert second.started - killed_at <= lease_s + POLL_CAP_S + STARTUP_SLACK_S
    wait_until(lambda: broker_rows(sqlite_url) == [], 5, "the ack to delete the row")


@pytest.mark.timeout(60)
def test_run_three_times_longer_than_the_lease_runs_once(
    harness: HarnessFactory, sqlite_url: str
) -> None:
    # Given two idle-hungry workers and a 2 s lease
    cluster = harness(sqlite_url, lease_s=2.0)
    cluster.start_worker()
    cluster.start_worker()

    # When a run spins the CPU for 6 s (the consumer thread is busy, only the lease keeper runs)
    cluster.send("long", seconds=6.0, busy=True)
    [run] = cluster.wait_finished("long", timeout=30)

    # Then it ran exactly once: a lapsed lease would have started a copy ~3 s in, before the end
    assert cluster.runs("long") == [run]
    assert not run.redelivered


@pytest.mark.timeout(60)
def test_a_backlog_drains_at_once_on_a_prefork_worker_without_waiting_for_the_poll(
    harness: HarnessFactory, sqlite_url: str
) -> None:
    # Given a prefork worker (Celery's event loop) that polls only every 30 s
    cluster = harness(sqlite_url, polling_interval=30.0)
    cluster.start_worker(pool="prefork", concurrency=2)

    # When 1,000 runs are published as fast as one producer can
    for _ in range(1000):
        cluster.send("backlog")

    # Then wake-ups and acks alone keep the worker claiming: every run ends well before a poll
    cluster.wait_finished("backlog", timeout=25, count=1000)
    wait_until(lambda: broker_rows(sqlite_url) == [], 5, "every ack to delete its row")


@pytest.mark.timeout(60)
def test_countdown_message_survives_sigkill(harness: HarnessFactory, sqlite_url: str) -> None:
    # Given a countdown message the worker already holds in memory (acks late, unacked)
    cluster = harness(sqlite_url, lease_s=2.0)
    worker = cluster.start_worker()
    cluster.send("later", countdown=3)
    wait_until(lambda: [r for r in broker_rows(sqlite_url) if r[4]], 10, "the worker to claim it")

    # When the worker is SIGKILLed before it is due, and started again
    worker.kill9()
    assert cluster.runs("later") == []
    cluster.start_worker()

    # Then it still runs, once (one row: there is nothing a second run could come from)
    [run] = cluster.wait_finished("later", timeout=30)
    wait_until(lambda: broker_rows(sqlite_url) == [], 10, "the ack to delete the row")
    assert cluster.runs("later") == [run]


HOLD_LOCK = """
import sqlite3, sys, time, pathlib
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
pathlib.Path(sys.argv[2]).write_text("locked")
time.sleep(float(sys.argv[3]))
db.execute("COMMIT")
"""


@contextlib.contextmanager
def write_lock_held(
    sqlite_url: str, directory: Path, seconds: float
) -> Iterator[subprocess.Popen[bytes]]:
    """Another process holds the broker's write lock for ``seconds``, from when this yields."""
    marker = directory / "locked"
    path = sqlite_url.removeprefix("sqlite:///")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, path, marker, str(seconds)])
    try:
        wait_until(marker.exists, 10, "the lock to be held")
        yield holder
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.timeout(60)
def test_held_write_lock_loses_nothing_duplicates_nothing_and_keeps_the_consumer(
    harness: HarnessFactory, sqlite_url: str
) -> None:
    # Given a worker whose busy timeout (2 s) is shorter than a lock another process holds (5 s)
    cluster = harness(sqlite_url, busy_timeout_s=2.0)
    worker = cluster.start_worker(pool="prefork", concurrency=2)
    cluster.send("during", seconds=2.0)
    wait_until(lambda: cluster.runs("during"), 15, "the first run to start")

    # When the lock is taken while that run is going (so its ack, the lease keeper and the
    # idle consumer all hit it), and another run is published during the lock
    with write_lock_held(sqlite_url, cluster.directory, 5) as holder:
        producer = harness(sqlite_url, busy_timeout_s=30.0)  # a patient producer: it waits
        producer.send("after")
        assert holder.wait(timeout=15) == 0

    # Then both runs happen exactly once, and the consumer never reconnected
    [during] = cluster.wait_finished("during", timeout=20)
    [after] = cluster.wait_finished("after", timeout=20)
    wait_until(lambda: broker_rows(sqlite_url) == [], 10, "every ack to delete its row")
    assert not during.redelivered
    assert not after.redelivered
    log = worker.log()
    assert "database is locked" in log  # the lock was really met
    assert "Connection to broker lost" not in log
    assert "Restoring" not in log
    assert worker.alive


@pytest.mark.timeout(60)
def test_time_limits_fire_while_another_process_holds_the_write_lock(
    harness: HarnessFactory, sqlite_url: str
) -> None:
    # Given a prefork worker with the default patience (busy timeout 60 s) running a run with a
    # 2 s hard time limit and a short one, and a third message waiting for a free slot
    cluster = harness(sqlite_url)
    worker = cluster.start_worker(pool="prefork", concurrency=2)
    cluster.send("limited", seconds=30.0, time_limit=2)
    cluster.send("short", seconds=1.0)
    wait_until(lambda: cluster.runs("limited") and cluster.runs("short"), 15, "both to start")
    cluster.send("waiting")

    # When another process holds the write lock for 8 s, so the claim that follows the short
    # run's ack meets it
    with write_lock_held(sqlite_url, cluster.directory, 8) as holder:
        # Then the event loop is not stuck in that claim: the time limit kills the long run
        # while the lock is still held, and the claim is retried
        wait_until(lambda: "Hard time limit (2" in worker.log(), 6, "the hard time limit")
        assert holder.poll() is None, "the time limit fired only after the lock was released"
        assert "consumer retries" in worker.log()
        assert holder.wait(timeout=15) == 0

    # And the waiting run goes once the lock is gone, and nothing is left behind
    cluster.wait_finished("waiting", timeout=15)
    [limited] = cluster.runs("limited")
    assert limited.finished is None
    wait_until(lambda: broker_rows(sqlite_url) == [], 10, "every ack to delete its row")
    assert worker.alive


@pytest.mark.timeout(60)
def test_poison_message_goes_to_dead_letters_and_the_worker_goes_on(
    harness: HarnessFactory, sqlite_url: str
) -> None:
    # Given a task that kills its pool process every time, and max_deliveries=2
    cluster = harness(sqlite_url, max_deliveries=2)
    worker = cluster.start_worker(pool="prefork", concurrency=1)
    task_id = cluster.app.send_task("t.crash", args=["poison"]).id

    # When it has crashed twice
    [(queue, dead_id, reason)] = wait_until(cluster.dead, 40, "the dead-letter listener")

    # Then it is a dead letter, the listener heard of it in the worker, and work goes on
    assert (queue, dead_id) == ("celery", task_id)
    assert "delivered 2 times without an ack" in reason
    assert len(cluster.runs("poison")) == 2
    cluster.send("next")
    cluster.wait_finished("next", timeout=15)
    wait_until(lambda: broker_rows(sqlite_url) == [], 10, "the ack to delete the row")
    assert worker.alive


@pytest.mark.timeout(60)
def test_warm_shutdown_finishes_the_run_and_hands_over_held_messages_without_copies(
    harness: HarnessFactory, sqlite_url: str
) -> None:
    # Given a worker running a run and holding a countdown message due in 60 s, and a second worker
    cluster = harness(sqlite_url)
    stopping = cluster.start_worker(pool="prefork", concurrency=2)
    cluster.send("running", seconds=2.0)
    cluster.send("far", countdown=60)
    wait_until(lambda: cluster.runs("running"), 15, "the run to start")
    wait_until(lambda: all(r[4] for r in broker_rows(sqlite_url)), 10, "both to be claimed")
    far_id = max(r[0] for r in broker_rows(sqlite_url))
    other = cluster.start_worker()

    # When the first worker is stopped gracefully (SIGTERM: a deploy)
    stopping.process.send_signal(signal.SIGTERM)
    assert stopping.process.wait(timeout=30) == 0

    # Then the run finished there, once; the held message moved over as the same row, uncounted
    [run] = cluster.wait_finished("running", timeout=5)
    assert run.pid != other.process.pid
    [(row_id, _, deliveries, _, _)] = wait_until(
        lambda: [r for r in broker_rows(sqlite_url) if r[4] and f":{other.process.pid}:" in r[4]],
        10,
        "the other worker to claim the countdown message",
    )
    assert (row_id, deliveries) == (far_id, 1)
    assert len(broker_rows(sqlite_url)) == 1
