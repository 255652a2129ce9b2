"""Workers killed with SIGKILL at random moments while 500 runs are in flight, repeatedly."""

from __future__ import annotations

import functools
import os
import random
import sqlite3
import time
from pathlib import Path

import pytest

from offload import RunState
from offload.ledger import queries
from tests.contract.conftest import BROKERS, world_at
from tests.support import broker_of, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(420)]

RUNS = 500
KILLS = 3


def effects_table(path: Path) -> Path:
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE effects (run_id TEXT PRIMARY KEY, attempt INT, pid INT)")
    return path


@pytest.mark.parametrize("broker", BROKERS)
def test_random_sigkills_lose_no_run_and_repeat_no_effect(broker: str, tmp_path: Path) -> None:
    # OFFLOAD_TEST_SEED=<seed> replays a failed drill's kill moments and task durations.
    seed = int(os.environ.get("OFFLOAD_TEST_SEED") or random.randrange(1_000_000))
    rng = random.Random(seed)
    effects = effects_table(tmp_path / "effects.sqlite")
    with (
        broker_of(broker, tmp_path) as endpoint,
        world_at(
            broker,
            "sqlite",
            endpoint.url,
            f"sqlite:///{tmp_path / 'ledger.sqlite'}",
            tmp_path,
            endpoint.options,
            # A run may be caught by every kill; it is not a crash loop.
            OFFLOAD_MAX_LOST_ATTEMPTS=str(KILLS + 2),
        ) as world,
    ):
        # Given 500 runs in flight
        runs = world.task("effect").defer_many_sync(
            {"ledger": str(effects), "ms": rng.randint(10, 60)} for _ in range(RUNS)
        )

        def succeeded() -> int:
            done: int = world.jobs.ledger.read(queries.count_by_state).get(RunState.SUCCESS, 0)
            return done

        def done_at_least(count: float) -> bool:
            return succeeded() >= count

        # When every worker process is killed with SIGKILL at random moments of the work,
        # three times (each after a random share of the runs is done)
        worker = world.worker.start()
        try:
            for kill, share in enumerate(sorted(rng.uniform(0.1, 0.8) for _ in range(KILLS))):
                wait_until(functools.partial(done_at_least, share * RUNS), 120, f"{share:.0%}")
                time.sleep(rng.uniform(0, 0.05))
                worker.kill9()
                worker = world.new_worker(f"after-kill-{kill}").start()
            # Then every run succeeds, and each run's effect is there exactly once
            deadline = time.monotonic() + 120
            while succeeded() < RUNS and time.monotonic() < deadline:
                time.sleep(0.1)
            if succeeded() < RUNS:
                stuck = [r for r in runs if r.status_sync().state is not RunState.SUCCESS][:5]
                detail = [(r.id, r.status_sync(), world.jobs.ledger.attempts(r.id)) for r in stuck]
                counts = world.jobs.ledger.read(queries.count_by_state)
                pytest.fail(f"seed {seed}: not all runs succeeded: {counts}; e.g. {detail}")
        finally:
            worker.stop()
        counts = world.jobs.ledger.read(queries.count_by_state)
        assert counts == {RunState.SUCCESS: RUNS}, f"seed {seed}"
        with sqlite3.connect(effects) as db:
            recorded = {row[0] for row in db.execute("SELECT run_id FROM effects")}
        assert recorded == {run.id for run in runs}, f"seed {seed}"
        lost = sum(
            1
            for run in runs
            for attempt in world.jobs.ledger.attempts(run.id)
            if attempt.outcome == "lost"
        )
        assert lost > 0, "no kill caught a run in flight: the drill proved nothing"
