"""SIGTERM to `offload serve` (API + embedded worker) with inline and durable work in flight."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from offload import Offload, RunState
from offload.testing import wait_for_state_sync
from tests.integration.web_client import defer, wait_status
from tests.support import ROOT, WorkerProcess, free_port, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(180)]


def test_sigterm_to_serve_loses_no_run(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OFFLOAD_DATA_DIR": str(data),
        "OFFLOAD_INLINE_MAX_CONCURRENCY": "2",
        "OFFLOAD_INLINE_DRAIN_S": "1.5",
        "OFFLOAD_HEARTBEAT_INTERVAL_S": "0.5",
    }
    for name in ("OFFLOAD_BROKER_URL", "OFFLOAD_LEDGER_URL"):
        env.pop(name, None)
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "offload",
            "serve",
            "tests.apps.inline_app:app",
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    children: list[psutil.Process] = []
    marker, release = tmp_path / "done.txt", tmp_path / "release"
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

            def up() -> bool:
                try:
                    return client.get("/healthz").status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(up, 60, "offload serve to answer")
            # Given a durable run in the middle of its work on the embedded worker
            durable = defer(client, "durable_stepper", release=str(release))
            wait_status(client, durable, "PROGRESS")
            # and inline runs: two running, three waiting that may spill
            running = [
                defer(client, "slow_local", seconds=0.5, marker=str(marker), tag=f"run{i}")
                for i in range(2)
            ]
            waiting = [
                defer(client, "slow_spillable", seconds=0, marker=str(marker), tag=f"wait{i}")
                for i in range(3)
            ]
            wait_status(client, running[0], "STARTED")
        children = psutil.Process(serve.pid).children(recursive=True)
        # When offload serve gets SIGTERM (and the durable run may then finish its step)
        serve.send_signal(signal.SIGTERM)
        release.touch()
        serve.wait(timeout=90)
    finally:
        if serve.poll() is None:
            serve.kill()
        log.close()
    # Then every process it started is gone
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.pid for p in alive]
    # the running inline runs finished; the waiting ones went to the durable lane
    text = (tmp_path / "serve.log").read_text()
    assert "3 waiting run(s) of slow_spillable handed to the durable lane at shutdown" in text
    assert sorted(marker.read_text().split())[:2] == ["run0", "run1"]
    # and a worker started afterwards completes everything else: nothing was lost
    jobs = Offload(data_dir=data)
    worker = WorkerProcess(
        "tests.apps.inline_app:jobs", {"OFFLOAD_DATA_DIR": str(data)}, tmp_path / "after.log"
    ).start()
    try:
        assert jobs.run(durable).result_sync(timeout=60) == "finished"
        for run_id in waiting:
            assert wait_for_state_sync(jobs.run(run_id), RunState.SUCCESS, timeout=60)
        assert sorted(marker.read_text().split()) == ["run0", "run1", "wait0", "wait1", "wait2"]
    finally:
        worker.stop()
        jobs.close()
