"""The ledger's side of schedules: their state, their fires, and the scheduler's lease.

A fire is one transaction: the schedule's `next_fire_at` moves on only if it still holds what
the scheduler read (so a second scheduler, or a first one that lost its lease while paused,
changes nothing), and the runs carry (schedule, fire time), which a unique index keeps to one
run per fire.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from offload.core.run import RunState
from offload.core.schedule import Schedule, SchedulerLease, ScheduleStatus
from offload.errors import ScheduleNotFoundError
from offload.ledger import queries
from offload.ledger.schema import leases, runs, schedules

SCHEDULER_LEASE = "scheduler"


# --- the lease ---------------------------------------------------------------------------------


def take_lease(
    conn: Connection, holder: str, now: float, lease_s: float, *, from_holder: str | None = None
) -> bool:
    """Take or renew the scheduler's lease for `lease_s`; False while another holds it.

    `from_holder`: take it from that holder even before it expires (its process is gone).
    """
    until = now + lease_s
    mine_or_free = sa.or_(leases.c.holder == holder, leases.c.expires_at < now)
    if from_holder is not None:
        mine_or_free = sa.or_(mine_or_free, leases.c.holder == from_holder)
    renewed = conn.execute(
        leases.update()
        .where(leases.c.name == SCHEDULER_LEASE, mine_or_free)
        .values(holder=holder, expires_at=until)
    ).rowcount
    if renewed:
        return True
    # The first scheduler ever: schedulers starting together race for this insert.
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    taken = conn.execute(
        insert(leases)
        .values(name=SCHEDULER_LEASE, holder=holder, expires_at=until)
        .on_conflict_do_nothing()
        .returning(leases.c.name)
    ).first()
    return taken is not None


def release_lease(conn: Connection, holder: str) -> None:
    """Give the lease up (a scheduler stopping), so that a standby takes it at once."""
    conn.execute(leases.delete().where(leases.c.name == SCHEDULER_LEASE, leases.c.holder == holder))


def get_lease(conn: Connection) -> SchedulerLease | None:
    row = conn.execute(sa.select(leases).where(leases.c.name == SCHEDULER_LEASE)).first()
    if row is None:
        return None
    expires = queries.as_datetime(row.expires_at)
    assert expires is not None
    return SchedulerLease(holder=row.holder, expires_at=expires)


# --- schedules ---------------------------------------------------------------------------------


def sync(conn: Connection, declared: Sequence[Schedule], now: float) -> None:
    """Make the ledger's schedules the declared ones, keeping each one's pause and fires.

    A new schedule first fires at its next fire time after `now`; one whose timing changed
    starts again from `now`; a schedule no longer declared is removed.
    """
    rows = {row.name: row for row in conn.execute(sa.select(schedules))}
    for schedule in declared:
        values = _declared_values(schedule)
        row = rows.pop(schedule.name, None)
        if row is None:
            ensure(conn, schedule, now)
        elif any(getattr(row, key) != value for key, value in values.items()):
            if row.spec != schedule.spec and not row.paused:
                values["next_fire_at"] = schedule.next_fire(now)
            conn.execute(
                schedules.update()
                .where(schedules.c.name == schedule.name)
                .values(updated_at=now, **values)
            )
    if rows:
        conn.execute(schedules.delete().where(schedules.c.name.in_(list(rows))))


def _declared_values(schedule: Schedule) -> dict[str, object]:
    return {
        "task": schedule.task,
        "spec": schedule.spec,
        "args": schedule.args,
        "catch_up": schedule.catch_up,
    }


def ensure(conn: Connection, schedule: Schedule, now: float) -> None:
    """Record a declared schedule the ledger does not know yet (it first fires at its next
    fire time after `now`); leave a known one alone."""
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    conn.execute(
        insert(schedules)
        .values(
            name=schedule.name,
            paused=False,
            next_fire_at=schedule.next_fire(now),
            updated_at=now,
            **_declared_values(schedule),
        )
        .on_conflict_do_nothing()
    )


def due(conn: Connection, now: float) -> list[tuple[str, float]]:
    """(name, next fire time) of every schedule not paused whose next fire has come."""
    rows = conn.execute(
        sa.select(schedules.c.name, schedules.c.next_fire_at).where(
            schedules.c.paused == sa.false(), schedules.c.next_fire_at <= now
        )
    )
    return [(row.name, row.next_fire_at) for row in rows]


def next_fire_at(conn: Connection) -> float | None:
    """The earliest next fire of any schedule not paused."""
    return conn.execute(
        sa.select(sa.func.min(schedules.c.next_fire_at)).where(schedules.c.paused == sa.false())
    ).scalar()


def record_fire(
    conn: Connection,
    name: str,
    seen_next: float,
    following: float,
    fires: Sequence[queries.NewRun],
    now: float,
) -> list[str]:
    """Move `name`'s next fire from `seen_next` to `following` and insert the runs of its
    fires; the ids of the runs inserted.

    Nothing is written if the schedule's next fire is no longer `seen_next` (another scheduler
    fired it); a fire that already has its run is left out.
    """
    moved = conn.execute(
        schedules.update()
        .where(
            schedules.c.name == name,
            schedules.c.next_fire_at == seen_next,
            schedules.c.paused == sa.false(),
        )
        .values(next_fire_at=following, updated_at=now)
    ).rowcount
    if not moved or not fires:
        return []
    return _insert_fires(conn, name, fires, now)


def _insert_fires(
    conn: Connection, name: str, fires: Sequence[queries.NewRun], now: float
) -> list[str]:
    taken = set(
        conn.execute(
            sa.select(runs.c.scheduled_for).where(
                runs.c.schedule == name,
                runs.c.scheduled_for.in_([fire.scheduled_for for fire in fires]),
            )
        ).scalars()
    )
    fresh = [fire for fire in fires if fire.scheduled_for not in taken]
    if not fresh:
        return []
    queries.insert_runs(conn, fresh, now)
    last = fresh[-1]
    conn.execute(
        schedules.update()
        .where(schedules.c.name == name)
        .values(last_fire_at=last.scheduled_for, last_run_id=last.id)
    )
    return [fire.id for fire in fresh]


def record_run_now(conn: Connection, schedule: Schedule, fire: queries.NewRun, now: float) -> None:
    """A fire asked for by hand (`run-now`): a run of the schedule, its next fire unchanged."""
    ensure(conn, schedule, now)
    _insert_fires(conn, schedule.name, [fire], now)


def set_paused(conn: Connection, name: str, paused: bool, now: float) -> ScheduleStatus:
    """Pause a schedule, or resume it: then it next fires at its first fire time after `now`
    (fires it missed while paused are not caught up)."""
    row = _get_row(conn, name)
    values: dict[str, object] = {"paused": paused, "updated_at": now}
    if paused:
        values["next_fire_at"] = None
    elif row.paused:
        timing = Schedule.from_spec(name, row.task, row.spec)
        values["next_fire_at"] = timing.next_fire(now)
    conn.execute(schedules.update().where(schedules.c.name == name).values(**values))
    return get_status(conn, name)


def _get_row(conn: Connection, name: str) -> sa.Row[tuple[object, ...]]:
    row = conn.execute(sa.select(schedules).where(schedules.c.name == name)).first()
    if row is None:
        raise _not_found(conn, name)
    return row


def _not_found(conn: Connection, name: str) -> ScheduleNotFoundError:
    return ScheduleNotFoundError(name, conn.execute(sa.select(schedules.c.name)).scalars().all())


def _listing() -> sa.Select[tuple[object, ...]]:
    return sa.select(schedules, runs.c.state.label("last_run_state")).join(
        runs, runs.c.id == schedules.c.last_run_id, isouter=True
    )


def _schedule_status(row: sa.Row[tuple[object, ...]]) -> ScheduleStatus:
    mapping = row._mapping
    state = mapping["last_run_state"]
    return ScheduleStatus(
        name=mapping["name"],
        task=mapping["task"],
        spec=mapping["spec"],
        args=mapping["args"],
        catch_up=mapping["catch_up"],
        paused=bool(mapping["paused"]),
        next_fire_at=queries.as_datetime(mapping["next_fire_at"]),
        last_fire_at=queries.as_datetime(mapping["last_fire_at"]),
        last_run_id=mapping["last_run_id"],
        last_run_state=RunState(state) if state is not None else None,
    )


def get_status(conn: Connection, name: str) -> ScheduleStatus:
    row = conn.execute(_listing().where(schedules.c.name == name)).first()
    if row is None:
        raise _not_found(conn, name)
    return _schedule_status(row)


def list_statuses(conn: Connection) -> list[ScheduleStatus]:
    return [_schedule_status(row) for row in conn.execute(_listing().order_by(schedules.c.name))]
