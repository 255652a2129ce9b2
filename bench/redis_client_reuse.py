"""Benchmark: kombu's stock Redis transport against offload's, which reuses one redis-py client.

Run: ``.venv/bin/python bench/redis_client_reuse.py [--rounds 5] [--runs 5000]``

Stock kombu builds a ``redis.Redis`` object for every publish, every unacked-bookkeeping write
and every ack; offload's transport builds one per channel (``offload.transport.redis``). Per
transport, in interleaved rounds (the machine is shared and noisy; medians count):

* **publish CPU µs**: the producer's CPU time per message over N single publishes, the way
  offload's durable lane sends one run (``producer_or_acquire()`` + ``apply_async``, retry
  policy), with no worker consuming them (they go to a staging key);
* **drain runs/s**: the N messages are moved onto the workers' queue at once (``RENAME`` of the
  staging list, which wakes the blocked ``BRPOP``); from then to the end of the last no-op run;
* **worker CPU ms/run**: user + system time of both worker processes over the drain (until the
  last ack), divided by N.

Workers: two ``celery worker -P threads -c 4`` processes (``--without-gossip --without-mingle
--without-heartbeat``) with offload's Celery settings (acks late, reject on worker lost, prefetch
multiplier 1, JSON only, results ignored, events off). The no-op task sends one datagram to the
benchmark, so that it sees every end. Transports:

| id | what |
|---|---|
| stock | ``kombu.transport.redis:Transport``, kombu's defaults |
| offload | ``offload.transport.redis:Transport``, offload's defaults |
| offload-no-reuse | offload's with kombu's ``conn_or_acquire`` back: isolates the reuse |

Redis: the shared server on 127.0.0.1:6379, database 0, every key under a ``global_keyprefix``
of the run's own (deleted afterwards; nothing is flushed). ``--db 8``..``13`` runs without a
live prefix on that database instead, flushing it before and after.
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
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis
from celery import Celery, signals
from kombu.transport import redis as kombu_redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from offload.transport import REDIS_TRANSPORT  # noqa: E402
from offload.transport import redis as offload_redis  # noqa: E402

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
QUEUE = "celery"
TASK = "bench.noop"
TRANSPORTS: dict[str, str | None] = {
    "stock": None,  # kombu's own for redis:// URLs
    "offload": REDIS_TRANSPORT,
    "offload-no-reuse": "bench.redis_client_reuse:NoReuseTransport",
}
PUBLISH_OPTIONS: dict[str, Any] = {  # offload.lanes.durable.publish.Publisher, 5 s timeout
    "retry": True,
    "retry_policy": {"max_retries": 10, "interval_start": 0, "interval_step": 0.25,
                     "interval_max": 0.5},
}  # fmt: skip


class _NoReuseChannel(offload_redis.Channel):
    conn_or_acquire = kombu_redis.Channel.conn_or_acquire


class NoReuseTransport(offload_redis.Transport):
    """offload's transport with kombu's client-per-operation ``conn_or_acquire``."""

    Channel = _NoReuseChannel


def make_app(url: str, transport: str | None, prefix: str) -> Celery:
    """A Celery app with offload's settings (`offload.lanes.durable.lane.celery_config`)."""
    app = Celery("bench_redis_client_reuse", set_as_current=False)
    app.conf.update(
        broker_url=url,
        broker_transport=transport,
        broker_transport_options={"global_keyprefix": prefix} if prefix else {},
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_default_queue=QUEUE,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        broker_channel_error_retry=False,
        worker_lost_wait=2.0,
        enable_utc=True,
    )
    app.task(name=TASK, shared=False, acks_late=True, ignore_result=True)(_noop)
    return app


_COLLECTOR = os.environ.get("BENCH_RCR_COLLECTOR", "")
_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
# Blocking, so that no end is lost when the benchmark reads late (the queue holds 10 datagrams).
_sock.settimeout(10)


def _notify(what: str) -> None:
    if _COLLECTOR:
        _sock.sendto(f"{what} {time.time():.6f}".encode(), _COLLECTOR)


