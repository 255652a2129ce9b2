"""Crashes, caused for real: SIGKILL of every worker process, hard timeouts that end one."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from offload import RunFailedError, RunState
from offload.testing import wait_for_state_sync
from tests.contract.conftest import Durable, durable_world
from tests.support import wait_until

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def test_sigkilled_worker_run_completes_after_redelivery_as_attempt_2(isolated: Durable) -> None:
    # Given a run in the middle of its first attempt
    started = isolated.data_dir / "started"
    release = isolated.data_dir / "release"
    isolated.worker.start().wait_ready()
    run = isolated.task("long_job").defer_sync(started=str(started), release=str(release))
    wait_for_state_sync(run, RunState.STARTED, timeout=30)
    wait_until(started.exists, 10, "the task body to start")
    # When every worker process is killed with SIGKILL, and a new worker starts
    isolated.worker.kill9()
    release.touch()
    replacement = isolated.new_worker("replacement").start()
    try:
        # Then the run completes on its second attempt, and the first is recorded as lost
        assert run.result_sync(timeout=60) == 2
        attempts = isolated.jobs.ledger.attempts(run.id)
        assert [a.outcome for a in attempts] == ["lost", "success"]
        assert (attempts[0].error or "").startswith("WorkerLost:")
        assert started.read_text().split() == ["1", "2"]
    finally:
        replacement.stop()


def test_delayed_run_held_by_a_killed_worker_still_runs_on_time(per_broker: Durable) -> None:
    # Celery holds a countdown message in the worker's memory, unacknowledged, until it is due.
    per_broker.worker.start().wait_ready()
    run = per_broker.task("add").options(delay=4).defer_sync(20, 22)
    time.sleep(1.0)  # let the worker take the message and hold it
    per_broker.worker.kill9()
    replacement = per_broker.new_worker("replacement").start()
    try:
        assert run.result_sync(timeout=60) == 42
        status = run.status_sync()
        assert status.started_at is not None
        assert (status.started_at - status.created_at).total_seconds() >= 3.9
    finally:
        replacement.stop()


def test_hard_timeout_ends_the_process_and_fails_the_attempt(per_broker: Durable) -> None:
    per_broker.worker.start().wait_ready()
    marker = per_broker.data_dir / "stubborn.pid"
    run = per_broker.task("stubborn").defer_sync(marker=str(marker))
    with pytest.raises(RunFailedError) as failed:
        run.result_sync(timeout=30)
    assert failed.value.error == (
        "TaskTimeoutError: hard timeout of 1.5s expired; the worker process was ended"
    )
    assert per_broker.jobs.ledger.attempts(run.id)[0].outcome == "timeout"
    # The process that ran it is gone, and the supervisor started a replacement that works.
    victim = int(marker.read_text())
    wait_until(lambda: victim not in per_broker.worker.consumer_pids(), 10, "the victim to exit")
    assert per_broker.task("add").defer_sync(1, 2).result_sync(timeout=30) == 3
    assert not os.path.exists(f"/proc/{victim}/status") or victim not in (
        per_broker.worker.consumer_pids()
    )


def test_a_second_worker_does_not_steal_a_live_run(isolated: Durable, tmp_path: Path) -> None:
    # A run longer than the redelivery window, while its worker lives, runs exactly once.
    started = tmp_path / "started"
    release = tmp_path / "release"
    isolated.worker.start().wait_ready()
    second = isolated.new_worker("second").start()
    try:
        second.wait_ready()
        run = isolated.task("long_job").defer_sync(started=str(started), release=str(release))
        wait_until(started.exists, 30, "the task body to start")
        # Hold it for three redelivery windows (visibility / lease = 2 s): it never restarts.
        end = time.monotonic() + 6
        while time.monotonic() < end:
            assert started.read_text().split() == ["1"]
            time.sleep(0.2)
        release.touch()
        assert run.result_sync(timeout=30) == 1
        assert started.read_text().split() == ["1"]
        assert [a.outcome for a in isolated.jobs.ledger.attempts(run.id)] == ["success"]
    finally:
        second.stop()


def test_task_that_swallows_the_forced_cancel_loses_its_process(per_broker: Durable) -> None:
    per_broker.worker.start().wait_ready()
    marker = per_broker.data_dir / "refuses.pid"
    run = per_broker.task("refuses_cancel").defer_sync(marker=str(marker))
    victim = int(wait_until(lambda: marker.exists() and marker.read_text(), 20, "the task"))
    run.cancel_sync()
    with pytest.raises(RunFailedError, match="CANCELLED"):
        run.result_sync(timeout=30)
    wait_until(lambda: victim not in per_broker.worker.consumer_pids(), 10, "the process to end")
    assert per_broker.task("add").defer_sync(2, 2).result_sync(timeout=30) == 4


def test_run_that_keeps_killing_its_worker_ends_dead(isolated: Durable) -> None:
    # Given a task that kills its own process, like a segfault
    isolated.worker.start().wait_ready()
    marker = isolated.data_dir / "crashes.log"
    run = isolated.task("crashes_its_process").defer_sync(marker=str(marker))
    # Then after three lost attempts the run is dead, not retried forever
    with pytest.raises(RunFailedError) as failed:
        run.result_sync(timeout=90)
    assert (failed.value.error or "").startswith("WorkerLost: the worker died during 3 attempts")
    assert [a.outcome for a in isolated.jobs.ledger.attempts(run.id)] == ["lost"] * 3
    assert len(marker.read_text().split()) == 3
    assert isolated.task("add").defer_sync(3, 3).result_sync(timeout=30) == 6


def test_run_whose_message_the_broker_lost_is_published_again(per_broker: Durable) -> None:
    # Given runs whose messages vanish from the broker (a Redis restart without persistence,
    # a message popped by a consumer that died before recording it)
    runs = [per_broker.task("add").defer_sync(i, i) for i in range(5)]
    with per_broker.jobs.celery.connection_for_write() as connection:
        purged = connection.default_channel.queue_purge("default")  # type: ignore[attr-defined]
    assert purged == 5
    # When a worker runs, the ledger's orphan sweep publishes them again (orphan_after_s = 4)
    per_broker.worker.start().wait_ready()
    assert [run.result_sync(timeout=60) for run in runs] == [0, 2, 4, 6, 8]
    assert "waited 4s without a delivery; publishing it again" in per_broker.worker.log()


def _close_connections(vhost: str) -> int:
    listing = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "vhost"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split("\n")
    pids = [line.split("\t")[0] for line in listing if line.endswith(f"\t{vhost}")]
    for pid in pids:
        subprocess.run(
            ["rabbitmqctl", "-q", "close_connection", pid, "offload test: like consumer_timeout"],
            check=True,
            capture_output=True,
            timeout=60,
        )
    return len(pids)


@pytest.mark.rabbitmq
def test_rabbitmq_dropping_the_consumer_mid_run_does_not_run_it_twice(tmp_path: Path) -> None:
    # RabbitMQ's consumer_timeout closes the channel of a consumer that holds a delivery too
    # long, and requeues it while the task still runs. Closing the connection does the same.
    with durable_world("rabbitmq", "sqlite", tmp_path) as world:
        started, release = tmp_path / "started", tmp_path / "release"
        world.worker.start().wait_ready()
        run = world.task("long_job").defer_sync(started=str(started), release=str(release))
        wait_until(started.exists, 30, "the task body to start")
        vhost = world.env["OFFLOAD_BROKER_URL"].rsplit("/", 1)[1]
        assert _close_connections(vhost) >= 1
        end = time.monotonic() + 8  # the requeued message comes back at once, and again
        while time.monotonic() < end:
            assert started.read_text().split() == ["1"]
            time.sleep(0.2)
        release.touch()
        assert run.result_sync(timeout=30) == 1
        assert [a.outcome for a in world.jobs.ledger.attempts(run.id)] == ["success"]
        assert started.read_text().split() == ["1"]
