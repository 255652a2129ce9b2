"""Celery's own tools on offload's workers, as a Celery user already runs them: `celery -A`
in the form the README prints, and real Flower showing the runs and how each ended."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from offload import Offload, RunState
from offload.errors import ConfigurationError
from offload.testing import wait_for_state_sync
from tests.apps import celery_tools
from tests.support import ROOT, WorkerProcess, free_port, kill_and_reap, redis_prefix, wait_until

pytestmark = pytest.mark.timeout(120)

APP = "tests.apps.celery_tools:celery_app"


def celery_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", APP, *args]


def clean_env(settings: dict[str, str]) -> dict[str, str]:
    kept = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
    return {**kept, **settings, "PYTHONPATH": str(ROOT)}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Offload, dict[str, str]]]:
    """A Redis broker slice and a SQLite ledger, with task events on; the test's Offload."""
    with redis_prefix() as (url, options):
        settings = {
            "OFFLOAD_BROKER_URL": url,
            "OFFLOAD_BROKER_OPTIONS": json.dumps(options),
            "OFFLOAD_LEDGER_URL": f"sqlite:///{tmp_path / 'ledger.sqlite'}",
            "OFFLOAD_DATA_DIR": str(tmp_path),
            "OFFLOAD_TASK_EVENTS": "true",
            "OFFLOAD_WORKER_PROCESSES": "1",
            "OFFLOAD_PROGRESS_INTERVAL_S": "0",
        }
        jobs = celery_tools.build(
            broker_url=url,
            broker_options=options,
            ledger_url=settings["OFFLOAD_LEDGER_URL"],
            data_dir=tmp_path,
        )
        try:
            yield jobs, clean_env(settings)
        finally:
            jobs.close()


class Flower:
    """`celery -A APP flower` on a free loopback port; killed with its children by pid."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            celery_command("flower", "--address=127.0.0.1", f"--port={self.port}"),
            env={**env, "FLOWER_UNAUTHENTICATED_API": "true"},
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=5)

    def ready(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"flower exited {self.process.returncode}:\n{self.log_path.read_text()}")
        try:
            return self.client.get("/healthcheck").text == "OK"
        except httpx.TransportError:
            return False

    def tasks(self) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = self.client.get("/api/tasks").json()
        return found

    def stop(self) -> None:
        self.client.close()
        alive = self.process.poll() is None
        children = psutil.Process(self.process.pid).children(True) if alive else []
        kill_and_reap(self.process, children)
        self._log.close()


def test_flower_shows_offloads_runs_and_how_each_ended(
    world: tuple[Offload, dict[str, str]], tmp_path: Path
) -> None:
    jobs, env = world
    worker = WorkerProcess("tests.apps.celery_tools:jobs", env, tmp_path / "worker.log").start()
    flower = Flower(env, tmp_path / "flower.log")
    try:
        worker.wait_ready()
        # The -A form the README prints reaches offload's workers through Celery's control.
        ping = subprocess.run(
            celery_command("inspect", "ping", "--timeout=5"),
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ping.returncode == 0, ping.stdout + ping.stderr
        assert "pong" in ping.stdout
        wait_until(flower.ready, 30, "flower to answer")
        # Flower listens from its start: a run it sees proves it is listening.
        first = jobs.tasks["add"].defer_sync(a=1, b=1)
        wait_until(lambda: first.id in flower.tasks(), 30, "flower to see a first run")

        added = jobs.tasks["add"].defer_sync(a=2, b=3)
        failing = jobs.tasks["always_fails"].defer_sync(reason="no such customer")
        stopped = jobs.tasks["until_cancelled"].defer_sync()
        assert added.result_sync(timeout=30) == 5
        wait_for_state_sync(stopped, RunState.PROGRESS, timeout=30)
        stopped.cancel_sync()
        wait_for_state_sync(stopped, RunState.CANCELLED, timeout=30)
        wait_for_state_sync(failing, RunState.FAILURE, timeout=30)

        def states() -> dict[str, str]:
            seen = flower.tasks()
            return {run: seen.get(run, {}).get("state", "") for run in seen}

        expected = {added.id: "SUCCESS", failing.id: "FAILURE", stopped.id: "REVOKED"}
        wait_until(
            lambda: all(states().get(run) == state for run, state in expected.items()),
            30,
            f"flower to show {expected}",
        )
        seen = flower.tasks()
        assert seen[added.id]["name"] == "add"
        assert seen[added.id]["result"] == "5"
        assert "no such customer" in seen[failing.id]["exception"]
    finally:
        flower.stop()
        worker.stop()


def test_task_events_need_a_broker_that_broadcasts(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="Redis or RabbitMQ"):
        Offload(data_dir=tmp_path, task_events=True)


def test_a_plain_celery_worker_runs_offloads_runs(
    world: tuple[Offload, dict[str, str]], tmp_path: Path
) -> None:
    jobs, env = world
    log_path = tmp_path / "celery-worker.log"
    with open(log_path, "ab") as log:
        worker = subprocess.Popen(
            celery_command("worker", "--pool=threads", "--concurrency=2"),
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            failing = jobs.tasks["always_fails"].defer_sync(reason="declined")
            assert jobs.tasks["add"].defer_sync(a=20, b=22).result_sync(timeout=60) == 42
            # Retried and dead through the ledger, as under `offload worker`.
            status = wait_for_state_sync(failing, RunState.FAILURE, timeout=30)
            assert (status.attempts, status.error) == (2, "ValueError: declined")
        finally:
            children = psutil.Process(worker.pid).children(True)
            kill_and_reap(worker, children)
