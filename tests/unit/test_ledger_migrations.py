"""A ledger written by an older offload is upgraded in place, keeping its runs: version 1 (the
first schema) to today's, on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from offload import Offload, RunFilter, RunState
from offload.ledger.schema import SCHEMA_VERSION
from tests.support import ledger_url


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with ledger_url(request.param, tmp_path) as url:
        yield url


def engine_of(url: str) -> sa.Engine:
    """An engine straight on the ledger's database, past offload (psycopg 3 on PostgreSQL)."""
    return sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))


def ledger_with_a_run(url: str, tmp_path: Path) -> str:
    """Write today's ledger at `url` holding one waiting run; its id."""
    old = Offload(data_dir=tmp_path, ledger_url=url)

    @old.task
    def charge(cents: int) -> int:
        return cents

    kept = charge.defer_sync(cents=250)
    old.close()
    return kept.id


def as_version_1(url: str) -> None:
    """Take back what versions 2 to 5 added, as a ledger of offload 0.1 had it."""
    engine = engine_of(url)
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
    engine = engine_of(url)
    with engine.connect() as conn:
        found = conn.execute(sa.text("SELECT value FROM offload_meta")).scalar_one()
    engine.dispose()
    return int(found)


def test_a_version_1_ledger_is_upgraded_and_keeps_its_runs(url: str, tmp_path: Path) -> None:
    kept = ledger_with_a_run(url, tmp_path)
    as_version_1(url)
    assert version_of(url) == 1

    jobs = Offload(data_dir=tmp_path, ledger_url=url)
    try:
        jobs.ledger.ensure_schema()
        assert version_of(url) == SCHEMA_VERSION
        status = jobs.status_sync(kept)
        assert status.state is RunState.PENDING
        assert status.replay_of is None
        assert status.replayed_by is None
        assert [r.id for r in jobs.list_runs_sync(RunFilter(task="charge")).runs] == [kept]
        jobs.cancel_sync(kept)  # writes version 3's counters table too
        assert jobs.status_sync(kept).state is RunState.CANCELLED

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


def as_version_5_on_sqlite(url: str) -> None:
    """Declare the JSON columns `JSON` again, as offload up to schema 5 created them on SQLite
    (NUMERIC affinity: the stored text `3.0` becomes the integer 3)."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for table, column in (("offload_runs", "args"), ("offload_runs", "result")):
            conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {column}_json JSON"))
            conn.execute(sa.text(f"UPDATE {table} SET {column}_json = {column}"))
            conn.execute(sa.text(f"ALTER TABLE {table} DROP COLUMN {column}"))
            conn.execute(sa.text(f"ALTER TABLE {table} RENAME COLUMN {column}_json TO {column}"))
        conn.execute(sa.text("UPDATE offload_meta SET value = '5' WHERE key = 'schema_version'"))
    engine.dispose()


def declared_types(url: str, table: str) -> dict[str, str]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f"PRAGMA table_info({table})")).all()
    engine.dispose()
    return {row.name: row.type for row in rows}


def test_a_version_5_sqlite_ledger_stores_json_as_text_and_keeps_its_runs(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    old = Offload(data_dir=tmp_path, ledger_url=url)

    @old.task
    def scale(factor: Any, label: str) -> Any:
        return factor

    kept = scale.defer_sync(factor=2.5, label="kept")
    old.close()
    as_version_5_on_sqlite(url)
    assert declared_types(url, "offload_runs")["args"] == "JSON"

    jobs = Offload(data_dir=tmp_path, ledger_url=url)
    again = jobs.task(scale.fn)
    try:
        jobs.ledger.ensure_schema()
        assert version_of(url) == SCHEMA_VERSION
        types = declared_types(url, "offload_runs")
        assert (types["args"], types["result"]) == ("TEXT", "TEXT")
        assert declared_types(url, "offload_schedules")["args"] == "TEXT"
        assert jobs.get_run_sync(kept.id).args == {"factor": 2.5, "label": "kept"}
        whole = again.defer_sync(factor=3.0, label="new")
        factor = jobs.get_run_sync(whole.id).args["factor"]
        assert factor == 3.0
        assert isinstance(factor, float)
    finally:
        jobs.close()


PARTIAL = {
    "ix_offload_runs_finished": "ON offload_runs (finished_at)",
    "uq_offload_runs_fire": "ON offload_runs (schedule, scheduled_for)",
    "ix_offload_runs_held": "ON offload_runs (queue, held_at)",
}


def index_definitions(url: str) -> dict[str, str]:
    engine = engine_of(url)
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            query = "SELECT name, sql FROM sqlite_master WHERE type = 'index'"
        else:
            query = "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'offload_runs'"
        found = {name: sql for name, sql in conn.execute(sa.text(query)) if name in PARTIAL}
    engine.dispose()
    return found


def test_a_version_6_ledger_indexes_only_the_runs_that_set_the_column(
    url: str, tmp_path: Path
) -> None:
    kept = ledger_with_a_run(url, tmp_path)
    engine = engine_of(url)
    with engine.begin() as conn:  # the indexes as versions up to 6 created them
        for name, target in PARTIAL.items():
            unique = "UNIQUE " if name.startswith("uq_") else ""
            conn.execute(sa.text(f"DROP INDEX {name}"))
            conn.execute(sa.text(f"CREATE {unique}INDEX {name} {target}"))
        conn.execute(sa.text("UPDATE offload_meta SET value = '6' WHERE key = 'schema_version'"))
    engine.dispose()
    assert not any("WHERE" in sql for sql in index_definitions(url).values())

    jobs = Offload(data_dir=tmp_path, ledger_url=url)
    try:
        jobs.ledger.ensure_schema()
        assert version_of(url) == SCHEMA_VERSION
        definitions = index_definitions(url)
        assert sorted(definitions) == sorted(PARTIAL)
        assert all("WHERE" in sql and "IS NOT NULL" in sql for sql in definitions.values())
        assert jobs.status_sync(kept).state is RunState.PENDING
        if url.startswith("sqlite"):  # retention's batch still walks the finished index
            with jobs.ledger.engine.connect() as conn:
                plan = " ".join(
                    str(row[-1])
                    for row in conn.exec_driver_sql(
                        "EXPLAIN QUERY PLAN SELECT id FROM offload_runs "
                        "WHERE finished_at IS NOT NULL AND finished_at < 1e12 "
                        "ORDER BY finished_at LIMIT 100"
                    )
                )
            assert "ix_offload_runs_finished" in plan, plan
    finally:
        jobs.close()
