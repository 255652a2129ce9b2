"""The disk that holds the embedded SQLite files fills up."""

from __future__ import annotations

import contextlib
import errno
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from offload import LedgerError, OffloadError, RunState
from offload.ledger import queries
from tests.contract.conftest import world_at

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(180)]


@contextlib.contextmanager
def small_disk(path: Path, size: str = "4m") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` for the test, unmounted afterwards."""
    path.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs for the disk-full test: {result.stderr}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(path: Path) -> Path:
    """Write a file until the disk is full; returns it (delete it to free the space)."""
    filler = path / "filler"

    def write_forever() -> None:
        with open(filler, "wb") as out:
            while True:
                out.write(b"\0" * 65536)
                out.flush()

    with pytest.raises(OSError, match="No space left") as full:
        write_forever()
    assert full.value.errno == errno.ENOSPC
    return filler


def test_full_disk_fails_defer_clearly_and_leaves_a_consistent_ledger(tmp_path: Path) -> None:
    with (
        small_disk(tmp_path / "disk") as disk,
        world_at(
            "sqlite",
            "sqlite",
            f"sqlite:///{disk / 'broker.sqlite'}",
            f"sqlite:///{disk / 'ledger.sqlite'}",
            disk,
            OFFLOAD_LEDGER_BUSY_TIMEOUT_S="5",
        ) as world,
    ):
        # Given some runs queued, no worker yet
        queued = [world.task("add").defer_sync(i, 1) for i in range(5)]
        # When the disk fills up
        filler = fill(disk)

        # Then defer() fails with an error that says what is wrong and what to do
        def defer_until_refused() -> None:
            for i in range(200):  # the first may still fit in a page SQLite already had
                world.task("add").defer_sync(100 + i, 0)

        with pytest.raises(OffloadError) as failed:
            defer_until_refused()
        assert isinstance(failed.value, LedgerError)
        assert "database or disk is full; free space on the disk that holds it" in str(failed.value)
        # When space is freed and a worker starts
        filler.unlink()
        world.worker.start().wait_ready()
        # Then every run that defer() returned completes, and nothing half-written is left
        assert [r.result_sync(timeout=60) for r in queued] == [i + 1 for i in range(5)]
        assert world.task("add").defer_sync(7, 7).result_sync(timeout=30) == 14
        counts = world.jobs.ledger.read(queries.count_by_state)
        assert set(counts) == {RunState.SUCCESS}, counts
        for name in ("ledger.sqlite", "broker.sqlite"):
            check = sqlite3.connect(disk / name)
            assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            check.close()
