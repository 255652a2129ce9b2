"""The ledger goes away (PostgreSQL stopped) or is locked (another SQLite writer)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from offload import LedgerError, RunState
from offload.ledger import queries
from offload.testing import wait_for_state_sync
from tests.contract.conftest import world_at
from tests.faults.services import PrivatePostgres, running
from tests.support import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(240)]


def test_postgres_ledger_outage_loses_nothing_and_recovers(tmp_path: Path) -> None:
    postgres = PrivatePostgres()
    with (
        running(postgres),
        world_at(
            "sqlite",
            "postgres",
            f"sqlite:///{tmp_path / 'broker.sqlite'}",
            postgres.url,
            tmp_path,
            OFFLOAD_LEDGER_OUTAGE_S="120",
        ) as world,
    ):
        world.worker.start().wait_ready()
        started, release = tmp_path / "started", tmp_path / "release"
        run = world.task("long_job").defer_sync(started=str(started), release=str(release))
        wait_until(started.exists, 30, "the run to start")
        # Given the ledger database stops while a run is in the middle of its work
        postgres.stop()
        # Then defer() fails at once with an error that names the ledger
        began = time.monotonic()
        with pytest.raises(
            LedgerError, match=rf"ledger postgresql://postgres@127.0.0.1:{postgres.port}"
        ):
            world.task("add").defer_sync(1, 2)
        assert time.monotonic() - began < 5
        # And the run that finishes during the outage waits to record its outcome
        release.touch()
        time.sleep(2.0)
        # When the ledger is back
        postgres.start()
        # Then the run is recorded once, as a success of its first attempt
        assert run.result_sync(timeout=60) == 1
        assert [a.outcome for a in world.jobs.ledger.attempts(run.id)] == ["success"]
        assert started.read_text().split() == ["1"]
        assert world.task("add").defer_sync(2, 2).result_sync(timeout=30) == 4


LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
"""


def hold_write_lock(path: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process holding the SQLite file's write lock for `seconds` (wait() on it)."""
    locker = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(path), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert locker.stdout is not None
    assert locker.stdout.readline().strip() == "locked"
    locker.stdout.close()
    return locker


def test_sqlite_ledger_locked_by_another_writer(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.sqlite"
    with world_at(
        "sqlite",
        "sqlite",
        f"sqlite:///{tmp_path / 'broker.sqlite'}",
        f"sqlite:///{ledger}",
        tmp_path,
        OFFLOAD_LEDGER_BUSY_TIMEOUT_S="2",
    ) as world:
        world.worker.start().wait_ready()
        assert world.task("add").defer_sync(1, 1).result_sync(timeout=30) == 2
        # A lock held longer than the busy timeout: a clear error, nothing written
        locker = hold_write_lock(ledger, 4.0)
        try:
            with pytest.raises(LedgerError, match="database is locked"):
                world.task("add").defer_sync(5, 5)
        finally:
            locker.wait(timeout=30)
        # A lock held shorter than the busy timeout: defer() waits, the run completes once
        locker = hold_write_lock(ledger, 1.0)
        try:
            run = world.task("add").defer_sync(3, 4)
        finally:
            locker.wait(timeout=30)
        assert run.result_sync(timeout=30) == 7
        # A lock held while runs are being processed: the worker waits it out
        runs = [world.task("add").defer_sync(i, 0) for i in range(10)]
        locker = hold_write_lock(ledger, 3.0)
        locker.wait(timeout=30)
        assert [r.result_sync(timeout=60) for r in runs] == list(range(10))
        for r in runs:
            assert r.status_sync().attempts == 1
        counts = world.jobs.ledger.read(queries.count_by_state)
        assert set(counts) == {RunState.SUCCESS}
        assert counts[RunState.SUCCESS] == 12  # the refused run was never written
        # The file is sound.
        check = sqlite3.connect(ledger)
        assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        check.close()
        status = wait_for_state_sync(runs[0], RunState.SUCCESS, timeout=1)
        assert status.result == 0
