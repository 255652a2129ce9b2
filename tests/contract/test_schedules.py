"""Schedules on SQLite and PostgreSQL ledgers: fire times through DST and restarts, catch-up,
one run per fire with several schedulers, and handover when the lease holder dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from offload import Offload, RunFilter, RunState, RunStatus
from offload.lanes.durable.scheduler import TICK_S, Scheduler
from tests.apps import scheduled
from tests.support import ROOT, WorkerProcess, free_port, ledger_url, offload_cli, wait_until

PARIS = ZoneInfo("Europe/Paris")


@pytest.fixture(params=["sqlite", "postgres"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with ledger_url(request.param, tmp_path) as url:
        yield url


class Clock:
    """The test's clock: it moves only when the test says."""

    def __init__(self, start: datetime) -> None:
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now


def settings(tmp_path: Path, ledger: str) -> dict[str, Any]:
    return {
        "broker_url": f"sqlite:///{tmp_path / 'broker.sqlite'}",
        "ledger_url": ledger,
        "data_dir": tmp_path,
    }


def fires(jobs: Offload, schedule: str) -> list[RunStatus]:
    runs = jobs.list_runs_sync(RunFilter(schedule=schedule), limit=1000).runs
    return sorted(runs, key=lambda run: run.scheduled_for or run.created_at)


def paris(runs: list[RunStatus]) -> list[str]:
    return [f"{r.scheduled_for.astimezone(PARIS):%m-%d %H:%M%z}" for r in runs if r.scheduled_for]


def tick_until(scheduler: Scheduler, done: Any, timeout: float, what: str) -> Any:
    """Tick on the real clock (as `offload beat` does) until `done()`."""

    def ticked() -> Any:
        time.sleep(scheduler.tick())
        return done()

    return wait_until(ticked, timeout, what)


def walk(scheduler: Scheduler, clock: Clock, until: datetime, step: timedelta) -> None:
    while clock.now < until.timestamp():
        scheduler.tick()
        clock.now += step.total_seconds()


def test_cron_fires_at_its_times_across_a_restart_and_both_dst_changes(
    ledger: str, tmp_path: Path
) -> None:
    # Given Paris schedules (daily 02:30, every half hour) and a scheduler on the test's clock
    clock = Clock(datetime(2026, 3, 27, 12, tzinfo=PARIS))
    jobs = scheduled.build_clocked(clock, **settings(tmp_path, ledger))
    step = timedelta(minutes=13)  # never a whole fire period: ticks fall anywhere
    walk(jobs.scheduler(), clock, datetime(2026, 3, 29, 1, 10, tzinfo=PARIS), step)

    # When the scheduler's process restarts just before clocks go 02:00 -> 03:00, and later
    # runs through the night clocks go 03:00 -> 02:00
    jobs.close()
    jobs = scheduled.build_clocked(clock, **settings(tmp_path, ledger))
    try:
        scheduler = jobs.scheduler()
        walk(scheduler, clock, datetime(2026, 3, 30, 12, tzinfo=PARIS), step)
        clock.now = datetime(2026, 10, 24, 12, tzinfo=PARIS).timestamp()
        walk(scheduler, clock, datetime(2026, 10, 25, 4, 10, tzinfo=PARIS), step)

        # Then the daily 02:30 fired once a day, at 03:00 on the day 02:30 did not exist
        daily = fires(jobs, "daily")
        assert paris(daily) == [
            "03-28 02:30+0100",
            "03-29 03:00+0200",
            "03-30 02:30+0200",
            # months without a scheduler: caught up once, for the latest (catch_up="once")
            "10-24 02:30+0200",
            "10-25 02:30+0200",
        ]
        # and the half-hourly one skipped what the spring night lacks and fired the repeated
        # autumn hour once
        half = paris(fires(jobs, "half-hourly"))
        spring = half.index("03-29 00:00+0100")
        assert half[spring : spring + 8] == [
            "03-29 00:00+0100",
            "03-29 00:30+0100",
            "03-29 01:00+0100",
            "03-29 01:30+0100",
            "03-29 03:00+0200",
            "03-29 03:30+0200",
            "03-29 04:00+0200",
            "03-29 04:30+0200",
        ]
        autumn = half.index("10-25 00:00+0200")
        assert half[autumn:] == [
            "10-25 00:00+0200",
            "10-25 00:30+0200",
            "10-25 01:00+0200",
            "10-25 01:30+0200",
            "10-25 02:00+0200",
            "10-25 02:30+0200",
            "10-25 03:00+0100",
            "10-25 03:30+0100",
            "10-25 04:00+0100",
        ]
        # every fire is a run that names its schedule and fire time
        assert all(run.schedule == "half-hourly" for run in fires(jobs, "half-hourly"))

        # When the clock jumps back two hours and the scheduler goes over that time again
        counted = len(fires(jobs, "half-hourly"))
        clock.now -= 2 * 3600
        walk(scheduler, clock, datetime(2026, 10, 25, 4, 10, tzinfo=PARIS), step)
        # Then no fire runs twice
        assert len(fires(jobs, "half-hourly")) == counted
        listed = {s.name: s for s in jobs.list_schedules_sync()}
        assert listed["half-hourly"].next_fire_at == datetime(2026, 10, 25, 4, 30, tzinfo=PARIS)
        assert listed["daily"].last_run_state is RunState.PENDING
    finally:
        jobs.close()


