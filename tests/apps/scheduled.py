"""Apps with schedules, for the schedule tests.

`jobs` (settings from the `OFFLOAD_*` environment) is what `offload beat` and `offload serve`
processes load: one schedule fires every second and catches up every fire it missed, so a
test can count that each second has exactly one run. `app` serves it. `build_clocked()` has
Paris cron schedules that a test walks through DST changes with its own clock.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from fastapi import FastAPI

from offload import Offload


def build(**settings: Any) -> Offload:
    jobs = Offload(**settings)

    @jobs.periodic(every=timedelta(seconds=1), catch_up="all", max_catch_up=1000)
    @jobs.task
    def every_second() -> str:
        return "tick"

    return jobs


def build_clocked(clock: Callable[[], float], **settings: Any) -> Offload:
    jobs = Offload(clock=clock, **settings)

    @jobs.task
    def report(kind: str) -> str:
        return kind

    jobs.schedule(
        report, cron="30 2 * * *", timezone="Europe/Paris", args={"kind": "daily"}, name="daily"
    )
    jobs.schedule(
        report,
        cron="*/30 * * * *",
        timezone="Europe/Paris",
        args={"kind": "half-hourly"},
        name="half-hourly",
    )
    return jobs


jobs = build()
app = FastAPI(lifespan=jobs.lifespan)
app.include_router(jobs.router, prefix="/tasks")
