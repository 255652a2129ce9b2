"""Bulk replay streams: replaying 10,000 dead runs holds one batch in memory, not all of them.

Real ledgers (a SQLite file, a PostgreSQL database of the test's own) and a real SQLite broker
that receives every replay's message. Memory is Python's own allocation count (tracemalloc),
compared between 1,000 and 10,000 runs: loading the whole set would grow it tenfold.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from offload import Offload, RunFilter, RunState
from offload.core.run import Lane, new_run_id
from offload.ledger import queries
from offload.ledger.schema import runs
from tests.support import ledger_url


@pytest.fixture(params=["sqlite", "postgres"], ids=lambda ledger: f"{ledger}-ledger")
def jobs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Offload]:
    with ledger_url(request.param, tmp_path) as url:
        jobs = Offload(
            ledger_url=url, broker_url=f"sqlite:///{tmp_path / 'broker.sqlite'}", data_dir=tmp_path
        )

        @jobs.task(retries=2)
        def charge(order_id: int, note: str) -> None:
            raise ValueError(f"order {order_id} declined")

        yield jobs
        jobs.close()


def bury(jobs: Offload, count: int, task: str = "charge") -> None:
    """`count` dead runs, as workers leave them after the last try (written in bulk)."""
    note = "x" * 200  # arguments of a realistic size
    for start in range(0, count, 2000):
        new = [
            queries.NewRun(
                new_run_id(), task, Lane.DURABLE, "default", 0, {"order_id": i, "note": note}, None
            )
            for i in range(start, min(count, start + 2000))
        ]

        def write(conn: sa.Connection, new: list[queries.NewRun] = new) -> None:
            queries.insert_runs(conn, new, jobs.clock())
            conn.execute(
                runs.update()
                .where(runs.c.id.in_([n.id for n in new]))
                .values(
                    state="FAILURE",
                    dead=True,
                    error="ValueError: declined",
                    finished_at=jobs.clock(),
                )
            )

        jobs.ledger.write(write)


def replay_peak(jobs: Offload, count: int) -> tuple[int, list[int]]:
    """Bury `count` runs, replay them all; the peak memory the replay allocated, and the
    progress reports."""
    bury(jobs, count)
    seen: list[int] = []
    tracemalloc.start()
    try:
        replayed = jobs.replay_all_sync(RunFilter(dead=True), on_progress=seen.append)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert replayed == count
    return peak, seen


def test_replaying_ten_thousand_dead_runs_holds_one_batch_in_memory(jobs: Offload) -> None:
    small_peak, _ = replay_peak(jobs, 1000)
    assert jobs.count_runs_sync(RunFilter(dead=True, replayed=False)) == {}
    large_peak, progress = replay_peak(jobs, 10_000)

    assert large_peak < 2 * small_peak, (small_peak, large_peak)
    assert progress == list(range(500, 10_001, 500))  # a report per batch, in order
    every = jobs.count_runs_sync()
    assert every == {"charge": 22_000}  # 11,000 dead originals and their 11,000 replays
    waiting = jobs.count_runs_sync(RunFilter(states=(RunState.PENDING,), replayed=False))
    assert waiting == {"charge": 11_000}
    assert jobs.count_runs_sync(RunFilter(dead=True, replayed=False)) == {}
