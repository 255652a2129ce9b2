"""A ledger written by an older offload is upgraded in place, keeping its runs: version 1 (the
first schema) to today's, on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from offload import Offload, RunFilter, RunState
from offload.ledger.schema import SCHEMA_VERSION
from tests.support import ledger_url


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with ledger_url(request.param, tmp_path) as url:
        yield url


def as_version_1(url: str) -> None:
    """Take back what versions 2 to 5 added, as a ledger of offload 0.1 had it."""
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE offload_queues"))
        conn.execute(sa.text("DROP INDEX ix_offload_runs_held"))
        conn.execute(sa.text("ALTER TABLE offload_runs DROP COLUMN held_at"))
        conn.execute(sa.text("DROP TABLE offload_schedules"))
        conn.execute(sa.text("DROP TABLE offload_leases"))
        conn.execute(sa.text("DROP INDEX uq_offload_runs_fire"))
        conn.execute(sa.text("ALTER TABLE offload_runs DROP COLUMN schedule"))
        conn.execute(sa.text("ALTER TABLE offload_runs DROP COLUMN scheduled_for"))
        conn.execute(sa.text("DROP TABLE offload_run_stats"))
        conn.execute(sa.text("DROP INDEX ix_offload_runs_finished"))
        conn.execute(sa.text("ALTER TABLE offload_runs DROP COLUMN replay_of"))
        conn.execute(sa.text("ALTER TABLE offload_runs DROP COLUMN replayed_by"))
        conn.execute(sa.text("UPDATE offload_meta SET value = '1' WHERE key = 'schema_version'"))
    engine.dispose()


def version_of(url: str) -> int:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        found = conn.execute(sa.text("SELECT value FROM offload_meta")).scalar_one()
    engine.dispose()
    return int(found)


def test_a_version_1_ledger_is_upgraded_and_keeps_its_runs(url: str, tmp_path: Path) -> None:
    old = Offload(data_dir=tmp_path, ledger_url=url)

    @old.task
    def charge(cents: int) -> int:
        return cents

    kept = charge.defer_sync(cents=250)
    old.close()
    as_version_1(url)
    assert version_of(url) == 1

    jobs = Offload(data_dir=tmp_path, ledger_url=url)
    try:
        jobs.ledger.ensure_schema()
        assert version_of(url) == SCHEMA_VERSION
        status = jobs.status_sync(kept.id)
        assert status.state is RunState.PENDING
        assert status.replay_of is None
        assert status.replayed_by is None
        assert [r.id for r in jobs.list_runs_sync(RunFilter(task="charge")).runs] == [kept.id]
        jobs.cancel_sync(kept.id)  # writes version 3's counters table too
        assert jobs.status_sync(kept.id).state is RunState.CANCELLED

        @jobs.task
        def nightly() -> None: ...

        jobs.schedule(nightly, every=3600)
        jobs.scheduler().tick()  # version 4's schedules and lease
        fired = jobs.run_schedule_now_sync("nightly")
        assert jobs.status_sync(fired.id).schedule == "nightly"
        assert [s.last_run_id for s in jobs.list_schedules_sync()] == [fired.id]
        assert jobs.pause_queue_sync("default").paused  # version 5's paused queues
        assert not jobs.resume_queue_sync("default").paused
    finally:
        jobs.close()
