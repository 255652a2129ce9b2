"""The durable lane's counters: written by the transactions that start and end attempts, read
for `/metrics` (`web/metrics.py`).

Counting in the ledger write that changes the run makes every count exact: a worker killed
with SIGKILL counts nothing it did not record, a restart loses nothing, and workers on other
machines count into the same rows. prometheus_client's multiprocess mode would need one shared
directory on one machine, one file per process id ever started, and would lose the counts
of a prefork child that died; retention deleting old runs would make counts read from the runs
themselves go down. Each write adds one upsert of a few columns to a transaction it already
commits.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from offload.core.run import RunState
from offload.ledger.prepared import Prepared
from offload.ledger.schema import run_stats
from offload.metrics import DURATION_BUCKETS, WAIT_BUCKETS, bucket_of

RUN = "run"
WAIT = "wait"
UNTIMED = -1
"""The bucket of a run that ended without an attempt of its own (cancelled while waiting, or
made dead by a lost worker or a poison message): counted, but not in the duration histogram."""
SHARDS = 8

# The same statement on SQLite (3.24+) and PostgreSQL.
_TALLY = Prepared(
    sa.text(
        "INSERT INTO offload_run_stats (series, task, state, bucket, shard, count, seconds) "
        "VALUES (:series, :task, :state, :bucket, :shard, 1, :seconds) "
        "ON CONFLICT (series, task, state, bucket, shard) DO UPDATE SET "
        "count = offload_run_stats.count + 1, "
        "seconds = offload_run_stats.seconds + excluded.seconds"
    )
)


def _tally(
    conn: Connection, series: str, task: str, state: str, bucket: int, seconds: float
) -> None:
    params = {
        "series": series,
        "task": task,
        "state": state,
        "bucket": bucket,
        "shard": random.randrange(SHARDS),
        "seconds": seconds,
    }
    _TALLY.all(conn, params)


def count_started(conn: Connection, task: str, waited_s: float) -> None:
    """An attempt started after `waited_s` in its queue (from when it was due)."""
    waited_s = max(waited_s, 0.0)
    _tally(conn, WAIT, task, "", bucket_of(WAIT_BUCKETS, waited_s), waited_s)


def count_ended(conn: Connection, task: str, state: RunState, duration_s: float | None) -> None:
    """A run reached terminal `state`; `duration_s` of its last attempt, None if it had none."""
    if duration_s is None:
        _tally(conn, RUN, task, state.value, UNTIMED, 0.0)
        return
    duration_s = max(duration_s, 0.0)
    _tally(conn, RUN, task, state.value, bucket_of(DURATION_BUCKETS, duration_s), duration_s)


@dataclass
class Histogram:
    """One task's histogram: counts per bucket (not cumulative; the last is +Inf) and sum."""

    counts: list[int]
    sum: float = 0.0


@dataclass(frozen=True)
class Counts:
    """The durable lane's counters, summed over their shards."""

    runs: dict[tuple[str, str], int]  # (task, state) -> runs ended
    durations: dict[str, Histogram]  # task -> its last attempts' durations
    waits: dict[str, Histogram]  # task -> attempts' time in queue


def read(conn: Connection) -> Counts:
    """Every counter, in one grouped read of a table of a few rows per task."""
    counts = Counts(runs={}, durations={}, waits={})
    grouped = sa.select(
        run_stats.c.series,
        run_stats.c.task,
        run_stats.c.state,
        run_stats.c.bucket,
        sa.func.sum(run_stats.c.count),
        sa.func.sum(run_stats.c.seconds),
    ).group_by(run_stats.c.series, run_stats.c.task, run_stats.c.state, run_stats.c.bucket)
    for series, task, state, bucket, count, seconds in conn.execute(grouped):
        if series == RUN:
            counts.runs[(task, state)] = counts.runs.get((task, state), 0) + count
        if bucket == UNTIMED:
            continue
        into, bounds = (
            (counts.durations, DURATION_BUCKETS) if series == RUN else (counts.waits, WAIT_BUCKETS)
        )
        found = into.setdefault(task, Histogram([0] * (len(bounds) + 1)))
        found.counts[bucket] += count
        found.sum += seconds
    return counts
