"""Benchmark: offload's SQLite transport vs kombu's sqla+sqlite:// vs Celery on Redis.

Run: ``.venv/bin/python bench/transport_sqlite.py [--rounds 3] [--runs 5000]``

For each broker and worker layout it measures, with offload's Celery settings (acks late,
reject on worker lost, prefetch 1, JSON, results ignored):

* no-op runs/s end to end: one producer process sends N runs (``send_task`` in a loop), from the
  first publish to the last completion;
* enqueue→start latency p50/p99 over 300 sequential runs (the task's first line vs the publish;
  40 for kombu-sqla-default, whose 1 s poll makes each one wait ~0.5 s);
* idle CPU of the whole worker tree over 10 s, in % of one core.

kombu's sqla transport runs twice: with its default 1 s poll of an empty queue
(``kombu-sqla-default``) and tuned to 50 ms (``kombu-sqla``).

Layouts: one ``-P prefork -c 2`` worker, one ``-P threads -c 2`` worker, two ``-P solo`` workers.
Rounds are interleaved and each cell is the median (min-max) of the rounds. This module is also
the Celery app the workers run (``celery -A transport_sqlite``), configured by ``BENCH_*`` env.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from celery import Celery, signals

import offload.transport

offload.transport.register()

HERE = Path(__file__).resolve().parent
REDIS_URL = "redis://127.0.0.1:6379/0"
LAYOUTS = {
    "prefork-c2": [["-P", "prefork", "-c", "2"]],
    "threads-c2": [["-P", "threads", "-c", "2"]],
    "2x-solo": [["-P", "solo"], ["-P", "solo"]],
}


def make_app(url: str, transport: str | None, options: dict[str, Any]) -> Celery:
    app = Celery("bench_transport", set_as_current=False)
    app.conf.update(
        broker_url=url,
        broker_transport=transport,
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        worker_hijack_root_logger=False,
    )
    _sender: list[socket.socket] = []

    def report(line: str) -> None:
        if not _sender:  # one per process, created after fork
            _sender.append(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        _sender[0].sendto(line.encode(), os.environ["BENCH_COLLECTOR"])

    @app.task(name="b.noop")
    def noop(i: int) -> None:
        report("d")

    @app.task(name="b.stamp")
    def stamp(i: int) -> None:
        report(f"s {time.time()!r}")

    return app


if os.environ.get("BENCH_BROKER_URL"):  # imported by `celery -A transport_sqlite worker`
    if os.environ["BENCH_BROKER_URL"].startswith("sqla+"):
        import kombu.transport.sqlalchemy

        # Its transport options are forwarded to create_engine(), so only the class attribute
        # can lower the 1 s poll (see notes/celery-engine-facts.md §1.2).
        kombu.transport.sqlalchemy.Transport.polling_interval = float(os.environ["BENCH_SQLA_POLL"])
    app = make_app(
        os.environ["BENCH_BROKER_URL"],
        os.environ.get("BENCH_TRANSPORT") or None,
        json.loads(os.environ.get("BENCH_OPTIONS") or "{}"),
    )

    @signals.worker_ready.connect
    def _ready(**_: Any) -> None:
        Path(os.environ["BENCH_READY"] + f".{os.getpid()}").touch()


@dataclass
class Broker:
    name: str
    url: Callable[[Path], str]
    transport: str | None = None
    options: Callable[[str], dict[str, Any]] = lambda prefix: {}
    runs_cap: int | None = None  # sqla is ~50x slower: fewer runs keep the bench short
    sqla_poll_s: float = 1.0  # kombu's sqla transport polls an empty queue this often
    latency_runs: int = 300

    def cleanup(self, prefix: str) -> None:
        if self.url(Path("/")).startswith("redis"):
            import redis

            client = redis.Redis.from_url(REDIS_URL)
            keys = list(client.scan_iter(match=prefix + "*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()


BROKERS = [
    Broker("offload-sqlite", lambda d: f"sqlite:///{d / 'broker.sqlite'}"),
    Broker(
        "kombu-sqla",
        lambda d: f"sqla+sqlite:///{d / 'sqla.sqlite'}",
        runs_cap=1000,
        sqla_poll_s=0.05,
    ),
    # kombu's default poll: a sequential run waits ~0.5 s, so fewer latency samples.
    Broker(
        "kombu-sqla-default",
        lambda d: f"sqla+sqlite:///{d / 'sqla.sqlite'}",
        runs_cap=1000,
        latency_runs=40,
    ),
    Broker("celery-redis", lambda d: REDIS_URL, None, lambda p: {"global_keyprefix": p}),
    Broker(
        "offload-redis",
        lambda d: REDIS_URL,
        offload.transport.REDIS_TRANSPORT,
        lambda p: {"global_keyprefix": p},
    ),
]


class Collector:
    """Datagrams from the tasks: 'd' when a no-op ends, 's <time>' when a stamp starts.

    A process of its own reads them as they arrive. A Unix datagram socket queues only
    ``net.unix.max_dgram_qlen`` datagrams (10 by default), and a task whose report finds the
    queue full blocks: a collector read only after the producer's loop stalled every worker
    while the producer ran, so "end to end" measured enqueue time plus drain time, one core idle.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        fork = multiprocessing.get_context("fork")
        self._requests, theirs = fork.Pipe()
        self._process = fork.Process(target=_collect, args=(str(path), theirs), daemon=True)
        self._process.start()
        theirs.close()
        self._requests.recv()  # bound

    def finished(self, count: int, timeout: float) -> float:
        """Wait for ``count`` more no-op ends; return the time.monotonic() the last one came."""
        return self._ask(("done", count, timeout))

    def stamp(self, timeout: float) -> float:
        """The next stamp a task sent (epoch seconds at its first line)."""
        return self._ask(("stamp", 1, timeout))

    def _ask(self, request: tuple[str, int, float]) -> float:
        self._requests.send(request)
        answer: float | None = self._requests.recv()
        if answer is None:
            raise TimeoutError(f"the tasks did not report {request[:2]} within {request[2]} s")
        return answer

    def close(self) -> None:
        self._requests.close()  # the collector ends at EOF
        self._process.join(5)
        self._process.kill()
        self.path.unlink(missing_ok=True)


