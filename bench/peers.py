"""Benchmark: offload against raw Celery and its peers (Dramatiq, arq, RQ, Huey), side by side.

Run: ``.venv/bin/python bench/peers.py [--rounds 3] [--systems ...] [--json out.json]``;
``--quick`` is a smoke check (fewer runs, 1 round, 3 s idle). Needs ``pip install -e '.[bench]'``,
Redis on 127.0.0.1:6379 (databases 10-13 only) and RabbitMQ on 127.0.0.1:5672 (its own vhost);
a system whose service or package is missing is skipped.

Every system runs the same no-op task (one datagram to a collector saying when its body started,
then return its tag, so that every system stores a result) on two worker processes, one per core,
each with its system's default concurrency inside (the settings table says which). Systems run
one after another in interleaved rounds, in a rotated order; each cell is the median (min-max)
of the rounds. In each round, per system: start the workers, warm up with 50 runs, then

* **idle**: CPU % of one core used by the idle worker tree over ``--idle-seconds`` (30), and its
  RSS / PSS / USS (PSS counts the pages forked processes share once). Brokers not included.
  Also the CPU everything else used meanwhile (other users, brokers; 200 % = both cores): a
  gauge of how disturbed the session was. The machine is shared; rerun when it is high.
* **throughput**: one producer sends ``--runs`` (5,000) runs in a plain loop while the workers
  consume. enqueue/s is the loop alone; runs/s is from the first send to the last result
  *stored*; worker CPU ms/run is the worker tree's CPU over that window divided by the runs.
* **latency**: ``--latency-runs`` (500) strictly sequential runs: enqueue->start (the task's
  first line) and enqueue->result (the producer holds the result, through each system's own
  result API; see the settings table for how each one waits).

Then, for offload only, **enqueue cost** per broker (no workers running): calls/s of one asyncio
producer awaiting, one call at a time,

* ``defer``: ``await noop.defer(tag=...)``, the real thing: validation on the loop, then the
  ledger INSERT (PENDING row) and the broker publish on offload's I/O thread;
* ``publish``: the same minus the ledger: ``noop.prepare()`` on the loop, then
  ``await io.run(jobs.durable.publish, noop, [(run_id, call)])``, exactly the publish
  ``defer`` does (Celery ``apply_async`` with offload's retry policy, one pooled producer);
* ``publish-on-loop``: that publish called directly on the loop thread (no thread hop);
* ``ledger``: the same minus the broker: ``prepare()``, then the ledger write ``defer`` does
  (``queries.insert_runs`` in one transaction) on the I/O thread;
* ``thread-hop``: ``prepare()`` and a hop to offload's I/O thread and back doing nothing, the
  part every variant above but ``publish-on-loop`` shares;

and ``execute``: the worker-side wrapper alone, in the benchmark process, one run at a time
(``jobs.durable.executor.execute``: ledger claim -> task body -> ledger SUCCESS; no Celery, no
broker), to set against the worker CPU per run of the throughput table.

Ratios printed at the end: each offload broker vs the best peer for each metric, offload-redis
vs raw Celery on Redis (``celery-redis``: its defaults plus acks late and a result backend),
offload-sqlite vs celery-redis, and offload vs raw Celery on the same broker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python bench/peers.py` imports bench.peers_systems

from bench.peers_systems import (  # noqa: E402
    SYSTEMS,
    Collector,
    OffloadRabbitmq,
    OffloadRedis,
    OffloadSqlite,
    OffloadSystem,
    System,
    Workers,
    delete_vhost,
    flush_redis,
    redis_reachable,
    wait_until,
)

WARMUP = 50
ENQUEUE_BROKERS: dict[str, type[OffloadSystem]] = {
    "sqlite": OffloadSqlite,
    "redis": OffloadRedis,
    "rabbitmq": OffloadRabbitmq,
}
ENQUEUE_VARIANTS = ["defer", "publish", "publish-on-loop", "ledger", "thread-hop"]
Sample = dict[str, float]


# --- one system, one round -----------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def wait_stored(system: System, workers: Workers, target: int, timeout: float, what: str) -> None:
    def done() -> bool:
        if exited := workers.exited():
            raise RuntimeError(f"{system.name}: a worker exited: {exited}")
        return system.stored() >= target

    wait_until(done, timeout, f"{system.name}: {what} (stored {system.stored()} of {target})")


def _box_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores)."""
    times = psutil.cpu_times()
    return float(sum(times)) - times.idle - getattr(times, "iowait", 0.0)