def test_missed_fires_follow_each_schedules_catch_up_policy(ledger: str, tmp_path: Path) -> None:
    # Given four ten-minute schedules, one per policy, that a scheduler has started
    clock = Clock(datetime(2026, 12, 1, 9, 0, 30, tzinfo=UTC))
    jobs = Offload(clock=clock, **settings(tmp_path, ledger))

    @jobs.task
    def sweep(area: str) -> str:
        return area

    policies: dict[str, dict[str, Any]] = {
        "once": {"catch_up": "once"},
        "skip": {"catch_up": "skip"},
        "all": {"catch_up": "all"},
        "all-capped": {"catch_up": "all", "max_catch_up": 3},
    }
    for name, options in policies.items():
        jobs.schedule(sweep, every=timedelta(minutes=10), args={"area": name}, name=name, **options)
    try:
        scheduler = jobs.scheduler()
        scheduler.tick()  # first fires at 09:10

        # When no scheduler runs from 09:00:30 to 10:05 (fires 09:10 ... 10:00 missed)
        clock.now = datetime(2026, 12, 1, 10, 5, tzinfo=UTC).timestamp()
        scheduler.tick()

        # Then each policy ran what it promises
        def minutes(name: str) -> list[str]:
            return [f"{r.scheduled_for:%H:%M}" for r in fires(jobs, name) if r.scheduled_for]

        assert minutes("once") == ["10:00"]
        assert minutes("skip") == []  # 10:00 is five minutes late
        assert minutes("all") == ["09:10", "09:20", "09:30", "09:40", "09:50", "10:00"]
        assert minutes("all-capped") == ["09:40", "09:50", "10:00"]

        # and on time, skip runs too
        clock.now = datetime(2026, 12, 1, 10, 10, 20, tzinfo=UTC).timestamp()
        scheduler.tick()
        assert minutes("skip") == ["10:10"]
        assert {jobs.get_run_sync(r.id).args["area"] for r in fires(jobs, "all-capped")} == {
            "all-capped"
        }
    finally:
        jobs.close()


def holds(scheduler: Scheduler) -> bool:
    return scheduler.holding


