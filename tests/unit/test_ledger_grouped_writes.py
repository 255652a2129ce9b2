"""SQLite writes that queue up behind another commit together, and fail alone; a new ledger
opened while another process holds its lock waits for it."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection

from offload.ledger.database import Ledger
from offload.ledger.schema import meta
from tests.support import wait_until


def put(key: str) -> Callable[[Connection], str]:
    def write(conn: Connection) -> str:
        conn.execute(meta.insert().values(key=key, value="v"))
        return key

    return write


def keys(ledger: Ledger) -> set[str]:
    return set(ledger.read(lambda conn: conn.execute(sa.select(meta.c.key)).scalars().all()))


def queue_behind_a_held_turn(
    ledger: Ledger, writes: dict[str, Callable[[Connection], Any]]
) -> tuple[dict[str, Any], int]:
    """Run `writes` from threads while a first write holds the turn; their outcomes and how
    many transactions committed meanwhile."""
    commits = []
    event.listen(ledger.engine, "commit", lambda _conn: commits.append(1))
    holding, release = threading.Event(), threading.Event()

    def hold(conn: Connection) -> None:
        holding.set()
        release.wait(10)

    first = threading.Thread(target=ledger.write_grouped, args=(hold,))
    first.start()
    holding.wait(10)
    outcomes: dict[str, Any] = {}

    def call(name: str, fn: Callable[[Connection], Any]) -> None:
        try:
            outcomes[name] = ledger.write_grouped(fn)
        except Exception as exc:  # noqa: BLE001 - the test looks at what each caller got
            outcomes[name] = exc

    threads = [threading.Thread(target=call, args=item) for item in writes.items()]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(ledger._sqlite_writers.pending) == len(writes), 10, "the queue")
    release.set()
    for thread in [first, *threads]:
        thread.join(10)
    return outcomes, len(commits)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    ledger.ensure_schema()
    yield ledger
    ledger.dispose()


def test_writes_that_queue_up_share_one_commit(ledger: Ledger) -> None:
    outcomes, commits = queue_behind_a_held_turn(ledger, {k: put(k) for k in "abc"})
    assert outcomes == {"a": "a", "b": "b", "c": "c"}
    assert keys(ledger) >= {"a", "b", "c"}
    assert commits == 2  # the held write, then the three queued ones together


def test_a_failing_write_fails_only_its_own_caller(ledger: Ledger) -> None:
    def broken(conn: Connection) -> None:
        conn.execute(meta.insert().values(key="x", value="v"))
        raise ValueError("this write is refused")

    outcomes, _ = queue_behind_a_held_turn(ledger, {"a": put("a"), "x": broken, "b": put("b")})
    assert outcomes["a"] == "a"
    assert outcomes["b"] == "b"
    assert isinstance(outcomes["x"], ValueError)
    assert "x" not in keys(ledger)  # nothing half-written
    assert {"a", "b"} <= keys(ledger)


def test_a_new_ledger_waits_for_a_process_that_holds_its_lock(tmp_path: Path) -> None:
    # API and workers starting together on a new file: one switches it to WAL or creates the
    # tables while the others connect. They used to fail at once with "database is locked".
    path = tmp_path / "ledger.sqlite"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")
    threading.Timer(0.3, other.rollback).start()
    ledger = Ledger(f"sqlite:///{path}")
    began = time.monotonic()
    try:
        ledger.write(put("after-the-lock"))
        assert time.monotonic() - began >= 0.25  # it waited for the holder, then went on
        assert "after-the-lock" in keys(ledger)
    finally:
        ledger.dispose()
        other.close()
