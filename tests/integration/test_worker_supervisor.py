"""The supervisor behind `offload worker`: how it starts its consumers, and that they work.

A supervisor without threads forks its consumers (the app is imported once); one that runs
threads starts fresh interpreters, because a fork would copy locks those threads hold. Either
way every kind of run is served and a consumer that dies is replaced.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from tests.contract.conftest import world_at
from tests.support import ROOT, kill_and_reap, wait_until

SUPERVISOR = textwrap.dedent(
    """
    import sys, threading, time
    from offload.worker import Supervisor, load_offload

    jobs = load_offload("tests.apps.contract:jobs")
    if sys.argv[1] == "with-a-thread":
        threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
    sys.exit(Supervisor("tests.apps.contract:jobs", jobs, loglevel="INFO").run_forever())
    """
)
CONSUMERS = 3  # OFFLOAD_WORKER_PROCESSES=2 thread-pool consumers and one prefork consumer


@pytest.mark.parametrize("mode", ["single-threaded", "with-a-thread"])
def test_supervisor_starts_working_consumers_and_replaces_a_dead_one(
    tmp_path: Path, mode: str
) -> None:
    broker, ledger = f"sqlite:///{tmp_path / 'broker.sqlite'}", f"sqlite:///{tmp_path / 'l.sqlite'}"
    with world_at("sqlite", "sqlite", broker, ledger, tmp_path) as world:
        log_path = tmp_path / "supervisor.log"
        with log_path.open("ab") as log:
            supervisor = subprocess.Popen(
                [sys.executable, "-c", SUPERVISOR, mode],
                env={**os.environ, **world.env, "PYTHONPATH": str(ROOT)},
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        seen: list[psutil.Process] = []

        def consumers() -> list[psutil.Process]:
            found = psutil.Process(supervisor.pid).children()
            seen.extend(found)
            return found if len(found) == CONSUMERS else []

        def ready(count: int) -> bool:
            return log_path.read_text(errors="replace").count(" ready.") >= count

        try:
            started = wait_until(consumers, 30, "the consumers to start")
            wait_until(lambda: ready(CONSUMERS), 30, "the consumers to be ready")
            command = psutil.Process(supervisor.pid).cmdline()
            forked = [c.cmdline() == command for c in started]
            assert forked == [mode == "single-threaded"] * CONSUMERS
            assert world.task("add").defer_sync(2, 3).result_sync(timeout=30) == 5
            where = world.task("where_am_i").defer_sync().result_sync(timeout=30)
            assert where["pid"] not in {supervisor.pid, *(c.pid for c in started)}

            # A consumer killed outright is replaced, and the runs go on.
            started[0].send_signal(signal.SIGKILL)
            wait_until(
                lambda: started[0].pid not in {c.pid for c in consumers()},
                30,
                "a replacement consumer",
            )
            wait_until(lambda: ready(CONSUMERS + 1), 30, "the replacement to be ready")
            runs = [world.task("add").defer_sync(i, i) for i in range(20)]
            assert [r.result_sync(timeout=30) for r in runs] == [2 * i for i in range(20)]
        finally:
            with contextlib.suppress(psutil.NoSuchProcess):
                seen.extend(psutil.Process(supervisor.pid).children(True))
            kill_and_reap(supervisor, seen)
