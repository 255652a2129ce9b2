"""Benchmark: how long one retention batch holds a SQLite ledger's write lock.

Run: ``.venv/bin/python bench/retention.py [--runs 20000] [--batches 25,100,200] [--rounds 60]``

The workers' retention deletes finished runs in batches, one write transaction each
(`ledger.retention.purge`); while a batch holds SQLite's write lock, every `defer()` and every
run that ends waits. This fills a ledger in a temporary directory with `--runs` finished runs
of three attempts each (with tracebacks, like failed tries leave), then times `--rounds`
batches of each size as the workers make them, and a trivial one-row write transaction as the
baseline, in the same process. Prints medians and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from sqlalchemy.engine import Connection  # noqa: E402

from offload.core.run import RunFilter  # noqa: E402
from offload.ledger import queries  # noqa: E402
from offload.ledger.database import Ledger  # noqa: E402
from offload.ledger.schema import attempts, runs  # noqa: E402

MONTH_S = 30 * 86400.0


def fill(ledger: Ledger, count: int) -> None:
    """`count` runs that finished a month ago, each after three attempts."""
    then = time.time() - MONTH_S

    def insert(conn: Connection) -> None:
        conn.execute(
            runs.insert(),
            [
                {
                    "id": f"run-{index:07d}",
                    "task": "report",
                    "lane": "durable",
                    "queue": "default",
                    "state": "SUCCESS",
                    "args": {"user_id": index, "kind": "pdf"},
                    "result": f"reports/{index}.pdf",
                    "attempts": 3,
                    "failures": 2,
                    "created_at": then + index * 0.01,
                    "started_at": then + index * 0.01,
                    "finished_at": then + index * 0.01 + 1,
                    "updated_at": then,
                }
                for index in range(count)
            ],
        )
        conn.execute(
            attempts.insert(),
            [
                {
                    "run_id": f"run-{index:07d}",
                    "number": number,
                    "worker": "host:1:1",
                    "started_at": then,
                    "finished_at": then,
                    "outcome": "error" if number < 3 else "success",
                    "error": "ConnectionError: provider down" if number < 3 else None,
                    "traceback": "Traceback (most recent call last):\n  ...\n" * 10,
                }
                for index in range(count)
                for number in (1, 2, 3)
            ],
        )

    ledger.write(insert)


def timed_ms(ledger: Ledger, work: Callable[[Connection], object]) -> float:
    """Milliseconds one write transaction doing `work` takes."""
    started = time.perf_counter()
    ledger.write(work)
    return (time.perf_counter() - started) * 1000


def measure(size: int, count: int, rounds: int) -> tuple[float, float]:
    """Median ms of a retention batch of `size` and of a one-row write, in a new ledger."""
    directory = tempfile.mkdtemp(prefix="offload-bench-retention-")
    try:
        ledger = Ledger(f"sqlite:///{directory}/ledger.sqlite")
        ledger.ensure_schema()
        fill(ledger, max(count, size * rounds))
        expired = RunFilter(dead=False, finished_before=datetime.fromtimestamp(time.time(), UTC))
        touch = runs.update().where(runs.c.id == "run-0000000").values(updated_at=0.0)
        batch = [
            timed_ms(ledger, lambda c: queries.delete_finished(c, expired, size))
            for _ in range(rounds)
        ]
        trivial = [timed_ms(ledger, lambda c: c.execute(touch)) for _ in range(rounds)]
        ledger.engine.dispose()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return statistics.median(batch), statistics.median(trivial)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--batches", default="25,100,200")
    parser.add_argument("--rounds", type=int, default=60)
    options = parser.parse_args()
    print(f"{options.runs} finished runs, 3 attempts each; {options.rounds} batches per size")
    for size in [int(size) for size in options.batches.split(",")]:
        held, floor = measure(size, options.runs, options.rounds)
        print(
            f"batch of {size:>4}: write lock {held:6.2f} ms median "
            f"(one-row write {floor:.2f} ms, {held / floor:5.1f}x)"
        )


if __name__ == "__main__":
    main()