def _collect(path: str, requests: Any) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(path)
    sock.setblocking(False)
    requests.send("bound")
    ends: list[float] = []  # monotonic arrival time of every 'd' not yet answered
    stamps: list[float] = []
    asked: tuple[str, int, float] | None = None
    while True:
        wait = None if asked is None else max(0.0, asked[2] - time.monotonic())
        readable, _, _ = select.select([sock, requests], [], [], wait)
        while sock in readable:
            try:
                data = sock.recv(256)
            except BlockingIOError:
                break
            if data == b"d":
                ends.append(time.monotonic())  # CLOCK_MONOTONIC: the same in every process
            else:
                stamps.append(float(data.split()[1]))
        if requests in readable:
            try:
                kind, count, timeout = requests.recv()
            except EOFError:
                return
            asked = (kind, count, time.monotonic() + timeout)
        if asked is None:
            continue
        kind, count, deadline = asked
        got = ends if kind == "done" else stamps
        if len(got) >= count:
            requests.send(got[count - 1])
            del got[:count]
            asked = None
        elif time.monotonic() >= deadline:
            requests.send(None)
            asked = None


@contextlib.contextmanager
def workers(
    broker: Broker, layout: str, directory: Path, env: dict[str, str]
) -> Iterator[list[int]]:
    processes: list[subprocess.Popen[bytes]] = []
    ready = directory / "ready"
    try:
        for n, args in enumerate(LAYOUTS[layout]):
            command = [
                sys.executable, "-m", "celery", "-A", "transport_sqlite", "worker", *args,
                "-n", f"bench{n}-{uuid.uuid4().hex[:6]}@%h", "--loglevel=WARNING",
                "--without-gossip", "--without-mingle", "--without-heartbeat",
            ]  # fmt: skip
            log = open(directory / f"worker{n}.log", "ab")  # noqa: SIM115 - lives with the worker
            processes.append(
                subprocess.Popen(
                    command,
                    cwd=HERE,
                    env={**env, "BENCH_READY": str(ready)},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            log.close()
            # One at a time: two kombu-sqla workers creating its tables at once can lose the race.
            deadline = time.monotonic() + 60
            while len(list(directory.glob("ready.*"))) < len(processes):
                if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                    logs = "".join(f.read_text() for f in directory.glob("worker*.log"))
                    raise RuntimeError(
                        f"{broker.name}/{layout}: workers did not start:\n{logs[-3000:]}"
                    )
                time.sleep(0.05)
        yield [p.pid for p in processes]
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for marker in directory.glob("ready.*"):
            marker.unlink()


def tree_cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(pid)
            for process in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    times = process.cpu_times()
                    total += times.user + times.system
    return total


def measure(broker: Broker, layout: str, runs: int, idle_s: float) -> dict[str, float]:
    directory = Path(tempfile.mkdtemp(prefix=f"bench-{broker.name}-"))
    prefix = f"offload-bench-{uuid.uuid4().hex[:10]}:"
    url, options = broker.url(directory), broker.options(prefix)
    collector = Collector(directory / "collector.sock")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
        "BENCH_BROKER_URL": url,
        "BENCH_TRANSPORT": broker.transport or "",
        "BENCH_OPTIONS": json.dumps(options),
        "BENCH_COLLECTOR": str(collector.path),
        "BENCH_SQLA_POLL": str(broker.sqla_poll_s),
    }
    if url.startswith("sqla+"):
        import kombu.transport.sqlalchemy

        kombu.transport.sqlalchemy.Transport.polling_interval = broker.sqla_poll_s
    app = make_app(url, broker.transport, options)
    result: dict[str, float] = {}
    try:
        with workers(broker, layout, directory, env) as pids:
            runs = min(runs, broker.runs_cap or runs)
            for i in range(50):  # warm-up: connections, pool processes, declarations
                app.send_task("b.noop", args=[i])
            collector.finished(50, 30)
            time.sleep(1.0)

            started = time.monotonic()
            for i in range(runs):
                app.send_task("b.noop", args=[i])
            enqueued = time.monotonic()
            ended = collector.finished(runs, 120)
            result["runs_per_s"] = runs / (ended - started)
            result["enqueue_per_s"] = runs / (enqueued - started)

            latencies = []
            for i in range(broker.latency_runs):
                sent = time.time()
                app.send_task("b.stamp", args=[i])
                latencies.append(collector.stamp(30) - sent)
            latencies.sort()
            result["p50_ms"] = 1000 * latencies[len(latencies) // 2]
            result["p99_ms"] = 1000 * latencies[int(len(latencies) * 0.99) - 1]

            time.sleep(2.0)  # let the last acks and pool bookkeeping settle
            before = tree_cpu_s(pids)
            time.sleep(idle_s)
            result["idle_cpu_pct"] = 100 * (tree_cpu_s(pids) - before) / idle_s
    finally:
        app.close()
        collector.close()
        broker.cleanup(prefix)
        shutil.rmtree(directory, ignore_errors=True)
    return result


def cell(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    low, mid, high = (format(v, fmt) for v in (min(values), statistics.median(values), max(values)))
    return f"{mid} ({low}-{high})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5000)
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--brokers", default=",".join(b.name for b in BROKERS))
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    args = parser.parse_args()
    brokers = [b for b in BROKERS if b.name in args.brokers.split(",")]
    layouts = args.layouts.split(",")

    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for round_ in range(1, args.rounds + 1):
        for layout in layouts:  # interleaved: every broker sees the same noise
            for broker in brokers:
                r = measure(broker, layout, args.runs, args.idle_s)
                results.setdefault((broker.name, layout), []).append(r)
                print(f"round {round_} {broker.name:15} {layout:11} {json.dumps(r)}", flush=True)

    def med(name: str, layout: str, key: str) -> float:
        return statistics.median(r[key] for r in results[(name, layout)])

    print(f"\nmedian (min-max) of {args.rounds} round(s); runs: {args.runs} (sqla: 1000)\n")
    header = f"{'broker':15} {'layout':11} {'runs/s':>20} {'enqueue/s':>20} "
    print(header + f"{'p50 ms':>16} {'p99 ms':>18} {'idle CPU %':>18}")
    for (name, layout), rs in results.items():
        print(
            f"{name:15} {layout:11} {cell([r['runs_per_s'] for r in rs], '.0f'):>20} "
            f"{cell([r['enqueue_per_s'] for r in rs], '.0f'):>20} "
            f"{cell([r['p50_ms'] for r in rs], '.1f'):>16} "
            f"{cell([r['p99_ms'] for r in rs], '.1f'):>18} "
            f"{cell([r['idle_cpu_pct'] for r in rs], '.2f'):>18}"
        )
    names = {name for name, _ in results}
    if "offload-sqlite" in names:
        print()
        for layout in layouts:
            ours = med("offload-sqlite", layout, "runs_per_s")
            line = f"{layout:11} offload-sqlite"
            if "celery-redis" in names:
                ratio = ours / med("celery-redis", layout, "runs_per_s")
                line += f"  vs celery-redis {ratio:.2f}x (target >= 1.0)"
            for sqla in ("kombu-sqla", "kombu-sqla-default"):
                if sqla in names:
                    line += f"  vs {sqla} {ours / med(sqla, layout, 'runs_per_s'):.1f}x"
                    line += " (target >= 10)"
            p50 = med("offload-sqlite", layout, "p50_ms")
            idle = med("offload-sqlite", layout, "idle_cpu_pct")
            line += f"  p50 {p50:.1f} ms (<= 10)  idle {idle:.2f} % (< 1)"
            print(line)


if __name__ == "__main__":
    main()