def test_a_hung_lease_holder_is_replaced_once_its_lease_runs_out(
    ledger: str, tmp_path: Path
) -> None:
    # Given two schedulers on other machines (so neither can tell whether the other's process
    # lives) and an every-second schedule that catches up every fire
    clock = Clock(datetime(2026, 12, 1, 9, 0, 0, tzinfo=UTC))
    jobs = scheduled.build(clock=clock, scheduler_lease_s=5, **settings(tmp_path, ledger))
    try:
        first = Scheduler(
            jobs.ledger, jobs.schedules, jobs.tasks, jobs.durable.publish,
            lease_s=5, clock=clock, identity="machine-a:100:1",
        )  # fmt: skip
        second = Scheduler(
            jobs.ledger, jobs.schedules, jobs.tasks, jobs.durable.publish,
            lease_s=5, clock=clock, identity="machine-b:200:1",
        )  # fmt: skip
        for _ in range(3):
            first.tick()
            second.tick()
            clock.now += 1
        assert holds(first)
        assert not holds(second)

        # When the holder hangs (it stops ticking) for ten seconds
        handed_over_at = None
        for _ in range(10):
            second.tick()
            if holds(second) and handed_over_at is None:
                handed_over_at = clock.now
            clock.now += 1
        # Then the standby takes over at its first tick after the lease ran out: the bound is
        # the lease (5 s after the last renewal, at 09:00:02) plus one tick
        last_renewal = datetime(2026, 12, 1, 9, 0, 2, tzinfo=UTC).timestamp()
        assert handed_over_at == last_renewal + 5 + TICK_S

        # When the old holder wakes up and ticks before noticing
        first.tick()
        second.tick()
        # Then it fired nothing: every second has exactly one run, none lost
        assert not holds(first)
        seconds = [r.scheduled_for for r in fires(jobs, "every_second")]
        assert len(seconds) == len(set(seconds))
        assert [s.timestamp() for s in seconds if s] == [
            datetime(2026, 12, 1, 9, 0, 1, tzinfo=UTC).timestamp() + n for n in range(13)
        ]
        lease = jobs.scheduler_lease_sync()
        assert lease is not None
        assert lease.holder == "machine-b:200:1"
    finally:
        jobs.close()


def beat_env(tmp_path: Path, ledger: str, lease_s: float) -> dict[str, str]:
    return {
        "OFFLOAD_BROKER_URL": f"sqlite:///{tmp_path / 'broker.sqlite'}",
        "OFFLOAD_LEDGER_URL": ledger,
        "OFFLOAD_DATA_DIR": str(tmp_path),
        "OFFLOAD_SCHEDULER_LEASE_S": str(lease_s),
    }


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.timeout(180)
def test_three_then_two_schedulers_fire_each_second_once_and_survive_sigkill(
    ledger: str, tmp_path: Path
) -> None:
    # Given three `offload beat` processes on one ledger, an every-second schedule
    lease_s = 3.0
    env = beat_env(tmp_path, ledger, lease_s)
    beats = [
        WorkerProcess("tests.apps.scheduled:jobs", env, tmp_path / f"beat{n}.log", command="beat")
        for n in range(3)
    ]
    jobs = scheduled.build(**settings(tmp_path, ledger))
    try:
        for beat in beats:
            beat.start()
        holder = wait_until(jobs.scheduler_lease_sync, 60, "a scheduler to take the lease")
        started = time.time()
        time.sleep(25)

        # When the lease holder is killed with SIGKILL, and the two others run on
        [killed] = [b for b in beats if b.process and f":{b.process.pid}:" in holder.holder]
        killed.kill9()
        killed_at = time.time()
        time.sleep(25)
        for beat in beats:
            beat.stop()
        stopped = time.time()

        # Then another took over and every second from start to stop ran exactly once
        runs = fires(jobs, "every_second")
        at = [r.scheduled_for.timestamp() for r in runs if r.scheduled_for]
        assert len(at) == len(set(at))
        assert at == [at[0] + n for n in range(len(at))]  # none lost
        assert at[0] <= started + 1
        assert at[-1] >= stopped - 2
        assert len(at) >= 50
        # and no fire waited longer than the handover bound
        late = {
            r.scheduled_for: (r.created_at - r.scheduled_for).total_seconds()
            for r in runs
            if r.scheduled_for
        }
        bound = lease_s + TICK_S + 3.0  # slack for a loaded two-core machine
        assert max(late.values()) <= bound, sorted(late.items(), key=lambda kv: -kv[1])[:3]
        after_kill = [v for k, v in late.items() if k.timestamp() > killed_at]
        assert after_kill
        assert max(after_kill) <= bound
        new_holder = jobs.scheduler_lease_sync()
        assert new_holder is None or new_holder.holder != holder.holder  # released on stop
        for beat in beats:
            assert "Traceback" not in beat.log(), beat.log()
    finally:
        for beat in beats:
            if beat.process is not None:
                beat.stop()
        jobs.close()


