"""Benchmark: offload's durable lane against raw Celery, side by side, on this machine.

Run: ``.venv/bin/python bench/throughput.py [--rounds 3] [--runs 5000] [--systems ...]``

For each system, in interleaved rounds (the machine is shared and noisy; medians count):

* **runs/s**: one producer defers N no-op runs in a plain loop (`defer_sync` / `.delay`) while
  the workers consume; from the first enqueue to the last result *stored* (the ledger's
  SUCCESS row for offload, the result-backend key for Celery);
* **drain/s**: N runs queued in bulk while the workers are stopped, then the workers alone,
  from their start to the last result stored (their capacity, without a producer competing
  for the same two cores);
* **enqueue/s**: the producer loop alone, and offload's `defer_many_sync` (one transaction and
  one broker batch per 500 runs) into stopped workers;
* **start p50/p99**: enqueue→start latency over 300 sequential runs (the task's first line);
* **worker CPU ms/run** over the N runs, and idle worker CPU % over 5 s.

Systems (every one acks late and stores results):

| id | what |
|---|---|
| celery-default | raw Celery on Redis, `-P prefork -c 2`, default settings, Redis result backend |
| celery-offload-settings | raw Celery on Redis with offload's worker layout and settings (¹) |
| offload-redis | offload on Redis, SQLite ledger (`offload worker`, defaults) |
| offload-sqlite | offload on its embedded SQLite broker and SQLite ledger: nothing installed |
| offload-sqlite-two-files | the same with broker and ledger in two files (²) |

(¹) two `-P threads -c 4` consumers, prefetch 1, reject on worker lost, Redis result backend.
(²) not run unless named: the layout before the default shared one file, where a defer
commits the run and then publishes its message (two write transactions).

Ratios printed at the end: offload-redis vs celery-default (target >= 2x) and vs
celery-offload-settings (target >= 1x); offload-sqlite vs celery-default; the defer_many rate.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
REDIS_DB = 14
REDIS_RESULT_DB = 15
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
RESULT_URL = f"redis://127.0.0.1:6379/{REDIS_RESULT_DB}"
SYSTEMS = ["celery-default", "celery-offload-settings", "offload-redis", "offload-sqlite"]
TWO_FILES = "offload-sqlite-two-files"


class Collector:
    """A datagram socket the tasks report their start time to."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "collector.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)

    def receive(self, timeout: float) -> tuple[str, float] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(256)
        except TimeoutError:
            return None
        tag, stamp = data.decode().split()
        return tag, float(stamp)

    def drain(self) -> None:
        while self.receive(0.0001) is not None:
            pass


