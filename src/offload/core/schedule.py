"""Schedules: when a periodic task fires. Time arithmetic only; the ledger keeps their state.

A fire is named by its time (seconds since the epoch, a whole number), and each fire is at
most one run: the ledger refuses a second run for the same (schedule, fire time).

Cron expressions are read by croniter on the wall clock of the schedule's time zone:
- a fire in an hour the clock skips (02:30 when clocks go 02:00 -> 03:00) happens once, at
  the first minute that exists (03:00); several fires in the skipped hour are one fire;
- an hour the clock repeats (02:00-03:00 twice when clocks go back) fires once, the first
  time through.

`every=` schedules count real seconds, aligned to the epoch: `every=timedelta(minutes=5)`
fires at :00, :05, ... UTC, whatever the time zone, and the same on every scheduler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from pydantic import BaseModel, ConfigDict

from offload.core.run import JSONValue, RunState
from offload.errors import TaskDefinitionError

CatchUp = Literal["once", "skip", "all"]
"""What a scheduler does with fires it missed (it was down, or the schedule was new):
`once` runs one for the latest, `skip` runs none unless the latest is on time, `all` runs
each (at most `max_catch_up`, the latest ones)."""

ON_TIME_S = 60.0
"""A fire at most this late is on time: `catch_up="skip"` still runs it."""

_MINUTE = timedelta(minutes=1)


@dataclass(frozen=True)
class Schedule:
    """A durable task run periodically with fixed arguments; declared in code, named."""

    name: str
    task: str
    args: dict[str, JSONValue] = field(default_factory=dict)
    cron: str | None = None
    every_s: int | None = None
    timezone: str = "UTC"
    catch_up: CatchUp = "once"
    max_catch_up: int = 100

    def __post_init__(self) -> None:
        if (self.cron is None) == (self.every_s is None):
            raise TaskDefinitionError(f"schedule {self.name!r}: give cron= or every=, not both")
        if self.cron is not None and not croniter.is_valid(self.cron):
            raise TaskDefinitionError(
                f"schedule {self.name!r}: {self.cron!r} is not a cron expression "
                "(five fields: minute hour day-of-month month day-of-week, e.g. '0 3 * * *')"
            )
        if self.cron is not None and len(self.cron.split()) != 5:
            raise TaskDefinitionError(
                f"schedule {self.name!r}: cron takes five fields (minute hour day month "
                f"weekday); got {self.cron!r}; for seconds use every="
            )
        if self.every_s is not None and self.every_s < 1:
            raise TaskDefinitionError(f"schedule {self.name!r}: every= must be at least 1 s")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise TaskDefinitionError(
                f"schedule {self.name!r}: unknown time zone {self.timezone!r} "
                "(an IANA name such as 'Europe/Paris' or 'UTC')"
            ) from None
        if self.catch_up not in ("once", "skip", "all"):
            raise TaskDefinitionError(
                f"schedule {self.name!r}: catch_up must be 'once', 'skip' or 'all'"
            )
        if self.max_catch_up < 1:
            raise TaskDefinitionError(f"schedule {self.name!r}: max_catch_up must be at least 1")

    @classmethod
    def from_spec(cls, name: str, task: str, spec: str) -> Schedule:
        """The timing of a schedule from its `spec` (as the ledger stores it), no arguments."""
        kind, _, rest = spec.partition(" ")
        if kind == "every":
            return cls(name=name, task=task, every_s=int(rest.removesuffix("s")))
        expression, _, zone = rest.rpartition(" ")
        return cls(name=name, task=task, cron=expression, timezone=zone)

    @property
    def spec(self) -> str:
        """When it fires, as the CLI and the ledger show it: `cron 0 3 * * * Europe/Paris`."""
        if self.cron is not None:
            return f"cron {self.cron} {self.timezone}"
        return f"every {self.every_s}s"

    def next_fire(self, after: float) -> float:
        """The first fire time strictly after `after`."""
        if self.cron is None:
            assert self.every_s is not None
            return float((math.floor(after / self.every_s) + 1) * self.every_s)
        zone = ZoneInfo(self.timezone)
        fires = croniter(self.cron, _wall(after, zone))
        while True:
            fire = _instant(fires.get_next(datetime), zone)
            if fire > after:  # a wall time of a repeated hour may map to a passed instant
                return fire

    def fires(self, since: float, until: float, limit: int) -> list[float]:
        """Fire times from `since` to `until` (both included): the latest `limit`, oldest
        first."""
        if until < since or limit < 1:
            return []
        if self.cron is None:
            assert self.every_s is not None
            step = self.every_s
            last = math.floor(until / step)
            first = max(math.ceil(since / step), last - limit + 1)
            return [float(n * step) for n in range(first, last + 1)]
        zone = ZoneInfo(self.timezone)
        found: list[float] = []
        earlier = croniter(self.cron, _wall(until, zone) + _MINUTE)
        while len(found) < limit:
            fire = _instant(earlier.get_prev(datetime), zone)
            if fire < since:
                break
            if fire <= until and (not found or fire != found[-1]):
                found.append(fire)
        return found[::-1]


def _wall(moment: float, zone: ZoneInfo) -> datetime:
    """`moment` on the zone's wall clock, as a naive datetime (what croniter iterates)."""
    return datetime.fromtimestamp(moment, zone).replace(tzinfo=None)


def _instant(wall: datetime, zone: ZoneInfo) -> float:
    """When the zone's clock shows `wall`: the first time if it shows it twice, the first
    minute that exists after it if the clock skips it."""
    while _wall(wall.replace(tzinfo=zone).timestamp(), zone) != wall:
        wall = wall.replace(second=0, microsecond=0) + _MINUTE
    return wall.replace(tzinfo=zone, fold=0).timestamp()


class ScheduleStatus(BaseModel):
    """A schedule as the ledger knows it: what it runs, when it fires next, what it last did."""

    model_config = ConfigDict(frozen=True)

    name: str
    task: str
    spec: str  #: `cron 0 3 * * * Europe/Paris` or `every 300s`
    args: dict[str, JSONValue]
    catch_up: CatchUp
    paused: bool
    next_fire_at: datetime | None  #: None while paused
    last_fire_at: datetime | None
    last_run_id: str | None
    last_run_state: RunState | None  #: None if it never fired or that run was deleted


class SchedulerLease(BaseModel):
    """Which scheduler fires the schedules: one holds the lease, the others stand by."""

    model_config = ConfigDict(frozen=True)

    holder: str  #: host:pid:start of the scheduler's process
    expires_at: datetime