def measure_idle(workers: Workers, seconds: float) -> Sample:
    """The idle worker tree; and how busy everything else kept the machine meanwhile (other
    users' processes and the brokers: a gauge of how disturbed this session's numbers are)."""
    cpu0, box0, own0 = workers.cpu_s(), _box_busy_s(), time.process_time()
    time.sleep(seconds)
    ours = workers.cpu_s() - cpu0
    others = _box_busy_s() - box0 - ours - (time.process_time() - own0)
    sample = {"idle_cpu_pct": ours / seconds * 100, "others_cpu_pct": others / seconds * 100}
    sample.update(workers.memory_mb())
    return sample


def measure_throughput(system: System, workers: Workers, runs: int) -> Sample:
    tags = [f"t-{i}" for i in range(runs)]
    base = system.stored()
    cpu0, producer0 = workers.cpu_s(), time.process_time()
    t0 = time.perf_counter()
    system.produce(tags)
    t_enqueued = time.perf_counter()
    producer_s = time.process_time() - producer0
    wait_stored(system, workers, base + runs, 60 + runs / 20, f"{runs} results")
    t_done = time.perf_counter()
    return {
        "enqueue_per_s": runs / (t_enqueued - t0),
        "runs_per_s": runs / (t_done - t0),
        "worker_cpu_ms_per_run": (workers.cpu_s() - cpu0) / runs * 1000,
        "producer_cpu_us_per_send": producer_s / runs * 1e6,
    }


def measure_latency(system: System, collector: Collector, runs: int, cap_s: float) -> Sample:
    for i in range(10):  # the result path's own connections and subscriptions
        system.result(system.send(f"lw-{i}"), 10.0)
    collector.drain()
    starts: list[float] = []
    results: list[float] = []
    deadline = time.monotonic() + cap_s
    for i in range(runs):
        if time.monotonic() > deadline:
            break
        tag = f"l-{i}"
        sent = time.time()
        handle = system.send(tag)
        value = system.result(handle, 10.0)
        done = time.time()
        if value != tag:
            raise RuntimeError(f"{system.name}: run {tag} returned {value!r}")
        starts.append((collector.started(tag, 10.0) - sent) * 1000)
        results.append((done - sent) * 1000)
    return {
        "start_p50_ms": statistics.median(starts),
        "start_p99_ms": percentile(starts, 99),
        "result_p50_ms": statistics.median(results),
        "result_p99_ms": percentile(results, 99),
        "latency_samples": float(len(results)),
    }


