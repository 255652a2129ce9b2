"""Declaring schedules: a schedule that cannot work fails at import, with what to change."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from offload import Offload, Task, TaskArgumentsError, TaskDefinitionError
from offload.core.schedule import Schedule


@pytest.fixture
def jobs(tmp_path: Path) -> Offload:
    return Offload(data_dir=tmp_path)


@pytest.fixture
def report(jobs: Offload) -> Task[..., str]:
    @jobs.task
    def report(kind: str, pages: int = 1) -> str:
        return kind * pages

    return report


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cron": "61 * * * *"}, "is not a cron expression"),
        ({"cron": "0 3 * * * *"}, "cron takes five fields"),
        ({"cron": "0 3 * * *", "timezone": "Europe/Pariss"}, "unknown time zone 'Europe/Pariss'"),
        ({"cron": "0 3 * * *", "every": 60}, "give cron= or every=, not both"),
        ({}, "give cron= or every=, not both"),
        ({"every": 0.5}, "every= takes whole seconds"),
        ({"every": timedelta(0)}, "every= must be at least 1 s"),
        ({"every": 60, "catch_up": "sometimes"}, "catch_up must be 'once', 'skip' or 'all'"),
        ({"every": 60, "max_catch_up": 0}, "max_catch_up must be at least 1"),
    ],
)
def test_a_schedule_that_cannot_fire_is_refused(
    jobs: Offload, report: Task[..., str], options: dict[str, object], message: str
) -> None:
    with pytest.raises(TaskDefinitionError, match=message):
        jobs.schedule(report, args={"kind": "x"}, **options)  # type: ignore[arg-type]
    assert jobs.schedules == {}


def test_arguments_are_validated_when_the_schedule_is_declared(
    jobs: Offload, report: Task[..., str]
) -> None:
    with pytest.raises(TaskArgumentsError, match="pages"):
        jobs.schedule(report, every=60, args={"kind": "x", "pages": "many"})
    with pytest.raises(TaskArgumentsError, match="kind"):
        jobs.schedule(report, every=60)
    declared = jobs.schedule(report, every=timedelta(minutes=5), args={"kind": "x", "pages": "2"})
    assert declared.args == {"kind": "x", "pages": 2}
    assert declared.spec == "every 300s"


def test_one_task_may_have_several_schedules_with_their_own_names(
    jobs: Offload, report: Task[..., str]
) -> None:
    jobs.schedule(report, cron="0 3 * * *", timezone="Europe/Paris", args={"kind": "daily"})
    with pytest.raises(TaskDefinitionError, match="'report' is already declared; give the second"):
        jobs.schedule(report, cron="0 * * * *", args={"kind": "hourly"})
    jobs.schedule(report, cron="0 * * * *", args={"kind": "hourly"}, name="hourly")
    assert sorted(jobs.schedules) == ["hourly", "report"]
    assert jobs.schedules["report"].spec == "cron 0 3 * * * Europe/Paris"
    assert Schedule.from_spec("report", "report", "cron 0 3 * * * Europe/Paris").next_fire(0) == (
        jobs.schedules["report"].next_fire(0)
    )


def test_periodic_declares_the_task_and_its_schedule(jobs: Offload) -> None:
    @jobs.periodic(every=timedelta(hours=1))
    @jobs.task(retries=2)
    def tidy() -> None: ...

    assert jobs.tasks["tidy"] is tidy
    assert jobs.schedules["tidy"].every_s == 3600


def test_inline_tasks_and_other_apps_tasks_cannot_be_scheduled(jobs: Offload) -> None:
    @jobs.task(lane="inline")
    async def ping() -> None: ...

    with pytest.raises(TaskDefinitionError, match="schedules run durable tasks"):
        jobs.schedule(ping, every=60)

    other = Offload(data_dir=jobs.settings.data_dir)

    @other.task
    def elsewhere() -> None: ...

    with pytest.raises(TaskDefinitionError, match="not a task of this app"):
        jobs.schedule(elsewhere, every=60)