@dataclass
class System:
    """How to start one system's workers and send it runs."""

    name: str
    workdir: Path
    collector: Collector
    env: dict[str, str] = field(default_factory=dict)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    offload: Any = None
    celery: Any = None

    def __post_init__(self) -> None:
        self.env = {
            **os.environ,
            # This checkout's offload, also when another one is installed editable.
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
            "BENCH_COLLECTOR": self.collector.path,
        }
        if self.name.startswith("offload"):
            broker = REDIS_URL if self.name == "offload-redis" else None
            self.env["OFFLOAD_DATA_DIR"] = str(self.workdir)
            if broker:
                self.env["OFFLOAD_BROKER_URL"] = broker
            elif self.name == TWO_FILES:
                self.env["OFFLOAD_BROKER_URL"] = f"sqlite:///{self.workdir / 'broker.sqlite'}"
            else:
                self.env.pop("OFFLOAD_BROKER_URL", None)
            self.env.pop("OFFLOAD_LEDGER_URL", None)
        else:
            self.env["BENCH_BROKER_URL"] = REDIS_URL
            self.env["BENCH_RESULT_URL"] = RESULT_URL
            if self.name == "celery-offload-settings":
                self.env["BENCH_TUNED"] = "1"

    def worker_commands(self) -> list[list[str]]:
        python = sys.executable
        if self.name.startswith("offload"):
            return [[python, "-m", "offload", "worker", "bench.apps:jobs"]]
        common = [
            python,
            "-m",
            "celery",
            "-A",
            "bench.apps:raw_celery",
            "worker",
            "--loglevel=WARNING",
        ]
        if self.name == "celery-default":
            return [[*common, "-P", "prefork", "-c", "2", "-n", "default@%h"]]
        flags = ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        return [[*common, "-P", "threads", "-c", "4", "-n", f"t{i}@%h", *flags] for i in range(2)]

    def start_workers(self) -> None:
        log = open(self.workdir / "worker.log", "ab")  # noqa: SIM115 - lives with the workers
        for command in self.worker_commands():
            self.processes.append(
                subprocess.Popen(
                    command, env=self.env, cwd=ROOT, stdout=log, stderr=log, start_new_session=True
                )
            )

    def stop_workers(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()

    def worker_cpu_s(self) -> float:
        total = 0.0
        for process in self.processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                root = psutil.Process(process.pid)
                for p in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        times = p.cpu_times()
                        total += times.user + times.system
        return total

    def client(self) -> None:
        """Build the in-process producer with the same environment as the workers."""
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(self.env)
        try:
            for name in [m for m in sys.modules if m == "bench.apps"]:
                del sys.modules[name]
            import bench.apps as apps
        finally:
            os.environ.clear()
            os.environ.update(saved)
        if self.name.startswith("offload"):
            self.offload = apps.jobs
            self.noop = apps.noop
        else:
            self.celery = apps.raw_celery
            self.raw_task = apps.raw_celery.tasks["raw_noop"]

    def send(self, tag: str) -> None:
        if self.offload is not None:
            self.noop.defer_sync(tag=tag)
        else:
            self.raw_task.delay(tag=tag)

    def send_many(self, tags: list[str]) -> None:
        """Bulk enqueue: offload's defer_many, or Celery's apply_async in a kombu batch."""
        for start in range(0, len(tags), 500):
            chunk = tags[start : start + 500]
            if self.offload is not None:
                self.noop.defer_many_sync({"tag": t} for t in chunk)
                continue
            with self.celery.producer_or_acquire() as producer, producer.batch(max_size=500):
                for tag in chunk:
                    self.raw_task.apply_async(kwargs={"tag": tag}, producer=producer)

    def stored(self) -> int:
        """How many results are stored."""
        if self.offload is not None:
            from offload import RunState
            from offload.ledger import queries

            counts = self.offload.ledger.read(queries.count_by_state)
            return int(counts.get(RunState.SUCCESS, 0))
        client = redis.Redis.from_url(RESULT_URL)
        try:
            return sum(1 for _ in client.scan_iter("celery-task-meta-*", count=1000))
        finally:
            client.close()

    def close(self) -> None:
        if self.offload is not None:
            self.offload.close()
        if self.celery is not None:
            self.celery.close()


def flush_redis() -> None:
    for db in (REDIS_DB, REDIS_RESULT_DB):
        client = redis.Redis(host="127.0.0.1", port=6379, db=db)
        client.flushdb()
        client.close()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


@contextlib.contextmanager
def running(name: str, root: Path) -> Iterator[System]:
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    flush_redis()
    collector = Collector(workdir)
    system = System(name, workdir, collector)
    system.client()
    system.start_workers()
    try:
        # Warm up: the first runs pay for connections and imports.
        for i in range(50):
            system.send(f"warm-{i}")
        wait_until(
            lambda: system.stored() >= 50,
            60,
            f"{name}: workers did not start (see {workdir}/worker.log)",
        )
        time.sleep(1.0)
        collector.drain()
        yield system
    finally:
        system.stop_workers()
        system.close()
        collector.sock.close()
        shutil.rmtree(workdir, ignore_errors=True)


def measure(name: str, runs: int, root: Path) -> dict[str, float]:
    result: dict[str, float] = {}
    with running(name, root) as system:
        # Idle CPU of the worker tree.
        cpu0 = system.worker_cpu_s()
        time.sleep(5.0)
        result["idle_cpu_pct"] = (system.worker_cpu_s() - cpu0) / 5.0 * 100
        # Throughput, with the workers consuming while the producer runs.
        base = system.stored()
        cpu0 = system.worker_cpu_s()
        t0 = time.perf_counter()
        for i in range(runs):
            system.send(f"t-{i}")
        t_enqueued = time.perf_counter()
        wait_until(lambda: system.stored() >= base + runs, 600, f"{name}: {runs} results")
        t_done = time.perf_counter()
        result["enqueue_per_s"] = runs / (t_enqueued - t0)
        result["runs_per_s"] = runs / (t_done - t0)
        result["worker_cpu_ms_per_run"] = (system.worker_cpu_s() - cpu0) / runs * 1000
        system.collector.drain()
        # Latency: enqueue -> start, sequentially.
        latencies = []
        for i in range(300):
            tag = f"l-{i}"
            sent = time.time()
            system.send(tag)
            while True:
                got = system.collector.receive(10.0)
                if got is None:
                    raise TimeoutError(f"{name}: run {tag} never started")
                if got[0] == tag:
                    latencies.append((got[1] - sent) * 1000)
                    break
        latencies.sort()
        result["start_p50_ms"] = statistics.median(latencies)
        result["start_p99_ms"] = latencies[int(len(latencies) * 0.99) - 1]
        # Drain capacity: fill the queue with the workers stopped, then time the workers alone.
        system.stop_workers()
        base = system.stored()
        tags = [f"b-{i}" for i in range(runs)]
        t0 = time.perf_counter()
        system.send_many(tags)
        if system.offload is not None:
            result["defer_many_per_s"] = runs / (time.perf_counter() - t0)
        system.start_workers()
        # Time from the first stored result on, so that worker start-up does not count.
        wait_until(lambda: system.stored() > base, 120, f"{name}: drain start")
        t0, cpu0, first = time.perf_counter(), system.worker_cpu_s(), system.stored()
        wait_until(lambda: system.stored() >= base + runs, 600, f"{name}: drain")
        drained = base + runs - first
        result["drain_per_s"] = drained / (time.perf_counter() - t0)
        result["drain_cpu_ms_per_run"] = (system.worker_cpu_s() - cpu0) / drained * 1000
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5000)
    parser.add_argument("--systems", nargs="*", default=SYSTEMS, choices=[*SYSTEMS, TWO_FILES])
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="offload-bench-"))
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in args.systems}
    try:
        for round_number in range(1, args.rounds + 1):
            for name in args.systems:
                print(f"round {round_number}/{args.rounds}: {name} ...", flush=True)
                samples[name].append(measure(name, args.runs, root))
                print("   ", {k: round(v, 2) for k, v in samples[name][-1].items()}, flush=True)
    finally:
        flush_redis()
        shutil.rmtree(root, ignore_errors=True)

    def med(name: str, key: str) -> float:
        values = [s[key] for s in samples[name] if key in s]
        return statistics.median(values) if values else float("nan")

    def spread(name: str, key: str) -> str:
        values = [s[key] for s in samples[name] if key in s]
        if not values:
            return "-"
        return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"

    print(
        f"\n{args.runs} no-op runs, one producer; median (min-max) of {args.rounds} rounds; "
        f"{os.cpu_count()} cores"
    )
    header = (
        f"{'system':<26}{'runs/s':>18}{'drain/s':>18}{'enqueue/s':>18}"
        f"{'defer_many/s':>18}{'start p50 ms':>14}{'p99 ms':>9}{'CPU ms/run':>12}"
        f"{'idle CPU %':>12}"
    )
    print(header)
    print("-" * len(header))
    for name in args.systems:
        print(
            f"{name:<26}{spread(name, 'runs_per_s'):>18}{spread(name, 'drain_per_s'):>18}"
            f"{spread(name, 'enqueue_per_s'):>18}"
            f"{spread(name, 'defer_many_per_s'):>18}{med(name, 'start_p50_ms'):>14.2f}"
            f"{med(name, 'start_p99_ms'):>9.2f}{med(name, 'worker_cpu_ms_per_run'):>12.2f}"
            f"{med(name, 'idle_cpu_pct'):>12.2f}"
        )
    print()
    for ours, theirs, target in [
        ("offload-redis", "celery-default", 2.0),
        ("offload-redis", "celery-offload-settings", 1.0),
        ("offload-sqlite", "celery-default", 1.0),
        ("offload-sqlite", TWO_FILES, 1.0),
    ]:
        if ours not in samples or theirs not in samples:
            continue
        for key, label in [("runs_per_s", "end to end"), ("drain_per_s", "drain")]:
            ratio = med(ours, key) / med(theirs, key)
            verdict = "meets" if ratio >= target else "MISSES"
            print(f"{ours} / {theirs} {label}: {ratio:.2f}x ({verdict} the {target:g}x target)")


if __name__ == "__main__":
    main()