def run_session(cls: type[System], args: argparse.Namespace, root: Path) -> Sample:
    """Start one system's workers, measure idle, throughput and latency, stop everything."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{cls.name}-", dir=root))
    collector = Collector(workdir)
    log = (workdir / "worker.log").open("ab")
    workers = Workers(log)
    system = cls(workdir, collector.path)
    connected = False
    try:
        system.reset_services()
        system.connect()
        connected = True
        for command in system.worker_commands():
            workers.start(command, system.env)
        base = system.stored()
        for i in range(WARMUP):
            system.send(f"w-{i}")
        wait_stored(system, workers, base + WARMUP, 120, "warm-up (did the workers start?)")
        time.sleep(1.0)
        sample = measure_idle(workers, args.idle_seconds)
        sample.update(measure_throughput(system, workers, args.runs))
        sample.update(measure_latency(system, collector, args.latency_runs, args.latency_cap))
        return sample
    except Exception:
        log.flush()
        tail = (workdir / "worker.log").read_text(errors="replace")[-3000:]
        print(f"    worker log tail ({cls.name}):\n{tail}", flush=True)
        raise
    finally:
        workers.stop()
        if connected:
            with contextlib.suppress(Exception):
                system.close()
        with contextlib.suppress(Exception):
            system.cleanup_services()
        collector.close()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


# --- enqueue cost (offload, no workers) ----------------------------------------------------


async def enqueue_variants(jobs: Any, noop: Any, calls: int, order: list[str]) -> Sample:
    from offload.core.run import Lane
    from offload.core.threads import BlockingCalls
    from offload.ledger import queries

    io = BlockingCalls()  # the kind of thread pool `defer` hands durable work to

    def record(call: Any) -> None:
        """The ledger write of `DurableLane.submit`, alone."""
        now = jobs.clock()
        new = [
            queries.NewRun(
                id=uuid.uuid4().hex,
                task=noop.name,
                lane=Lane.DURABLE,
                queue=call.queue,
                priority=call.priority,
                args=call.kwargs,
                idempotency_key=call.idempotency_key,
            )
        ]
        jobs.ledger.write(lambda conn: queries.insert_runs(conn, new, now))

    async def defer(tag: str) -> None:
        await noop.defer(tag=tag)

    async def publish(tag: str) -> None:
        call = noop.prepare((), {"tag": tag})
        await io.run(jobs.durable.publish, noop, [(uuid.uuid4().hex, call)])

    async def publish_on_loop(tag: str) -> None:
        call = noop.prepare((), {"tag": tag})
        jobs.durable.publish(noop, [(uuid.uuid4().hex, call)])

    async def ledger(tag: str) -> None:
        call = noop.prepare((), {"tag": tag})
        await io.run(record, call)

    async def thread_hop(tag: str) -> None:
        noop.prepare((), {"tag": tag})
        await io.run(int)

    variants: dict[str, Callable[[str], Coroutine[Any, Any, None]]] = {
        "defer": defer,
        "publish": publish,
        "publish-on-loop": publish_on_loop,
        "ledger": ledger,
        "thread-hop": thread_hop,
    }
    sample: Sample = {}
    for name in order:
        fn = variants[name]
        for i in range(20):
            await fn(f"{name}-w{i}")
        cpu0, t0 = time.process_time(), time.perf_counter()
        for i in range(calls):
            await fn(f"{name}-{i}")
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        sample[f"{name}_per_s"] = calls / wall
        sample[f"{name}_cpu_us"] = cpu / calls * 1e6
    io.close()
    return sample


def execute_cost(jobs: Any, noop: Any, calls: int) -> Sample:
    """offload's worker-side wrapper alone, in this process: what a worker adds per run to
    Celery's own cost. `Executor.execute` claims the run in the ledger (STARTED), runs the
    task body, records SUCCESS with the result; no broker, no Celery."""
    from offload.core.run import Lane
    from offload.ledger import queries

    executor = jobs.durable.executor
    new = [
        queries.NewRun(
            id=uuid.uuid4().hex,
            task=noop.name,
            lane=Lane.DURABLE,
            queue=noop.queue,
            priority=0,
            args={"tag": f"x-{i}"},
            idempotency_key=None,
        )
        for i in range(calls + 20)
    ]
    jobs.ledger.write(lambda conn: queries.insert_runs(conn, new, jobs.clock()))
    for run in new[:20]:
        executor.execute(noop, run.id, run.args)
    cpu0, t0 = time.process_time(), time.perf_counter()
    for run in new[20:]:
        executor.execute(noop, run.id, run.args)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    if jobs.run(new[-1].id).result_sync(timeout=5) != new[-1].args["tag"]:
        raise RuntimeError("execute: the last run did not succeed")
    return {"execute_per_s": calls / wall, "execute_cpu_us": cpu / calls * 1e6}


def run_enqueue(broker: str, calls: int, root: Path, shift: int) -> Sample:
    cls = ENQUEUE_BROKERS[broker]
    workdir = Path(tempfile.mkdtemp(prefix=f"enqueue-{broker}-", dir=root))
    system = cls(workdir, "")
    connected = False
    try:
        system.reset_services()
        system.connect()
        connected = True
        order = ENQUEUE_VARIANTS[shift:] + ENQUEUE_VARIANTS[:shift]
        sample = asyncio.run(enqueue_variants(system.jobs, system.noop, calls, order))
        sample.update(execute_cost(system.jobs, system.noop, calls))
        return sample
    finally:
        if connected:
            with contextlib.suppress(Exception):
                system.close()
        with contextlib.suppress(Exception):
            system.cleanup_services()
        shutil.rmtree(workdir, ignore_errors=True)


# --- report --------------------------------------------------------------------------------


def source_fingerprint() -> str:
    """A short hash of offload's source: workers import it afresh for every session, so an
    edit during a run would mix two versions of offload in one table."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "src" / "offload").rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def machine() -> dict[str, str]:
    info = {
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError):
        meminfo = Path("/proc/meminfo").read_text().split()
        info["ram"] = f"{int(meminfo[meminfo.index('MemTotal:') + 1]) / 1024**2:.1f} GiB"
    packages = [
        "celery", "kombu", "billiard", "amqp", "redis", "hiredis", "SQLAlchemy", "dramatiq",
        "arq", "rq", "huey", "psutil",
    ]  # fmt: skip
    versions = []
    for package in packages:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{package} {metadata.version(package)}")
    info["packages"] = ", ".join(versions)
    if redis_reachable():
        import redis

        client = redis.Redis(host="127.0.0.1", port=6379)
        info["redis-server"] = str(client.info("server").get("redis_version"))
        client.close()
    with contextlib.suppress(Exception):
        import amqp

        connection = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest")
        connection.connect()
        properties: Any = getattr(connection, "server_properties", {})
        info["rabbitmq"] = str(properties.get("version"))
        connection.close()
    return info