def _noop(tag: str) -> None:
    _notify("done")


@signals.worker_ready.connect
def _ready(**_: Any) -> None:
    _notify("ready")


# The app `celery -A bench.redis_client_reuse:app worker` runs, configured by the benchmark.
app = make_app(
    os.environ.get("BENCH_RCR_URL", "memory://"),
    os.environ.get("BENCH_RCR_TRANSPORT") or None,
    os.environ.get("BENCH_RCR_PREFIX", ""),
)


class Collector:
    """The datagram socket the workers report to."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "collector.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)

    def expect(self, what: str, count: int, timeout: float) -> list[float]:
        """The timestamps of the next `count` reports of `what`."""
        stamps: list[float] = []
        deadline = time.monotonic() + timeout
        while len(stamps) < count:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                kind, stamp = self.sock.recv(128).decode().split()
            except TimeoutError:
                raise TimeoutError(f"{len(stamps)}/{count} {what!r} reports") from None
            if kind == what:
                stamps.append(float(stamp))
        return stamps

    def close(self) -> None:
        self.sock.close()


@dataclass
class Workers:
    env: dict[str, str]
    log: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, count: int = 2) -> None:
        with open(self.log, "ab") as log:
            for i in range(count):
                command = [
                    sys.executable, "-m", "celery", "-A", "bench.redis_client_reuse:app",
                    "worker", "-P", "threads", "-c", "4", "-n", f"w{i}-{uuid.uuid4().hex[:6]}@%h",
                    "--without-gossip", "--without-mingle", "--without-heartbeat",
                    "--loglevel=WARNING",
                ]  # fmt: skip
                self.processes.append(
                    subprocess.Popen(command, env=self.env, cwd=ROOT, stdout=log,
                                     stderr=log, start_new_session=True)
                )  # fmt: skip

    def cpu_s(self) -> float:
        total = 0.0
        for process in self.processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                root = psutil.Process(process.pid)
                for p in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        times = p.cpu_times()
                        total += times.user + times.system
        return total

    def stop(self) -> None:
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


def publish(app: Celery, count: int) -> None:
    """`count` single publishes, each the way offload's durable lane sends one run."""
    task = app.tasks[TASK]
    for i in range(count):
        with app.producer_or_acquire() as producer:
            task.apply_async(kwargs={"tag": f"r{i}"}, producer=producer, **PUBLISH_OPTIONS)


def delete_prefixed(admin: redis.Redis, prefix: str) -> None:
    keys = list(admin.scan_iter(match=prefix + "*", count=1000))
    for start in range(0, len(keys), 500):
        admin.delete(*keys[start : start + 500])


