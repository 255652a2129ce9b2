"""Benchmark: what one durable publish costs the producer, offload's message vs Celery's.

Run: ``.venv/bin/python bench/publish_cost.py [--rounds 5] [--calls 2000] [--brokers ...]``

offload builds the Celery protocol-2 message of a durable run itself and publishes it through
kombu; when a receiver hooks Celery's `before_task_publish` or `after_task_publish` signal (a
tracing library, say) it lets Celery's `apply_async` send it instead. Both paths live in
`DurableLane._send`, so this script measures them in one process, interleaved, on each broker,
with no worker running:

* **offload message**: `jobs.durable.publish(task, [(run_id, call)])`, as `defer()` does;
* **Celery apply_async**: the same call with a no-op `before_task_publish` receiver connected;
* **defer_sync**: the whole `defer_sync()` (validation, ledger INSERT, publish); on the
  embedded default (`sqlite`) one transaction writes the run and its message, while
  `sqlite-two-files` keeps the broker in a file of its own (a commit, then a publish).

Prints CPU µs per call (medians of the rounds, with the min-max range) and the ratio of the
two publish paths. Touches: Redis database 6 (flushed before and after), a RabbitMQ queue of
its own on the default vhost (deleted at the end), a temporary directory for SQLite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from celery import signals  # noqa: E402

from offload import Offload  # noqa: E402

TWO_FILES = "two files"
BROKERS = {
    "sqlite": None,  # the embedded default: the ledger's file, one commit per defer
    "sqlite-two-files": TWO_FILES,  # broker.sqlite apart: a commit, then a publish
    "redis": "redis://127.0.0.1:6379/6",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672//",
}
VARIANTS = ["offload message", "Celery apply_async", "defer_sync"]


def _hooked(*_: Any, **__: Any) -> None:
    """A `before_task_publish` receiver that does nothing: it only makes Celery publish."""


def measure(jobs: Offload, calls: int) -> dict[str, float]:
    """CPU µs per call of each variant, once."""
    noop = jobs.tasks["bench_publish_noop"]

    def publish() -> None:
        for index in range(calls):
            call = noop.prepare((), {"tag": index})
            jobs.durable.publish(noop, [(uuid.uuid4().hex, call)])

    def through_celery() -> None:
        signals.before_task_publish.connect(_hooked, weak=False)
        try:
            publish()
        finally:
            signals.before_task_publish.disconnect(_hooked)

    def defer() -> None:
        for index in range(calls):
            noop.defer_sync(tag=index)

    loops: dict[str, Callable[[], None]] = {
        "offload message": publish,
        "Celery apply_async": through_celery,
        "defer_sync": defer,
    }
    costs = {}
    for name, loop in loops.items():
        began = time.process_time()
        loop()
        costs[name] = (time.process_time() - began) / calls * 1e6
    return costs


def bench_broker(broker: str, url: str | None, rounds: int, calls: int) -> dict[str, list[float]]:
    data_dir = tempfile.mkdtemp(prefix="offload-bench-publish-")
    queue = f"offload-bench-publish-{os.getpid()}"
    if url == TWO_FILES:
        url = f"sqlite:///{data_dir}/broker.sqlite"
    jobs = Offload(broker_url=url, data_dir=data_dir, default_queue=queue)

    @jobs.task(name="bench_publish_noop")
    def noop(tag: int) -> int:
        return tag

    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    try:
        _purge(jobs, broker, queue)
        measure(jobs, min(calls, 200))  # warm: connections, declarations, prepared statements
        for _ in range(rounds):
            for name, value in measure(jobs, calls).items():
                samples[name].append(value)
            _purge(jobs, broker, queue)
    finally:
        _purge(jobs, broker, queue, delete=True)
        jobs.close()
        shutil.rmtree(data_dir, ignore_errors=True)
    return samples


def _purge(jobs: Offload, broker: str, queue: str, delete: bool = False) -> None:
    if broker == "sqlite":
        return  # the temporary directory goes, with its broker file
    if broker == "redis":
        import redis

        redis.Redis.from_url(BROKERS["redis"] or "").flushdb()
        return
    with jobs.celery.connection_for_write() as connection:
        channel: Any = connection.default_channel
        try:
            if delete:
                channel.queue_delete(queue)
            else:
                channel.queue_purge(queue)
        except Exception:  # noqa: BLE001 - a queue never declared has nothing to purge
            return


def median_range(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000, help="per variant and round")
    parser.add_argument("--brokers", nargs="*", default=list(BROKERS), choices=list(BROKERS))
    args = parser.parse_args()
    print(f"{args.calls} calls per variant, {args.rounds} interleaved rounds; CPU µs per call")
    print("| broker | offload message | Celery apply_async | defer_sync | apply_async / offload |")
    print("|---|---|---|---|---|")
    for broker in args.brokers:
        samples = bench_broker(broker, BROKERS[broker], args.rounds, args.calls)
        ratios = [
            celery / ours
            for celery, ours in zip(
                samples["Celery apply_async"], samples["offload message"], strict=True
            )
        ]
        print(
            f"| {broker} | {median_range(samples['offload message'])} "
            f"| {median_range(samples['Celery apply_async'])} "
            f"| {median_range(samples['defer_sync'])} "
            f"| {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