def cell(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    middle = statistics.median(values)
    if len(values) == 1:
        return f"{middle:.{digits}f}"
    return f"{middle:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def table(
    title: str,
    names: list[str],
    samples: dict[str, list[Sample]],
    columns: list[tuple[str, str, int]],
) -> None:
    if not names:
        return
    print(f"\n### {title}\n")
    print("| system | " + " | ".join(label for _, label, _ in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name in names:
        cells = []
        for key, _, digits in columns:
            cells.append(cell([s[key] for s in samples.get(name, []) if key in s], digits))
        print(f"| {name} | " + " | ".join(cells) + " |")


def median_of(samples: dict[str, list[Sample]], name: str, key: str) -> float | None:
    values = [s[key] for s in samples.get(name, []) if key in s]
    return statistics.median(values) if values else None


METRICS = [  # key, label, higher is better
    ("runs_per_s", "end-to-end runs/s", True),
    ("enqueue_per_s", "enqueue/s", True),
    ("worker_cpu_ms_per_run", "worker CPU ms/run", False),
    ("start_p50_ms", "enqueue->start p50", False),
    ("start_p99_ms", "enqueue->start p99", False),
    ("result_p50_ms", "enqueue->result p50", False),
    ("result_p99_ms", "enqueue->result p99", False),
    ("idle_cpu_pct", "idle CPU %", False),
    ("rss_mb", "idle RSS MB", False),
    ("pss_mb", "idle PSS MB", False),
]


def ratios(samples: dict[str, list[Sample]]) -> None:
    def value(name: str, key: str) -> float | None:
        return median_of(samples, name, key)

    def line(ours: str, theirs: str, key: str, label: str, higher: bool) -> None:
        a, b = value(ours, key), value(theirs, key)
        if a is None or b is None or b == 0:
            return
        better = "higher" if higher else "lower"
        print(f"- {label}: {ours} {a:.4g} / {theirs} {b:.4g} = **{a / b:.2f}x** ({better} better)")

    offloads = [n for n in samples if SYSTEMS[n].kind == "offload"]
    peers = [n for n in samples if SYSTEMS[n].kind == "peer"]
    if not samples:
        return
    print("\n### Ratios (medians)\n")
    if peers and offloads:
        print("offload vs the best peer for each metric:")
        for key, label, higher in METRICS:
            present = [(value(p, key), p) for p in peers if value(p, key) is not None]
            if not present:
                continue
            best = max(present)[1] if higher else min(present)[1]
            for ours in offloads:
                line(ours, best, key, label, higher)
    for ours, theirs in [("offload-redis", "celery-redis"), ("offload-sqlite", "celery-redis")]:
        if ours in samples and theirs in samples:
            print(f"\n{ours} vs {theirs} (raw Celery defaults on Redis, acks late, results):")
            for key, label, higher in METRICS:
                line(ours, theirs, key, label, higher)
    pairs = [("offload-sqlite", "celery-sqlite"), ("offload-rabbitmq", "celery-rabbitmq")]
    for ours, theirs in pairs:
        if ours in samples and theirs in samples:
            print(f"\n{ours} vs {theirs} (same broker):")
            for key, label, higher in METRICS[:3]:
                line(ours, theirs, key, label, higher)


def enqueue_report(enqueue: dict[str, list[Sample]]) -> None:
    if not enqueue:
        return
    print("\n### Enqueue cost: one asyncio producer, offload, no workers running\n")
    print("| broker | variant | calls/s | CPU us/call |")
    print("|---|---|---|---|")
    for broker, samples in enqueue.items():
        for variant in [*ENQUEUE_VARIANTS, "execute"]:
            rate = cell([s[f"{variant}_per_s"] for s in samples], 0)
            cpu = cell([s[f"{variant}_cpu_us"] for s in samples], 0)
            print(f"| {broker} | {variant} | {rate} | {cpu} |")
    print()
    for broker, samples in enqueue.items():
        defer = statistics.median(s["defer_per_s"] for s in samples)
        publish = statistics.median(s["publish_per_s"] for s in samples)
        ledger = statistics.median(s["ledger_per_s"] for s in samples)
        hop = statistics.median(s["thread-hop_per_s"] for s in samples)
        print(
            f"- {broker}: defer {1e6 / defer:.0f} us/call; publish {1e6 / publish:.0f} us and "
            f"ledger {1e6 / ledger:.0f} us, each with the thread hop ({1e6 / hop:.0f} us); "
            f"defer runs at x{defer / publish:.2f} the rate of the publish alone"
        )
    execute = [s["execute_cpu_us"] for samples in enqueue.values() for s in samples]
    print(
        f"- execute (worker side, no broker): {statistics.median(execute):.0f} us CPU per run: "
        "offload's share of the worker CPU per run in the throughput table"
    )


def report(
    args: argparse.Namespace,
    names: list[str],
    samples: dict[str, list[Sample]],
    enqueue: dict[str, list[Sample]],
    failures: list[str],
) -> None:
    rounds = f"median (min-max) of {args.rounds} round(s)"
    print(f"\n## Results: {rounds}, {os.cpu_count()} cores\n")
    for key, value in machine().items():
        print(f"- {key}: {value}")
    if names:
        print("\n### Settings\n")
        print("| system | workers and settings | result API in the latency test |")
        print("|---|---|---|")
    for name in names:
        cls = SYSTEMS[name]
        print(f"| {name} | {cls.describe} | {cls.result_api} |")
    table(
        f"Throughput: {args.runs} no-op runs, one producer",
        names,
        samples,
        [
            ("runs_per_s", "end-to-end runs/s", 0),
            ("enqueue_per_s", "enqueue/s", 0),
            ("worker_cpu_ms_per_run", "worker CPU ms/run", 2),
            ("producer_cpu_us_per_send", "producer CPU us/send", 0),
        ],
    )
    table(
        f"Latency: {args.latency_runs} sequential runs (ms)",
        names,
        samples,
        [
            ("start_p50_ms", "enqueue->start p50", 2),
            ("start_p99_ms", "p99", 2),
            ("result_p50_ms", "enqueue->result p50", 2),
            ("result_p99_ms", "p99", 2),
            ("latency_samples", "runs", 0),
        ],
    )
    table(
        f"Idle worker tree over {args.idle_seconds:g} s (brokers not included)",
        names,
        samples,
        [
            ("processes", "processes", 0),
            ("idle_cpu_pct", "CPU % of a core", 2),
            ("rss_mb", "RSS MB", 1),
            ("pss_mb", "PSS MB", 1),
            ("uss_mb", "USS MB", 1),
            ("others_cpu_pct", "meanwhile, others' CPU % (of 200)", 0),
        ],
    )
    enqueue_report(enqueue)
    ratios(samples)
    if failures:
        print("\n### Failures\n")
        for failure in failures:
            print(f"- {failure}")


# --- main ----------------------------------------------------------------------------------


def _stop_on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every `finally`: processes, dirs, Redis


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5000, help="throughput runs per round")
    parser.add_argument("--latency-runs", type=int, default=500)
    parser.add_argument("--latency-cap", type=float, default=120.0, help="seconds per system")
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--enqueue-calls", type=int, default=2000, help="per variant and broker")
    parser.add_argument("--systems", nargs="*", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument(
        "--enqueue-brokers", nargs="*", default=list(ENQUEUE_BROKERS), choices=ENQUEUE_BROKERS
    )
    parser.add_argument("--quick", action="store_true", help="smoke check: small and 1 round")
    parser.add_argument("--json", type=Path, help="also write every sample here")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.runs, args.latency_runs = 1, 500, 50
        args.idle_seconds, args.enqueue_calls = 3.0, 200
    signal.signal(signal.SIGTERM, _stop_on_signal)
    signal.signal(signal.SIGHUP, _stop_on_signal)
    # Two runs at once would flush each other's Redis databases and disturb each other's numbers.
    lock = (Path(tempfile.gettempdir()) / "offload-bench-peers.lock").open("a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit("bench/peers.py: another run holds the lock (it uses Redis databases 10-13)")

    names, failures = [], []
    for name in args.systems:
        if reason := SYSTEMS[name].missing():
            failures.append(f"{name}: skipped, {reason}")
            print(f"skipping {name}: {reason}", flush=True)
        else:
            names.append(name)
    brokers = []
    for broker in args.enqueue_brokers:
        if reason := ENQUEUE_BROKERS[broker].missing():
            failures.append(f"enqueue-{broker}: skipped, {reason}")
        else:
            brokers.append(broker)

    fingerprint = source_fingerprint()
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    enqueue: dict[str, list[Sample]] = {broker: [] for broker in brokers}
    root = Path(tempfile.mkdtemp(prefix="offload-peers-"))
    try:
        for index in range(args.rounds):
            # Rotate the order so that no system always runs first (or right after another).
            shift = index % max(1, len(names))
            for name in names[shift:] + names[:shift]:
                print(f"round {index + 1}/{args.rounds}: {name} ...", flush=True)
                started = time.monotonic()
                try:
                    sample = run_session(SYSTEMS[name], args, root)
                except Exception as exc:  # noqa: BLE001 - one failing system must not stop the rest
                    failures.append(f"round {index + 1} {name}: {type(exc).__name__}: {exc}")
                    print(f"    FAILED: {type(exc).__name__}: {exc}", flush=True)
                    continue
                samples[name].append(sample)
                shown = {k: round(v, 2) for k, v in sample.items()}
                print(f"    {shown} ({time.monotonic() - started:.0f} s)", flush=True)
            for broker in brokers:
                print(f"round {index + 1}/{args.rounds}: enqueue cost, {broker} ...", flush=True)
                try:
                    shift = index % len(ENQUEUE_VARIANTS)
                    got = run_enqueue(broker, args.enqueue_calls, root, shift)
                except Exception as exc:  # noqa: BLE001
                    failures.append(f"round {index + 1} enqueue-{broker}: {exc!r}")
                    print(f"    FAILED: {exc!r}", flush=True)
                    continue
                enqueue[broker].append(got)
                rounded = {k: round(v) for k, v in got.items()}
                print(f"    {rounded}", flush=True)
    finally:
        used = {service for name in names for service in SYSTEMS[name].services}
        used |= {service for b in brokers for service in ENQUEUE_BROKERS[b].services}
        if "redis" in used:
            with contextlib.suppress(Exception):
                flush_redis()
        if "rabbitmq" in used:
            with contextlib.suppress(Exception):
                delete_vhost()
        shutil.rmtree(root, ignore_errors=True)

    if (now := source_fingerprint()) != fingerprint:
        failures.append(f"offload's source changed during the run ({fingerprint} -> {now})")
    else:
        print(f"\noffload source {fingerprint} (sha256 of src/offload/**/*.py), unchanged")
    report(args, names, samples, {b: s for b, s in enqueue.items() if s}, failures)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "systems": samples,
                    "enqueue": enqueue,
                    "failures": failures,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
