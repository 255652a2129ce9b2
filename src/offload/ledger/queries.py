"""Every read and write of the ledger, as named functions over a SQLAlchemy connection.

Each function runs inside the caller's transaction (see `Ledger.write()` / `Ledger.read()`);
one state change is one transaction, so a crash leaves either the old state or the new one.

The statements on a run's hot path (defer, start, finish, progress, status) are `Prepared`:
built once, with bind parameters (building a Core statement per call cost ~150 µs), and on
SQLite run on the driver's cursor (SQLAlchemy's per-execution work cost ~100 µs of ~130 µs).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from offload.core.overview import QueueStatus, Running
from offload.core.run import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    WAITING_STATES,
    Attempt,
    JSONValue,
    Lane,
    Progress,
    RunFilter,
    RunState,
    RunStatus,
    WorkerStatus,
)
from offload.errors import IdempotencyConflictError, RunNotFoundError, RunStateError
from offload.ledger import stats
from offload.ledger.prepared import Prepared, one_of
from offload.ledger.schema import attempts, queues, runs, workers

_ACTIVE = [s.value for s in ACTIVE_STATES]
_TERMINAL = [s.value for s in TERMINAL_STATES]
_WAITING = [RunState.PENDING.value, RunState.RETRY.value]

_b = sa.bindparam
_INSERT_RUNS = Prepared(runs.insert())
_SELECT_RUN = Prepared(sa.select(runs).where(runs.c.id == _b("run_id")))
_SELECT_RUN_FOR_UPDATE = sa.select(runs).where(runs.c.id == _b("run_id")).with_for_update()
_INSERT_ATTEMPT = Prepared(attempts.insert())

# Start an attempt of a run that is simply waiting and due: the common case, one statement.
_CLAIM_WAITING = Prepared(
    runs.update()
    .where(
        runs.c.id == _b("run_id"),
        one_of(runs.c.state, _WAITING),
        runs.c.cancel_requested == sa.false(),
        sa.or_(runs.c.next_attempt_at.is_(None), runs.c.next_attempt_at <= _b("due")),
        ~sa.exists().where(queues.c.name == runs.c.queue, queues.c.paused == sa.true()),
    )
    .values(
        state=RunState.STARTED.value,
        attempts=runs.c.attempts + 1,
        worker=_b("worker"),
        heartbeat_at=_b("now"),
        attempt_started_at=_b("now"),
        # next_attempt_at stays: when this attempt was due, for its time in the queue.
        started_at=sa.func.coalesce(runs.c.started_at, _b("now")),
        held_at=None,
        updated_at=_b("now"),
    )
    .returning(
        runs.c.attempts,
        runs.c.failures,
        runs.c.args,
        sa.func.coalesce(runs.c.next_attempt_at, runs.c.created_at).label("due_at"),
    )
)

# End the current attempt, if it still is the current one; returns what its history row needs.
_END_CURRENT = (
    runs.update()
    .where(
        runs.c.id == _b("run_id"),
        runs.c.attempts == _b("attempt"),
        one_of(runs.c.state, _ACTIVE),
    )
    .returning(runs.c.task, runs.c.worker, runs.c.attempt_started_at)
)

_RECORD_PROGRESS = Prepared(
    runs.update()
    .where(
        runs.c.id == _b("run_id"),
        runs.c.attempts == _b("attempt"),
        one_of(runs.c.state, _ACTIVE),
    )
    .values(
        state=RunState.PROGRESS.value,
        progress_fraction=_b("fraction"),
        progress_message=_b("message"),
        updated_at=_b("now"),
    )
)

_IS_CANCEL_REQUESTED = Prepared(sa.select(runs.c.cancel_requested).where(runs.c.id == _b("run_id")))


def as_datetime(value: float | None) -> datetime | None:
    """A stored timestamp (seconds since the epoch) as an aware UTC datetime."""
    return None if value is None else datetime.fromtimestamp(value, UTC)


@dataclass(frozen=True)
class NewRun:
    """A run about to be recorded."""

    id: str
    task: str
    lane: Lane
    queue: str | None
    priority: int
    args: dict[str, JSONValue]
    idempotency_key: str | None
    next_attempt_at: float | None = None
    replay_of: str | None = None
    schedule: str | None = None
    scheduled_for: float | None = None


# --- deferring -------------------------------------------------------------------------------


def insert_runs(conn: Connection, new: Sequence[NewRun], now: float) -> list[tuple[str, bool]]:
    """Insert PENDING runs; for a known idempotency key return the existing run instead.

    Returns `(run id, created)` per input, in order. Raises `IdempotencyConflictError` when a
    known key comes with other arguments than its run's.
    """
    keyed = {(n.task, n.idempotency_key) for n in new if n.idempotency_key is not None}
    existing: dict[tuple[str, str | None], tuple[str, Any]] = {}
    if keyed:
        rows = conn.execute(
            sa.select(runs.c.task, runs.c.idempotency_key, runs.c.id, runs.c.args).where(
                sa.tuple_(runs.c.task, runs.c.idempotency_key).in_(list(keyed))
            )
        )
        existing = {(r.task, r.idempotency_key): (r.id, r.args) for r in rows}
    result: list[tuple[str, bool]] = []
    to_insert: list[dict[str, Any]] = []
    for n in new:
        key = (n.task, n.idempotency_key)
        if n.idempotency_key is not None and key in existing:
            run_id, args = existing[key]
            if args != n.args:
                raise IdempotencyConflictError(n.task, n.idempotency_key, run_id)
            result.append((run_id, False))
            continue
        if n.idempotency_key is not None:
            existing[key] = (n.id, n.args)
        result.append((n.id, True))
        to_insert.append(
            {
                "id": n.id,
                "task": n.task,
                "lane": n.lane.value,
                "queue": n.queue,
                "priority": n.priority,
                "state": RunState.PENDING.value,
                "dead": False,
                "args": n.args,
                "attempts": 0,
                "failures": 0,
                "lost": 0,
                "cancel_requested": False,
                "idempotency_key": n.idempotency_key,
                "next_attempt_at": n.next_attempt_at,
                "replay_of": n.replay_of,
                "schedule": n.schedule,
                "scheduled_for": n.scheduled_for,
                "created_at": now,
                "updated_at": now,
            }
        )
    if to_insert:
        _INSERT_RUNS.many(conn, to_insert)
    return result


def delete_runs(conn: Connection, run_ids: Iterable[str]) -> None:
    """Remove runs that were never published (the broker refused them)."""
    conn.execute(runs.delete().where(runs.c.id.in_(list(run_ids))))


# --- reading ---------------------------------------------------------------------------------


def _status(row: Any) -> RunStatus:
    progress = None
    if row.progress_fraction is not None:
        progress = Progress(fraction=row.progress_fraction, message=row.progress_message)
    created = as_datetime(row.created_at)
    assert created is not None
    return RunStatus(
        id=row.id,
        task=row.task,
        lane=Lane(row.lane),
        queue=row.queue,
        state=RunState(row.state),
        dead=bool(row.dead),
        progress=progress,
        attempts=row.attempts,
        result=row.result,
        error=row.error,
        created_at=created,
        started_at=as_datetime(row.started_at),
        finished_at=as_datetime(row.finished_at),
        replay_of=row.replay_of,
        replayed_by=row.replayed_by,
        schedule=row.schedule,
        scheduled_for=as_datetime(row.scheduled_for),
    )


def get_status(conn: Connection, run_id: str) -> RunStatus:
    """The status of one run; `RunNotFoundError` if it does not exist."""
    row = _SELECT_RUN.first(conn, {"run_id": run_id})
    if row is None:
        raise RunNotFoundError(run_id)
    return _status(row)


def get_attempts(conn: Connection, run_id: str) -> list[Attempt]:
    """Every attempt of a run, oldest first, the running one (if any) last."""
    rows = conn.execute(
        sa.select(attempts).where(attempts.c.run_id == run_id).order_by(attempts.c.number)
    )
    found = [
        Attempt(
            number=r.number,
            worker=r.worker,
            started_at=as_datetime(r.started_at),
            finished_at=as_datetime(r.finished_at),
            outcome=r.outcome,
            error=r.error,
            traceback=r.traceback,
        )
        for r in rows
    ]
    run = _SELECT_RUN.first(conn, {"run_id": run_id})
    if run is not None and run.state in _ACTIVE and run.attempt_started_at is not None:
        found.append(
            Attempt(
                number=run.attempts,
                worker=run.worker,
                started_at=as_datetime(run.attempt_started_at),
                finished_at=None,
                outcome=None,
                error=None,
                traceback=None,
            )
        )
    return found


def get_message(conn: Connection, run_id: str) -> RunMessage:
    """What a run's message carries: task, JSON arguments, queue, priority (for a replay)."""
    row = conn.execute(
        sa.select(runs.c.task, runs.c.args, runs.c.queue, runs.c.priority).where(
            runs.c.id == run_id
        )
    ).first()
    if row is None:
        raise RunNotFoundError(run_id)
    return RunMessage(run_id, row.task, row.args, row.queue, row.priority)