def measure(name: str, runs: int, db: int | None, workdir: Path) -> dict[str, float]:
    tag = f"bench-rcr-{uuid.uuid4().hex[:10]}"
    live_prefix = "" if db is not None else f"{tag}:"
    staging_prefix = f"{tag}-staging:"
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{db or 0}"
    admin = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db or 0)
    if db is not None:
        admin.flushdb()
    collector = Collector(workdir)
    workers = Workers(
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "BENCH_RCR_URL": url,
            "BENCH_RCR_TRANSPORT": TRANSPORTS[name] or "",
            "BENCH_RCR_PREFIX": live_prefix,
            "BENCH_RCR_COLLECTOR": collector.path,
        },
        log=workdir / f"{name}.log",
    )
    live = make_app(url, TRANSPORTS[name], live_prefix)
    staging = make_app(url, TRANSPORTS[name], staging_prefix)
    result: dict[str, float] = {}
    try:
        workers.start()
        collector.expect("ready", 2, 60)
        # Warm up: connections, imports, the first deliveries; then let the workers go idle.
        publish(live, 100)
        collector.expect("done", 100, 60)
        publish(staging, 50)  # the producer's connection, declarations and caches
        admin.delete(staging_prefix + QUEUE)
        time.sleep(1.5)

        # The producer alone: its messages wait on the staging key, no worker consumes them.
        cpu0, wall0 = time.process_time(), time.perf_counter()
        publish(staging, runs)
        result["publish_cpu_us"] = (time.process_time() - cpu0) / runs * 1e6
        result["publish_wall_us"] = (time.perf_counter() - wall0) / runs * 1e6
        queued = admin.llen(staging_prefix + QUEUE)
        if queued != runs:
            raise RuntimeError(f"{name}: {queued} of {runs} messages on the staging key")

        # The workers alone, from a full queue.
        time.sleep(0.5)
        cpu0 = workers.cpu_s()
        started = time.time()
        admin.rename(staging_prefix + QUEUE, live_prefix + QUEUE)
        ends = collector.expect("done", runs, 300)
        deadline = time.monotonic() + 30
        while admin.hlen(live_prefix + "unacked") and time.monotonic() < deadline:
            time.sleep(0.005)
        result["worker_cpu_ms"] = (workers.cpu_s() - cpu0) / runs * 1e3
        result["drain_per_s"] = runs / (max(ends) - started)
    finally:
        workers.stop()
        live.close()
        staging.close()
        collector.close()
        os.unlink(collector.path)
        if db is not None:
            admin.flushdb()
        else:
            delete_prefixed(admin, live_prefix)
        delete_prefixed(admin, staging_prefix)
        admin.close()
    return result


METRICS = [
    ("publish_cpu_us", "publish CPU µs"),
    ("publish_wall_us", "publish wall µs"),
    ("worker_cpu_ms", "worker CPU ms/run"),
    ("drain_per_s", "drain runs/s"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=5000)
    parser.add_argument("--transports", nargs="*", default=list(TRANSPORTS), choices=TRANSPORTS)
    parser.add_argument("--db", type=int, choices=range(8, 14), default=None,
                        help="use this database (flushed) without a live key prefix")  # fmt: skip
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="offload-bench-rcr-"))
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in args.transports}
    names: list[str] = args.transports
    try:
        for number in range(args.rounds):
            # Rotate the order, so that no transport always runs first after a pause.
            for name in names[number % len(names) :] + names[: number % len(names)]:
                sample = measure(name, args.runs, args.db, root)
                samples[name].append(sample)
                shown = "  ".join(f"{label} {sample[key]:.2f}" for key, label in METRICS)
                print(f"round {number + 1}/{args.rounds} {name:<17} {shown}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def cell(name: str, key: str) -> str:
        values = [s[key] for s in samples[name]]
        digits = 0 if key != "worker_cpu_ms" else 3
        low, high = min(values), max(values)
        return f"{statistics.median(values):.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"

    def median(name: str, key: str) -> float:
        return statistics.median(s[key] for s in samples[name])

    def paired(name: str, key: str) -> float:
        # Rounds run the transports back to back, so a round's ratio shares its background load.
        pairs = zip(samples[name], samples["stock"], strict=True)
        return statistics.median(ours[key] / stock[key] for ours, stock in pairs)

    where = f"database {args.db}, no live prefix" if args.db is not None else "db 0, key prefix"
    print(
        f"\n{args.runs} no-op runs per sample, median (min-max) of {args.rounds} interleaved "
        f"rounds; 2 workers x -P threads -c 4; {os.cpu_count()} cores; {where}"
    )
    header = f"{'transport':<18}" + "".join(f"{label:>24}" for _, label in METRICS)
    print(header)
    print("-" * len(header))
    for name in names:
        print(f"{name:<18}" + "".join(f"{cell(name, key):>24}" for key, _ in METRICS))
    if "stock" in samples:
        print("\nratio to stock: of the medians; [median of the per-round ratios]")
        for name in names:
            if name == "stock":
                continue
            ratios = "  ".join(
                f"{label} {median(name, key) / median('stock', key):.2f}x "
                f"[{paired(name, key):.2f}x]"
                for key, label in METRICS
            )
            print(f"{name} / stock: {ratios}")


if __name__ == "__main__":
    main()