def test_cli_lists_pauses_resumes_and_runs_a_schedule_now(tmp_path: Path) -> None:
    # Given the app's every-second schedule fired once by a scheduler
    with ledger_url("sqlite", tmp_path) as url:
        env = beat_env(tmp_path, url, 10)
        jobs = scheduled.build(**settings(tmp_path, url))
        try:
            scheduler = jobs.scheduler()
            tick_until(scheduler, lambda: fires(jobs, "every_second"), 10, "a fire")
            app = ["--app", "tests.apps.scheduled:jobs"]

            listed = offload_cli("schedules", "list", "--json", env=env)
            assert listed.returncode == 0, listed.stderr
            [row] = json.loads(listed.stdout)
            assert row["name"] == "every_second"
            assert row["spec"] == "every 1s"
            assert row["paused"] is False
            assert row["last_run_id"] is not None

            # When it is paused
            paused = offload_cli("schedules", "pause", "every_second", "--json", env=env)
            assert paused.returncode == 0, paused.stderr
            assert json.loads(paused.stdout)[0]["paused"] is True
            # Then it fires no more, however long the scheduler runs
            count = len(fires(jobs, "every_second"))
            for _ in range(3):
                time.sleep(0.5)
                scheduler.tick()
            assert len(fires(jobs, "every_second")) == count
            table = offload_cli("schedules", "list", env=env)
            assert "paused" in table.stdout
            assert "no scheduler is running" not in table.stdout

            # When it is resumed, it fires again from then on (what it missed does not run)
            asked_at = time.time()
            resumed = offload_cli("schedules", "resume", "every_second", "--json", env=env)
            [row] = json.loads(resumed.stdout)
            assert row["paused"] is False
            next_fire = datetime.fromisoformat(row["next_fire_at"])
            assert next_fire.timestamp() > asked_at
            later = tick_until(
                scheduler, lambda: fires(jobs, "every_second")[count:], 10, "a fire after resume"
            )
            # (its first fire is the one resume announced, after it was asked: none from the pause)
            assert later[0].scheduled_for == next_fire

            # When it is run now, by hand
            now = offload_cli("schedules", "run-now", "every_second", "--json", *app, env=env)
            assert now.returncode == 0, now.stderr
            run = json.loads(now.stdout)
            assert run["schedule"] == "every_second"
            assert run["state"] == "PENDING"
            listed_runs = offload_cli(
                "runs", "list", "--schedule", "every_second", "--json", env=env
            )
            assert run["id"] in {r["id"] for r in json.loads(listed_runs.stdout)}

            # And a name that is no schedule says which are
            unknown = offload_cli("schedules", "pause", "nightly", env=env)
            assert unknown.returncode == 1
            assert "No schedule named 'nightly'; known: every_second" in unknown.stderr
            no_app = offload_cli("schedules", "run-now", "every_second", env=env)
            assert no_app.returncode == 2
            assert "--app" in no_app.stderr
        finally:
            jobs.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_serve_runs_the_scheduler_and_its_fires_run_on_the_embedded_worker(
    tmp_path: Path,
) -> None:
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
    env = {**clean, "OFFLOAD_DATA_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "serve.log", "wb") as log:
        command = ["serve", "tests.apps.scheduled:app", "--port", str(port)]
        serve = subprocess.Popen(
            [sys.executable, "-m", "offload", *command],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            base = f"http://127.0.0.1:{port}"
            jobs = Offload(data_dir=tmp_path)

            def succeeded() -> list[RunStatus]:
                if not (tmp_path / "ledger.sqlite").exists():
                    return []
                where = RunFilter(schedule="every_second", states=(RunState.SUCCESS,))
                return jobs.list_runs_sync(where).runs

            done = wait_until(succeeded, 90, "a fire to run on the embedded worker")
            assert done[0].result == "tick"
            status = httpx.get(f"{base}/tasks/{done[0].id}", timeout=5).json()
            assert status["schedule"] == "every_second"
            jobs.close()
        finally:
            os.killpg(serve.pid, signal.SIGTERM)
            serve.wait(timeout=60)
    assert "scheduler for 1 schedule(s)" in (tmp_path / "serve.log").read_text()