def encode_cursor(created_at: float, run_id: str) -> str:
    """An opaque page cursor: the position after the run created at `created_at`."""
    return base64.urlsafe_b64encode(f"{created_at!r}|{run_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[float, str]:
    """The position an `encode_cursor` cursor holds; `ValueError` for anything else."""
    try:
        created, run_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        return float(created), run_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValueError(f"cursor {cursor!r} is not one this API returned") from None


def _ts(moment: datetime | None) -> float | None:
    return None if moment is None else moment.timestamp()


def _matching(query: Any, where: RunFilter) -> Any:
    """`query` narrowed to the runs `where` takes."""
    if where.states:
        query = query.where(runs.c.state.in_([s.value for s in where.states]))
    if where.task is not None:
        query = query.where(runs.c.task == where.task)
    if where.queue is not None:
        query = query.where(runs.c.queue == where.queue)
    if where.dead is not None:
        query = query.where(runs.c.dead == where.dead)
    if where.error is not None:
        query = query.where(runs.c.error.icontains(where.error, autoescape=True))
    if where.error_type is not None:
        query = query.where(
            sa.or_(
                runs.c.error == where.error_type,
                runs.c.error.startswith(f"{where.error_type}:", autoescape=True),
            )
        )
    if where.replayed is not None:
        replayed = runs.c.replayed_by.is_not(None)
        query = query.where(replayed if where.replayed else sa.not_(replayed))
    if where.schedule is not None:
        query = query.where(runs.c.schedule == where.schedule)
    if where.created_after is not None:
        query = query.where(runs.c.created_at >= _ts(where.created_after))
    if where.created_before is not None:
        query = query.where(runs.c.created_at < _ts(where.created_before))
    if where.finished_before is not None:
        query = query.where(runs.c.finished_at < _ts(where.finished_before))
    return query


def _older_than(position: tuple[float, str]) -> Any:
    created, run_id = position
    return sa.or_(
        runs.c.created_at < created, sa.and_(runs.c.created_at == created, runs.c.id < run_id)
    )


def list_runs(
    conn: Connection,
    where: RunFilter,
    *,
    after: tuple[float, str] | None = None,
    limit: int = 50,
) -> list[tuple[float, RunStatus]]:
    """Up to `limit` runs newest first, filtered, each with its stored `created_at`.

    `after` is a position (`created_at`, id) from an earlier listing: only runs older than it
    come back. Positions hold the stored float, never a rounded datetime, so that a page
    never repeats a row.
    """
    query = _matching(sa.select(runs), where)
    if after is not None:
        query = query.where(_older_than(after))
    rows = conn.execute(query.order_by(runs.c.created_at.desc(), runs.c.id.desc()).limit(limit))
    return [(row.created_at, _status(row)) for row in rows]


def count_by_task(conn: Connection, where: RunFilter) -> dict[str, int]:
    """How many runs `where` takes, per task."""
    counted = sa.select(runs.c.task, sa.func.count().label("n"))
    query = _matching(counted, where).group_by(runs.c.task)
    return {row.task: row.n for row in conn.execute(query)}


# --- replaying and removing ------------------------------------------------------------------

REPLAYABLE_STATES = (RunState.FAILURE, RunState.CANCELLED)


def list_messages(
    conn: Connection, where: RunFilter, *, after: tuple[float, str] | None, limit: int
) -> list[tuple[float, RunMessage]]:
    """What the messages of up to `limit` runs `where` takes carry, newest first, after the
    position `after`. Bulk replays page through these: memory holds one page, never the set."""
    query = _matching(
        sa.select(
            runs.c.id, runs.c.created_at, runs.c.task, runs.c.args, runs.c.queue, runs.c.priority
        ),
        where,
    )
    if after is not None:
        query = query.where(_older_than(after))
    rows = conn.execute(query.order_by(runs.c.created_at.desc(), runs.c.id.desc()).limit(limit))
    return [(r.created_at, RunMessage(r.id, r.task, r.args, r.queue, r.priority)) for r in rows]


def replay_refusal(run_id: str, state: RunState, replayed_by: str | None) -> RunStateError | None:
    """Why a run in `state` may not be replayed (None if it may): the one rule, asked before
    the edits are validated and again with the original locked."""
    if replayed_by is not None:
        return RunStateError(f"run {run_id} was already replayed as {replayed_by}")
    if state not in REPLAYABLE_STATES:
        return RunStateError(
            f"run {run_id} is {state}; only FAILURE or CANCELLED runs can be replayed"
        )
    return None


def record_replays(
    conn: Connection, replays: Sequence[NewRun], now: float, *, strict: bool
) -> list[NewRun]:
    """Insert each replay and link it with the run it replays (`NewRun.replay_of`).

    The originals are locked first: one that is not replayable (any more) raises
    `RunStateError` when `strict` (nothing is written), or is left out otherwise (a bulk
    replay racing another one). Returns the replays recorded.
    """
    wanted = [n.replay_of for n in replays]
    rows = conn.execute(
        sa.select(runs.c.id, runs.c.state, runs.c.replayed_by)
        .where(runs.c.id.in_(wanted))
        .with_for_update()
    ).all()
    found = {r.id: r for r in rows}
    recorded = []
    for new in replays:
        original = new.replay_of or ""
        row = found.get(original)
        if row is None:
            if strict:
                raise RunNotFoundError(original)
            continue
        refusal = replay_refusal(original, RunState(row.state), row.replayed_by)
        if refusal is None:
            recorded.append(new)
        elif strict:
            raise refusal
    if recorded:
        insert_runs(conn, recorded, now)
        conn.execute(
            runs.update()
            .where(runs.c.id == _b("original"))
            .values(replayed_by=_b("replay"), updated_at=now),
            [{"original": n.replay_of, "replay": n.id} for n in recorded],
        )
    return recorded


def undo_replays(conn: Connection, replays: Sequence[NewRun]) -> None:
    """Forget replays the broker refused: remove them and unlink their originals."""
    delete_runs(conn, [n.id for n in replays])
    conn.execute(
        runs.update()
        .where(runs.c.id == _b("original"), runs.c.replayed_by == _b("replay"))
        .values(replayed_by=None),
        [{"original": n.replay_of, "replay": n.id} for n in replays],
    )


def delete_finished(conn: Connection, where: RunFilter, limit: int) -> int:
    """Delete up to `limit` finished runs `where` takes (with their attempts), oldest first.

    Waiting and running runs are never deleted, whatever `where` says.
    """
    # Only finished runs have a finished_at: that test, not the state, picks them, here and
    # in the DELETE. Given the state, SQLite's planner took the state index (and sorted every
    # finished run for each batch): 4 to 8 ms of write lock with 20,000 finished runs,
    # against 0.5 ms by the finished index and the primary key.
    finished = runs.c.finished_at.is_not(None)
    chosen = _matching(sa.select(runs.c.id), where).where(finished)
    ids = [row.id for row in conn.execute(chosen.order_by(runs.c.finished_at).limit(limit))]
    if ids:
        conn.execute(runs.delete().where(runs.c.id.in_(ids), finished))
    return len(ids)


def discard(conn: Connection, run_id: str) -> None:
    """Delete one finished run and its attempts; `RunStateError` for one still going."""
    row = conn.execute(sa.select(runs.c.state).where(runs.c.id == run_id).with_for_update()).first()
    if row is None:
        raise RunNotFoundError(run_id)
    if row.state not in _TERMINAL:
        raise RunStateError(
            f"run {run_id} is {row.state}; cancel it first, only finished runs can be discarded"
        )
    conn.execute(runs.delete().where(runs.c.id == run_id))


def queue_statuses(conn: Connection, now: float) -> list[QueueStatus]:
    """Each queue with waiting runs or a pause: its depth (waiting runs due and not started,
    held ones included), its oldest due run's wait, and whether it is paused."""
    due_at = sa.func.coalesce(runs.c.next_attempt_at, runs.c.created_at)
    counted = sa.select(
        runs.c.queue,
        sa.func.count().label("n"),
        sa.func.count(runs.c.held_at).label("held"),
        sa.func.min(due_at).label("first"),
    )
    query = _matching(counted, RunFilter(states=tuple(WAITING_STATES))).where(due_at <= now)
    loads = {row.queue or "default": row for row in conn.execute(query.group_by(runs.c.queue))}
    paused = {row.name: row.paused_at for row in conn.execute(_PAUSED_QUEUES)}
    return [
        QueueStatus(
            name=name,
            due=loads[name].n if name in loads else 0,
            held=loads[name].held if name in loads else 0,
            oldest_wait_s=max(0.0, now - loads[name].first) if name in loads else None,
            paused=name in paused,
            paused_at=as_datetime(paused.get(name)),
        )
        for name in sorted(set(loads) | set(paused))
    ]


_PAUSED_QUEUES = sa.select(queues.c.name, queues.c.paused_at).where(queues.c.paused == sa.true())


def is_queue_paused(conn: Connection, name: str) -> bool:
    """True if someone paused the queue `name`. On PostgreSQL the queue's row stays locked
    until the caller commits, so that a resume waits for a run being held to be held (and
    then publishes it) instead of missing it."""
    found = conn.execute(_PAUSED_QUEUES.where(queues.c.name == name).with_for_update()).first()
    return found is not None


def consumed_queues(conn: Connection, now: float, stale_after_s: float) -> set[str]:
    """The queues that live workers consume."""
    rows = conn.execute(
        sa.select(workers.c.queues).where(workers.c.heartbeat_at >= now - stale_after_s)
    )
    return {queue for (names,) in rows for queue in names.split(",") if queue}


def set_queue_paused(conn: Connection, name: str, paused: bool, now: float) -> None:
    """Pause or resume the queue `name` (a queue nobody paused has no row)."""
    if not paused:
        conn.execute(queues.delete().where(queues.c.name == name))
        return
    updated = conn.execute(
        queues.update().where(queues.c.name == name).values(paused=True, updated_at=now)
    )
    if not updated.rowcount:
        conn.execute(queues.insert().values(name=name, paused=True, paused_at=now, updated_at=now))


def take_held(conn: Connection, queue: str, now: float, limit: int) -> list[RunMessage]:
    """Up to `limit` runs held in `queue` while it was paused, no longer marked held: the
    caller publishes them (one it fails to publish is an orphan the sweep publishes later)."""
    taken = (
        sa.select(runs.c.id)
        .where(runs.c.queue == queue, runs.c.held_at.is_not(None), runs.c.state.in_(_WAITING))
        .order_by(runs.c.held_at)
        .limit(limit)
    )
    rows = conn.execute(
        runs.update()
        .where(runs.c.id.in_(taken.scalar_subquery()))
        .values(held_at=None, updated_at=now)
        .returning(runs.c.id, runs.c.task, runs.c.args, runs.c.queue, runs.c.priority)
    )
    return [RunMessage(r.id, r.task, r.args, r.queue, r.priority) for r in rows]


def count_by_state(conn: Connection) -> dict[RunState, int]:
    """How many runs are in each state."""
    rows = conn.execute(sa.select(runs.c.state, sa.func.count()).group_by(runs.c.state))
    return {RunState(state): count for state, count in rows}


def finished_per_minute(conn: Connection, since: float) -> dict[tuple[int, str], int]:
    """Runs that finished since `since`, per (minute since the epoch, state)."""
    # SQLite's CAST truncates (the same as floor for times after 1970) and may lack floor();
    # PostgreSQL's CAST rounds.
    per_minute = runs.c.finished_at / 60
    if conn.dialect.name != "sqlite":
        per_minute = sa.func.floor(per_minute)
    minute = sa.cast(per_minute, sa.Integer).label("minute")
    query = (
        sa.select(minute, runs.c.state, sa.func.count().label("n"))
        .where(runs.c.finished_at >= since)
        .group_by(minute, runs.c.state)
    )
    return {(row.minute, row.state): row.n for row in conn.execute(query)}


def list_running(conn: Connection, limit: int) -> list[Running]:
    """Runs a worker is running now, the longest-running first."""
    query = (
        sa.select(runs)
        .where(runs.c.state.in_(_ACTIVE))
        .order_by(runs.c.attempt_started_at, runs.c.id)
        .limit(limit)
    )
    return [Running(run=_status(row), worker=row.worker) for row in conn.execute(query)]


# --- running (worker side) -------------------------------------------------------------------


@dataclass(frozen=True)
class Claimed:
    """This worker now runs attempt `attempt` of the run."""

    attempt: int
    failures: int
    args: dict[str, JSONValue]


@dataclass(frozen=True)
class Skip:
    """Do not run: the run is finished, cancelled or dead, or held in its paused queue.
    Acknowledge the message."""

    reason: str


@dataclass(frozen=True)
class Park:
    """Not yet: another live worker runs it, or its retry is not due. Look again at `until`."""

    until: float
    reason: str


ClaimOutcome = Claimed | Skip | Park


def claim(
    conn: Connection,
    *,
    run_id: str,
    task: str,
    args: dict[str, JSONValue],
    queue: str | None,
    worker: str,
    now: float,
    stale_after_s: float,
    max_lost_attempts: int,
    is_alive: Callable[[str], bool],
) -> ClaimOutcome:
    """Decide whether this delivery may start a new attempt, and start it if so.

    The common case, a waiting run that is due, is one statement. Otherwise: a message the
    ledger has never seen (sent by plain Celery) gets its run created here; a run still marked
    running is either alive elsewhere (Park) or lost: its worker stopped heart-beating or its
    process is gone, so the attempt is recorded as lost and a new one starts, unless it was
    lost `max_lost_attempts` times, which makes the run dead.
    """
    params = {"run_id": run_id, "worker": worker, "now": now, "due": now + 0.05}
    started = _CLAIM_WAITING.first(conn, params)
    if started is not None:
        return _claimed(conn, task, started, now)
    row = conn.execute(_SELECT_RUN_FOR_UPDATE, {"run_id": run_id}).first()
    if row is None:
        insert_runs(conn, [NewRun(run_id, task, Lane.DURABLE, queue, 0, args, None)], now)
        row = _SELECT_RUN.first(conn, {"run_id": run_id})
    if row.state in _TERMINAL:
        return Skip(f"already {row.state}")
    lost = row.lost
    if row.state in _ACTIVE:
        owner = row.worker or "?"
        heartbeat = row.heartbeat_at or 0.0
        if heartbeat > now - stale_after_s and is_alive(owner):
            return Park(heartbeat + stale_after_s, f"attempt {row.attempts} is alive on {owner}")
        lost += 1
        _INSERT_ATTEMPT.all(
            conn,
            {
                "run_id": run_id,
                "number": row.attempts,
                "worker": owner,
                "started_at": row.attempt_started_at or now,
                "finished_at": now,
                "outcome": "lost",
                "error": f"WorkerLost: {owner} stopped while running this attempt",
                "traceback": None,
            },
        )
        conn.execute(runs.update().where(runs.c.id == run_id).values(lost=lost))
        if lost >= max_lost_attempts:
            error = (
                f"WorkerLost: the worker died during {lost} attempts; the task probably "
                "crashes its process (out of memory, segfault, hard timeout)"
            )
            _finish(conn, row.task, run_id, now, RunState.FAILURE, dead=True, error=error)
            return Skip(error)
    if row.cancel_requested:
        _finish(conn, row.task, run_id, now, RunState.CANCELLED)
        return Skip("cancelled")
    if row.next_attempt_at is not None and row.next_attempt_at > now + 0.05:
        return Park(row.next_attempt_at, "not due yet")
    if row.queue is not None and is_queue_paused(conn, row.queue):
        waiting = row.state if row.state in _WAITING else RunState.PENDING.value
        return _hold(conn, run_id, waiting, row.queue, now)
    # A lost attempt's run, or one created above: start it like a waiting one.
    conn.execute(runs.update().where(runs.c.id == run_id).values(state=RunState.PENDING.value))
    started = _CLAIM_WAITING.first(conn, params)
    if started is None:  # PostgreSQL: its queue was paused since the check above
        return _hold(conn, run_id, RunState.PENDING.value, row.queue, now)
    return _claimed(conn, task, started, now)


def _hold(conn: Connection, run_id: str, state: str, queue: str, now: float) -> Skip:
    conn.execute(
        runs.update().where(runs.c.id == run_id).values(state=state, held_at=now, updated_at=now)
    )
    return Skip(f"queue {queue} is paused; the run waits until it is resumed")


def _claimed(conn: Connection, task: str, started: Any, now: float) -> Claimed:
    stats.count_started(conn, task, now - started.due_at)
    return Claimed(attempt=started.attempts, failures=started.failures, args=started.args)


def _finish(
    conn: Connection,
    task: str,
    run_id: str,
    now: float,
    state: RunState,
    *,
    dead: bool = False,
    error: str | None = None,
    **values: Any,
) -> None:
    """End a run outside an attempt (cancelled while waiting, lost too often, poison)."""
    conn.execute(
        runs.update()
        .where(runs.c.id == run_id)
        .values(
            state=state.value,
            dead=dead,
            error=error,
            finished_at=now,
            updated_at=now,
            heartbeat_at=None,
            next_attempt_at=None,
            **values,
        )
    )
    stats.count_ended(conn, task, state, None)


_ENDED: dict[str, Any] = {"updated_at": _b("now"), "heartbeat_at": None}
_FINISHED = {**_ENDED, "finished_at": _b("now"), "next_attempt_at": None}
# A task that returns after its run was cancelled stopped for the cancel (or would have, had it
# looked): CANCELLED, without its result. Deciding it in the write saves a read per run.
_END_RETURNED = Prepared(
    _END_CURRENT.values(
        state=sa.case(
            (runs.c.cancel_requested, RunState.CANCELLED.value), else_=RunState.SUCCESS.value
        ),
        result=sa.case(
            (runs.c.cancel_requested, sa.null()),
            else_=_b("result", type_=runs.c.result.type),
        ),
        error=None,
        **_FINISHED,
    ).returning(runs.c.state)
)
_END_CANCELLED = Prepared(_END_CURRENT.values(state=RunState.CANCELLED.value, **_FINISHED))
_END_DEAD = Prepared(
    _END_CURRENT.values(
        state=RunState.FAILURE.value,
        dead=True,
        error=_b("error"),
        failures=runs.c.failures + 1,
        **_FINISHED,
    )
)
_END_RETRY = Prepared(
    _END_CURRENT.values(
        state=RunState.RETRY.value,
        error=_b("error"),
        failures=runs.c.failures + 1,
        next_attempt_at=_b("retry_at"),
        **_ENDED,
    )
)


def _end_attempt(
    conn: Connection,
    statement: Prepared,
    params: dict[str, Any],
    outcome: str,
    error: str | None = None,
    traceback: str | None = None,
    *,
    ends_run: RunState | None,
) -> bool:
    """Move the run on with `statement` and write the attempt's history row, in one go; count
    the run if the statement ends it in state `ends_run`.

    False (and nothing written) if this attempt is no longer the run's current one: it was
    declared lost while it ran.
    """
    ended = statement.first(conn, params)
    if ended is None:
        return False
    _insert_attempt(conn, params, ended, outcome, error, traceback)
    if ends_run is not None:
        _count_ended(conn, params, ended, ends_run)
    return True


def _count_ended(conn: Connection, params: dict[str, Any], ended: Any, state: RunState) -> None:
    started = ended.attempt_started_at
    duration = None if started is None else params["now"] - started
    stats.count_ended(conn, ended.task, state, duration)


def _insert_attempt(
    conn: Connection,
    params: dict[str, Any],
    ended: Any,
    outcome: str,
    error: str | None = None,
    traceback: str | None = None,
) -> None:
    _INSERT_ATTEMPT.all(
        conn,
        {
            "run_id": params["run_id"],
            "number": params["attempt"],
            "worker": ended.worker,
            "started_at": ended.attempt_started_at or params["now"],
            "finished_at": params["now"],
            "outcome": outcome,
            "error": error,
            "traceback": traceback,
        },
    )


def finish_returned(
    conn: Connection, run_id: str, attempt: int, result: JSONValue, now: float
) -> RunState | None:
    """The task returned: SUCCESS with the result, or CANCELLED if the run's cancel was asked
    for meanwhile. None (nothing written) if the attempt had been declared lost meanwhile."""
    params = {"run_id": run_id, "attempt": attempt, "now": now, "result": result}
    ended = _END_RETURNED.first(conn, params)
    if ended is None:
        return None
    state = RunState(ended.state)
    outcome = "cancelled" if state is RunState.CANCELLED else "success"
    _insert_attempt(conn, params, ended, outcome)
    _count_ended(conn, params, ended, state)
    return state


def finish_cancelled(conn: Connection, run_id: str, attempt: int, now: float) -> bool:
    """CANCELLED: the task stopped for a cancel (`TaskCancelledError`, raised by the task or
    by the worker after the grace period)."""
    params = {"run_id": run_id, "attempt": attempt, "now": now}
    return _end_attempt(conn, _END_CANCELLED, params, "cancelled", ends_run=RunState.CANCELLED)


def finish_failure(
    conn: Connection,
    run_id: str,
    attempt: int,
    now: float,
    *,
    outcome: str,
    error: str,
    traceback: str | None,
    retry_at: float | None,
) -> bool:
    """A failed attempt: RETRY due at `retry_at`, or FAILURE and dead when `retry_at` is None."""
    params: dict[str, Any] = {"run_id": run_id, "attempt": attempt, "now": now, "error": error}
    if retry_at is None:
        return _end_attempt(
            conn, _END_DEAD, params, outcome, error, traceback, ends_run=RunState.FAILURE
        )
    params["retry_at"] = retry_at
    return _end_attempt(conn, _END_RETRY, params, outcome, error, traceback, ends_run=None)


def bury(
    conn: Connection,
    *,
    run_id: str,
    task: str,
    args: dict[str, JSONValue],
    queue: str | None,
    reason: str,
    now: float,
) -> None:
    """Make a run whose message can never run (poison) dead, with the reason.

    A message the ledger never saw (garbage, or sent by something else) gets a dead run of its
    own, so that every poison message is visible in one place. A finished run is left alone.
    """
    row = conn.execute(_SELECT_RUN_FOR_UPDATE, {"run_id": run_id}).first()
    if row is None:
        insert_runs(conn, [NewRun(run_id, task, Lane.DURABLE, queue, 0, args, None)], now)
    elif row.state in _TERMINAL:
        return
    _finish(conn, task, run_id, now, RunState.FAILURE, dead=True, error=reason)


def record_progress(
    conn: Connection, run_id: str, attempt: int, fraction: float, message: str | None, now: float
) -> None:
    """PROGRESS with the latest fraction and message, for the current attempt only."""
    _RECORD_PROGRESS.all(
        conn,
        {
            "run_id": run_id,
            "attempt": attempt,
            "fraction": fraction,
            "message": None if message is None else message[:500],
            "now": now,
        },
    )


def heartbeat(conn: Connection, run_ids: Sequence[str], now: float) -> None:
    """Mark running attempts alive."""
    conn.execute(
        runs.update()
        .where(runs.c.id.in_(list(run_ids)), runs.c.state.in_(_ACTIVE))
        .values(heartbeat_at=now)
    )


def is_cancel_requested(conn: Connection, run_id: str) -> bool:
    """True once `cancel()` asked this run to stop."""
    row = _IS_CANCEL_REQUESTED.first(conn, {"run_id": run_id})
    return bool(row and row.cancel_requested)


@dataclass(frozen=True)
class RunMessage:
    """What a run's broker message carries: enough to publish it (again)."""

    id: str
    task: str
    args: dict[str, JSONValue]
    queue: str | None
    priority: int


def take_orphans(conn: Connection, now: float, older_than_s: float, limit: int) -> list[RunMessage]:
    """Waiting runs due for `older_than_s` that nothing touched since; marked as taken.

    A broker can lose a message (Redis without persistence restarting; kombu popping a
    message and dying before it records it as unacknowledged). The ledger still knows the
    run, and one more message is harmless: a delivery of a run that already started or
    finished is parked or skipped. Taking a run stamps it, so that concurrent sweepers (and
    the next sweep) leave it alone for another `older_than_s`.
    """
    cutoff = now - older_than_s
    taken = (
        sa.select(runs.c.id)
        .where(
            runs.c.state.in_(_WAITING),
            runs.c.lane == Lane.DURABLE.value,
            runs.c.updated_at < cutoff,
            sa.func.coalesce(runs.c.next_attempt_at, 0.0) < cutoff,
            # A held run waits for its queue's resume, unless that resume did not get to
            # publish it (a broker error, a crash): then it is an orphan like any other.
            sa.or_(
                runs.c.held_at.is_(None),
                ~sa.exists().where(queues.c.name == runs.c.queue, queues.c.paused == sa.true()),
            ),
        )
        .order_by(runs.c.updated_at)
        .limit(limit)
    )
    rows = conn.execute(
        runs.update()
        .where(runs.c.id.in_(taken.scalar_subquery()), runs.c.updated_at < cutoff)
        .values(updated_at=now)
        .returning(runs.c.id, runs.c.task, runs.c.args, runs.c.queue, runs.c.priority)
    )
    return [RunMessage(r.id, r.task, r.args, r.queue, r.priority) for r in rows]


def cancel_requested_among(conn: Connection, run_ids: Sequence[str]) -> list[str]:
    """Which of these running runs someone asked to cancel."""
    rows = conn.execute(
        sa.select(runs.c.id).where(runs.c.id.in_(list(run_ids)), runs.c.cancel_requested)
    )
    return [row.id for row in rows]


def request_cancel(conn: Connection, run_id: str, now: float) -> RunStatus:
    """Cancel a waiting run at once; flag a running one; leave a finished one alone."""
    row = conn.execute(
        sa.select(runs.c.state, runs.c.task).where(runs.c.id == run_id).with_for_update()
    ).first()
    if row is None:
        raise RunNotFoundError(run_id)
    if row.state in (RunState.PENDING.value, RunState.RETRY.value):
        _finish(conn, row.task, run_id, now, RunState.CANCELLED, cancel_requested=True)
    elif row.state in _ACTIVE:
        conn.execute(
            runs.update().where(runs.c.id == run_id).values(cancel_requested=True, updated_at=now)
        )
    return get_status(conn, run_id)


# --- workers ---------------------------------------------------------------------------------


def report_worker(
    conn: Connection,
    *,
    worker_id: str,
    name: str,
    queues: Sequence[str],
    pool: str,
    concurrency: int,
    running: int,
    started_at: float,
    now: float,
) -> None:
    """Record that a worker process is alive (insert it the first time)."""
    values = {
        "name": name,
        "queues": ",".join(queues),
        "pool": pool,
        "concurrency": concurrency,
        "running": running,
        "heartbeat_at": now,
    }
    updated = conn.execute(workers.update().where(workers.c.id == worker_id).values(**values))
    if updated.rowcount == 0:
        conn.execute(workers.insert().values(id=worker_id, started_at=started_at, **values))


def forget_worker(conn: Connection, worker_id: str) -> None:
    """A worker that stopped cleanly leaves the list."""
    conn.execute(workers.delete().where(workers.c.id == worker_id))


def count_live_workers(conn: Connection, now: float, stale_after_s: float) -> int:
    """Worker processes that reported within `stale_after_s` (alive, as `list_workers` says)."""
    alive = sa.select(sa.func.count()).where(workers.c.heartbeat_at >= now - stale_after_s)
    return int(conn.execute(alive).scalar_one())


def list_workers(
    conn: Connection, now: float, stale_after_s: float, keep_dead_s: float = 3600.0
) -> list[WorkerStatus]:
    """Workers that reported within `keep_dead_s`, newest first; older rows are removed."""
    conn.execute(workers.delete().where(workers.c.heartbeat_at < now - keep_dead_s))
    rows = conn.execute(sa.select(workers).order_by(workers.c.started_at.desc()))
    found = []
    for row in rows:
        found.append(
            WorkerStatus(
                id=row.id,
                name=row.name,
                queues=row.queues.split(",") if row.queues else [],
                pool=row.pool,
                concurrency=row.concurrency,
                running=row.running,
                started_at=datetime.fromtimestamp(row.started_at, UTC),
                heartbeat_at=datetime.fromtimestamp(row.heartbeat_at, UTC),
                alive=row.heartbeat_at >= now - stale_after_s,
            )
        )
    return found
