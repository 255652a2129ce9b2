"""The ledger's tables. Every timestamp is seconds since the epoch (UTC) as a float.

Floats keep comparisons (heartbeats, due times) cheap and identical on SQLite and PostgreSQL;
`queries.py` turns them into aware datetimes at the boundary.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles

SCHEMA_VERSION = 7
"""Bump with a migration in `migrations.py` whenever a table below changes."""

metadata = sa.MetaData()


class Json(sa.JSON):
    """JSON, stored as TEXT on SQLite. A column declared `JSON` there has NUMERIC affinity:
    SQLite turns the stored text `3.0` into the integer 3, so a float result came back an int."""

    cache_ok = True


@compiles(Json, "sqlite")
def _json_as_text(element: Json, compiler: object, **kw: object) -> str:
    return "TEXT"


meta = sa.Table(
    "offload_meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(200), nullable=False),
)

runs = sa.Table(
    "offload_runs",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("task", sa.String(200), nullable=False),
    sa.Column("lane", sa.String(16), nullable=False),
    sa.Column("queue", sa.String(200)),
    sa.Column("priority", sa.Integer, nullable=False, default=0),
    sa.Column("state", sa.String(16), nullable=False),
    # FAILURE runs that used their last try: the dead-letter queue is `WHERE dead`.
    sa.Column("dead", sa.Boolean, nullable=False, default=False),
    sa.Column("args", Json, nullable=False),
    sa.Column("result", Json),
    sa.Column("error", sa.Text),
    sa.Column("progress_fraction", sa.Float),
    sa.Column("progress_message", sa.String(500)),
    # attempts = tries started; failures = tries that raised or timed out (count against
    # retries); lost = tries whose worker died (count against max_lost_attempts).
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("failures", sa.Integer, nullable=False, default=0),
    sa.Column("lost", sa.Integer, nullable=False, default=0),
    sa.Column("idempotency_key", sa.String(200)),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    # The current attempt: host:pid:process-start of the process running it, when it
    # started, and when its worker last said it is alive. Its `offload_attempts` row is
    # written when it ends (or is found lost), so that starting costs one statement.
    sa.Column("worker", sa.String(200)),
    sa.Column("attempt_started_at", sa.Float),
    sa.Column("heartbeat_at", sa.Float),
    # When the next attempt is due; while it runs, when it was due (its time in the queue).
    sa.Column("next_attempt_at", sa.Float),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("updated_at", sa.Float, nullable=False),
    # A replay is a new run: it names the run it replays, and that run names its replay.
    sa.Column("replay_of", sa.String(64)),
    sa.Column("replayed_by", sa.String(64)),
    # A schedule's fire: which schedule, and the fire time it is the one run of.
    sa.Column("schedule", sa.String(200)),
    sa.Column("scheduled_for", sa.Float),
    # When a worker took this waiting run while its queue was paused: it acknowledged the
    # message and left the run here; resuming the queue publishes it again.
    sa.Column("held_at", sa.Float),
    sa.UniqueConstraint("task", "idempotency_key", name="uq_offload_runs_idempotency"),
)
sa.Index("ix_offload_runs_created", runs.c.created_at, runs.c.id)
sa.Index("ix_offload_runs_state", runs.c.state, runs.c.created_at)
sa.Index("ix_offload_runs_task", runs.c.task, runs.c.created_at)


def _partial(column: sa.Column[Any]) -> dict[str, Any]:
    """Index only the rows where `column` is set: most runs never set it, and an entry for a
    NULL is one more page each defer writes (on the embedded default a defer wrote 14 pages
    to SQLite's WAL, 11 with the three indexes below partial). A comparison on the column
    (`finished_at < ?`, `schedule = ?`) implies it is set, so planners still use the index."""
    return {"sqlite_where": column.is_not(None), "postgresql_where": column.is_not(None)}


# Retention deletes the oldest finished runs first.
FINISHED_INDEX = sa.Index(
    "ix_offload_runs_finished", runs.c.finished_at, **_partial(runs.c.finished_at)
)
# One run per fire, whoever fires it: two schedulers, a restart mid-fire, a clock set back.
FIRE_INDEX = sa.Index(
    "uq_offload_runs_fire",
    runs.c.schedule,
    runs.c.scheduled_for,
    unique=True,
    **_partial(runs.c.schedule),
)
# Resuming a queue finds its held runs.
HELD_INDEX = sa.Index(
    "ix_offload_runs_held", runs.c.queue, runs.c.held_at, **_partial(runs.c.held_at)
)

attempts = sa.Table(
    "offload_attempts",
    metadata,
    sa.Column(
        "run_id",
        sa.String(64),
        sa.ForeignKey("offload_runs.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("number", sa.Integer, primary_key=True),
    sa.Column("worker", sa.String(200)),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
    # success | error | timeout | lost | cancelled; NULL while running
    sa.Column("outcome", sa.String(16)),
    sa.Column("error", sa.Text),
    sa.Column("traceback", sa.Text),
)

# The workers that are (or were lately) running: a row per consumer process, refreshed with
# its heartbeat. Worker status comes from here, not from Celery's remote control, which the
# SQLite broker cannot carry; it reads the same on every broker.
workers = sa.Table(
    "offload_workers",
    metadata,
    sa.Column("id", sa.String(200), primary_key=True),  # host:pid:process-start
    sa.Column("name", sa.String(200), nullable=False),  # Celery's node name
    sa.Column("queues", sa.String(1000), nullable=False),
    sa.Column("pool", sa.String(32), nullable=False),
    sa.Column("concurrency", sa.Integer, nullable=False),
    sa.Column("running", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
)

# The durable lane's Prometheus counters, kept by the same writes that start and end attempts:
# exact across processes, machines and restarts, and untouched by retention (web/metrics.py).
# series "run": runs that ended, by state and duration bucket (-1: ended without an attempt);
# series "wait": attempts started, by time-in-queue bucket (state ""). Concurrent writers pick
# one of a few shards, so that workers never queue behind one row lock on PostgreSQL.
run_stats = sa.Table(
    "offload_run_stats",
    metadata,
    sa.Column("series", sa.String(8), primary_key=True),
    sa.Column("task", sa.String(200), primary_key=True),
    sa.Column("state", sa.String(16), primary_key=True),
    sa.Column("bucket", sa.Integer, primary_key=True),
    sa.Column("shard", sa.Integer, primary_key=True),
    sa.Column("count", sa.BigInteger, nullable=False),
    sa.Column("seconds", sa.Float, nullable=False),
)

# Schedules declared in code, with what the ledger must remember about them: when each fires
# next, whether someone paused it, its last fire. Synced from code by the scheduler that holds
# the lease (core/schedule.py has the time arithmetic).
schedules = sa.Table(
    "offload_schedules",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("task", sa.String(200), nullable=False),
    sa.Column("spec", sa.String(300), nullable=False),
    sa.Column("args", Json, nullable=False),
    sa.Column("catch_up", sa.String(8), nullable=False),
    sa.Column("paused", sa.Boolean, nullable=False, default=False),
    sa.Column("next_fire_at", sa.Float),  # NULL while paused
    sa.Column("last_fire_at", sa.Float),
    sa.Column("last_run_id", sa.String(64)),
    sa.Column("updated_at", sa.Float, nullable=False),
)

# Leases: which process does a job only one may do at a time (the scheduler), until when.
leases = sa.Table(
    "offload_leases",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("holder", sa.String(200), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)

# Queues someone paused: workers leave their runs waiting (held) until they are resumed.
queues = sa.Table(
    "offload_queues",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("paused", sa.Boolean, nullable=False),
    sa.Column("paused_at", sa.Float),
    sa.Column("updated_at", sa.Float, nullable=False),
)
