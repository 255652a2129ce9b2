"""Schema migrations: one function per version step, applied in order inside one transaction.

Version 1 is the first schema, created directly from `schema.py`. A change to a table adds a
function here, registered under the version it produces, and bumps `SCHEMA_VERSION`.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from offload.errors import LedgerError
from offload.ledger.schema import (
    FINISHED_INDEX,
    FIRE_INDEX,
    HELD_INDEX,
    leases,
    queues,
    run_stats,
    schedules,
)


def _replays_and_retention(conn: Connection) -> None:
    """Version 2: replays link to their originals; an index for retention's deletes."""
    conn.execute(sa.text("ALTER TABLE offload_runs ADD COLUMN replay_of VARCHAR(64)"))
    conn.execute(sa.text("ALTER TABLE offload_runs ADD COLUMN replayed_by VARCHAR(64)"))
    FINISHED_INDEX.create(conn)


def _run_stats(conn: Connection) -> None:
    """Version 3: the durable lane's counters for `/metrics`. They start at zero: runs that
    ended before the upgrade are not counted (Prometheus reads it as a counter reset)."""
    run_stats.create(conn)


def _schedules(conn: Connection) -> None:
    """Version 4: schedules, the scheduler's lease, and runs that name the fire they are."""
    conn.execute(sa.text("ALTER TABLE offload_runs ADD COLUMN schedule VARCHAR(200)"))
    conn.execute(sa.text("ALTER TABLE offload_runs ADD COLUMN scheduled_for FLOAT"))
    FIRE_INDEX.create(conn)
    schedules.create(conn)
    leases.create(conn)


def _paused_queues(conn: Connection) -> None:
    """Version 5: queues can be paused; runs a worker took meanwhile are held."""
    conn.execute(sa.text("ALTER TABLE offload_runs ADD COLUMN held_at FLOAT"))
    HELD_INDEX.create(conn)
    queues.create(conn)


def _json_as_text(conn: Connection) -> None:
    """Version 6: on SQLite, JSON columns become TEXT (see `schema.Json`). SQLite cannot change
    a column's type, so each is copied into a new TEXT column that takes its name. A float
    that was already stored as an integer stays one: the text `3.0` is gone."""
    if conn.dialect.name != "sqlite":
        return
    for table, column, not_null in (
        ("offload_runs", "args", True),
        ("offload_runs", "result", False),
        ("offload_schedules", "args", True),
    ):
        declared = "TEXT NOT NULL DEFAULT '{}'" if not_null else "TEXT"
        conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {column}_text {declared}"))
        conn.execute(sa.text(f"UPDATE {table} SET {column}_text = {column}"))
        conn.execute(sa.text(f"ALTER TABLE {table} DROP COLUMN {column}"))
        conn.execute(sa.text(f"ALTER TABLE {table} RENAME COLUMN {column}_text TO {column}"))


def _partial_indexes(conn: Connection) -> None:
    """Version 7: the indexes of columns most runs leave NULL (finished, fire, held) hold only
    the rows that set them, so that a defer writes three index pages fewer."""
    for index in (FINISHED_INDEX, FIRE_INDEX, HELD_INDEX):
        conn.execute(sa.text(f"DROP INDEX {index.name}"))
        index.create(conn)


MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    2: _replays_and_retention,
    3: _run_stats,
    4: _schedules,
    5: _paused_queues,
    6: _json_as_text,
    7: _partial_indexes,
}
"""target version -> function that upgrades from the version before it."""


def upgrade(conn: Connection, found: int, target: int) -> None:
    """Apply every migration from `found` up to `target`."""
    for version in range(found + 1, target + 1):
        step = MIGRATIONS.get(version)
        if step is None:
            raise LedgerError(f"No migration to ledger schema version {version}")
        step(conn)
