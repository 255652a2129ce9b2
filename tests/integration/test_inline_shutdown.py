"""SIGTERM with inline work in flight: drained, spilled, or named as dropped; never silent."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest

from offload import Offload, RunState
from offload.testing import wait_for_state_sync
from tests.integration.conftest import ServerFactory
from tests.integration.web_client import defer, wait_status
from tests.support import WorkerProcess

pytestmark = [pytest.mark.timeout(120), pytest.mark.faults]


def test_sigterm_drains_running_runs_spills_waiting_ones_and_names_the_dropped(
    serve: ServerFactory, tmp_path: Path
) -> None:
    # Given two slots, two short runs running, and a backlog behind them: three runs that may
    # spill to the durable lane and two long ones that may not
    server = serve(OFFLOAD_INLINE_MAX_CONCURRENCY=2, OFFLOAD_INLINE_DRAIN_S=1.5)
    marker = tmp_path / "done.txt"
    with httpx.Client(base_url=server.url) as client:
        short = [
            defer(client, "slow_local", seconds=0.5, marker=str(marker), tag=f"short{i}")
            for i in range(2)
        ]
        spillable = [
            defer(client, "slow_spillable", seconds=0, marker=str(marker), tag=f"spill{i}")
            for i in range(3)
        ]
        long = [
            defer(client, "slow_local", seconds=30, marker=str(marker), tag=f"long{i}")
            for i in range(2)
        ]
        wait_status(client, short[0], "STARTED")
        assert client.get(f"/tasks/{spillable[0]}").json()["state"] == "PENDING"

    # When the server gets SIGTERM (uvicorn re-raises it once shut down: exit status -15)
    server.terminate()
    assert server.wait(timeout=30) in (0, -signal.SIGTERM)

    # Then the running runs finished within the drain deadline
    assert sorted(marker.read_text().split()) == ["short0", "short1"]
    log = server.log()
    # the waiting spillable runs went to the durable lane under the same ids
    assert "3 waiting run(s) of slow_spillable handed to the durable lane at shutdown" in log
    jobs = Offload(data_dir=server.data_dir)
    try:
        for run_id in spillable:
            status = jobs.ledger.status(run_id)
            assert (status.lane, status.state) == ("durable", RunState.PENDING)
        # and the long runs that could not finish are named, with their ids
        assert "2 unfinished run(s) dropped: slow_local x2" in log
        assert all(run_id in log for run_id in long)

        # And a worker runs the spilled runs afterwards: nothing was lost
        worker = WorkerProcess(
            "tests.apps.inline_app:jobs",
            {"OFFLOAD_DATA_DIR": str(server.data_dir)},
            tmp_path / "worker.log",
        )
        try:
            worker.start()
            for run_id in spillable:
                wait_for_state_sync(jobs.run(run_id), RunState.SUCCESS, timeout=30)
        finally:
            worker.stop()
    finally:
        jobs.close()
    assert sorted(marker.read_text().split()) == ["short0", "short1", "spill0", "spill1", "spill2"]


def test_a_killed_cpu_process_fails_its_run_and_the_pool_comes_back(serve: ServerFactory) -> None:
    # Given a long cpu_bound run in the lane's process pool
    server = serve(OFFLOAD_INLINE_CPU_PROCESSES=1)
    with httpx.Client(base_url=server.url) as client:
        run_id = defer(client, "crunch", n=10**10)
        wait_status(client, run_id, "STARTED")
        pool = [p for p in server.descendants() if os.sched_getscheduler(p.pid) == os.SCHED_IDLE]
        assert pool
        # When its process is killed (out of memory, a crash in C code)
        for process in pool:
            process.send_signal(signal.SIGKILL)
        # Then the run fails with the reason, and the next cpu_bound run works
        failed = wait_status(client, run_id, "FAILURE", timeout=20)
        assert "BrokenProcessPool" in failed["error"]
        assert wait_status(client, defer(client, "crunch", n=10), "SUCCESS", timeout=30)
    assert "an inline cpu process died; starting the process pool again" in server.log()
