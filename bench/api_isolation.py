"""Does background CPU work slow a co-located API? /ping under load, six ways.

One uvicorn process serves `bench/isolation_app.py`. A load generator in its own process (20
keep-alive HTTP/1.1 connections on raw asyncio streams; httpx saturates its own core first)
hits `GET /ping` for `--duration` seconds. Two seconds in, five ~1 s CPU-bound tasks are
scheduled, one POST each:

  (a) idle            no tasks: the baseline (its whole window)
  (b) bt-sync         FastAPI BackgroundTasks, `def` task (Starlette's threadpool)
  (b') bt-async       FastAPI BackgroundTasks, `async def` task (on the event loop)
  (c) inline          offload's inline lane, `cpu_bound=True` (low-priority process pool)
  (d) durable         offload's durable lane: `offload worker --low-priority`, SQLite broker
  (e) celery          raw Celery, `prefork -c 2`, Redis, default settings

The busy window runs from the first POST to the last task's end; /ping's req/s, p50 and p99 in
that window are compared with idle's. Modes are interleaved across `--rounds`; medians are
printed with the min-max range. `--overhead` also compares one no-op async task per request
through BackgroundTasks and through the inline lane (server CPU per request, and in-process).

    .venv/bin/python bench/api_isolation.py --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python bench/api_isolation.py` imports bench.isolation_app
MODES = ["idle", "bt-sync", "bt-async", "inline", "durable", "celery"]
TASKS = 5
LABELS = {
    "idle": "(a) idle",
    "bt-sync": "(b) BackgroundTasks, def",
    "bt-async": "(b') BackgroundTasks, async def",
    "inline": "(c) offload inline, cpu_bound",
    "durable": "(d) offload durable, SQLite",
    "celery": "(e) raw Celery prefork -c 2, Redis",
}


# --- load generator (runs in its own process) -------------------------------------------------


async def _client(port: int, path: str, start_at: float, stop_at: float, out: array[float]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    errors = 0
    await asyncio.sleep(max(0.0, start_at - time.time()))
    while time.time() < stop_at:
        began = time.time()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        match = re.search(rb"(?i)content-length: *(\d+)", head)
        await reader.readexactly(int(match.group(1)) if match else 0)
        ended = time.time()
        if not head.startswith(b"HTTP/1.1 200"):
            errors += 1
        out.extend((began, ended))
    writer.close()
    return errors


async def _load(port: int, path: str, connections: int, start_at: float, stop_at: float) -> Any:
    samples: array[float] = array("d")
    errors = await asyncio.gather(
        *(_client(port, path, start_at, stop_at, samples) for _ in range(connections))
    )
    return samples, sum(errors)


def run_loadgen(args: argparse.Namespace) -> None:
    samples, errors = asyncio.run(
        _load(args.port, args.path, args.connections, args.start_at, args.stop_at)
    )
    with open(args.out, "wb") as handle:
        samples.tofile(handle)
    if errors:
        print(f"loadgen: {errors} non-200 responses", file=sys.stderr)


# --- processes --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as handle:
        return subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM a process we started and, after `timeout`, SIGKILL it and its descendants."""
    if process.poll() is not None:
        return
    with contextlib.suppress(psutil.NoSuchProcess):
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(True)]
    process.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout)
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(family, timeout=10)


def post(port: int, path: str) -> float:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    began = time.time()
    connection.request("POST", path)
    response = connection.getresponse()
    response.read()
    connection.close()
    if response.status >= 300:
        raise RuntimeError(f"POST {path}: {response.status}")
    return began


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def finished(markers: Path, prefix: str) -> list[float]:
    if not markers.exists():
        return []
    lines = [line.split() for line in markers.read_text().splitlines() if line.strip()]
    return [float(t) for tag, t in lines if tag.startswith(prefix)]


def redis_url() -> str | None:
    url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/7")
    host, port = re.match(r"redis://([^:/]+):(\d+)", url).groups()  # type: ignore[union-attr]
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1):
        return url
    return None


@dataclass
class Result:
    mode: str
    rps: float
    p50_ms: float
    p99_ms: float
    wall_s: float | None
    window_s: float
    lead_rps: float  # the same run before the first POST: a baseline immune to drift
    lead_p50_ms: float
    lead_p99_ms: float
    load_avg: float  # 1-minute load average when the mode started (a noisy-box flag)
    lead_cpu: float  # uvicorn's CPU use (cores) during the lead-in
    busy_cpu: float  # ... and during the busy window


def stats(
    samples: list[tuple[float, float]], start: float, end: float
) -> tuple[float, float, float]:
    inside = sorted(e - b for b, e in samples if start <= e <= end)
    if not inside:
        return 0.0, float("nan"), float("nan")
    p50 = inside[len(inside) // 2] * 1000
    p99 = inside[min(len(inside) - 1, int(len(inside) * 0.99))] * 1000
    return len(inside) / (end - start), p50, p99


def run_mode(mode: str, args: argparse.Namespace, iterations: int) -> Result | None:
    work = Path(tempfile.mkdtemp(prefix=f"offload-bench-{mode}-"))
    markers = work / "markers.txt"
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}",
        "BENCH_ITERATIONS": str(iterations),
        "BENCH_MARKERS": str(markers),
        "OFFLOAD_DATA_DIR": str(work / "data"),
        "OFFLOAD_INLINE_CPU_PROCESSES": "2",
        "OFFLOAD_WORKER_CPU_PROCESSES": "2",
        "OFFLOAD_WORKER_PROCESSES": "1",
    }
    broker = redis_url() if mode == "celery" else None
    if mode == "celery":
        if broker is None:
            print("  celery: skipped, Redis is not reachable (set BENCH_REDIS_URL)")
            shutil.rmtree(work, ignore_errors=True)
            return None
        env["BENCH_REDIS_URL"] = broker
    processes: list[subprocess.Popen[bytes]] = []
    try:
        server = spawn(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "bench.isolation_app:app",
                "--port",
                str(port),
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            env,
            work / "server.log",
        )
        processes.append(server)
        wait_for(lambda: _answers(port), 30, "uvicorn")
        if mode == "durable":
            processes.append(
                spawn(
                    [
                        sys.executable,
                        "-m",
                        "offload.cli",
                        "worker",
                        "bench.isolation_app:jobs",
                        "--low-priority",
                    ],
                    env,
                    work / "worker.log",
                )
            )
        if mode == "celery":
            processes.append(
                spawn(
                    [
                        sys.executable,
                        "-m",
                        "celery",
                        "-A",
                        "bench.isolation_celery",
                        "worker",
                        "-P",
                        "prefork",
                        "-c",
                        "2",
                        "-Q",
                        "bench-isolation",
                        "--loglevel=WARNING",
                    ],
                    env,
                    work / "celery.log",
                )
            )
        if mode in ("inline", "durable", "celery"):
            post(port, f"/work/{mode}?tag=warm&n=1000")
            wait_for(lambda: finished(markers, "warm"), 60, f"{mode} warm-up task")
        samples_path = work / "samples.bin"
        start_at = time.time() + 1.0
        stop_at = start_at + args.duration
        loadgen = spawn(
            [
                sys.executable,
                __file__,
                "--loadgen",
                "--port",
                str(port),
                "--path",
                "/ping",
                "--connections",
                str(args.connections),
                "--start-at",
                repr(start_at),
                "--stop-at",
                repr(stop_at),
                "--out",
                str(samples_path),
            ],
            env,
            work / "loadgen.log",
        )
        processes.append(loadgen)
        cpu_log = _CpuLog(server.pid)
        first_post = None
        load_avg = os.getloadavg()[0]
        if mode != "idle":
            time.sleep(max(0.0, start_at + args.lead_in - time.time()))
            for index in range(TASKS):
                began = post(port, f"/work/{mode}?tag=task{index}")
                first_post = first_post or began
        loadgen.wait(timeout=args.duration + 60)
        cpu_log.stop()
        raw = array("d")
        with open(samples_path, "rb") as handle:
            raw.frombytes(handle.read())
        samples = list(zip(raw[0::2], raw[1::2], strict=True))
        lead = stats(samples, start_at + 0.5, start_at + args.lead_in)
        lead_cpu = cpu_log.cores(start_at + 0.5, start_at + args.lead_in)
        if first_post is None:
            rps, p50, p99 = stats(samples, start_at, stop_at)
            busy_cpu = cpu_log.cores(start_at, stop_at)
            return Result(
                mode, rps, p50, p99, None, stop_at - start_at, *lead, load_avg, lead_cpu, busy_cpu
            )
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: len(finished(markers, "task")) >= TASKS, 120, f"{mode} tasks")
        ends = finished(markers, "task")
        last = max(ends) if len(ends) >= TASKS else None
        window_end = min(last or stop_at, stop_at)
        rps, p50, p99 = stats(samples, first_post, window_end)
        wall = (last - first_post) if last is not None else None
        busy_cpu = cpu_log.cores(first_post, window_end)
        return Result(
            mode, rps, p50, p99, wall, window_end - first_post, *lead, load_avg, lead_cpu, busy_cpu
        )
    finally:
        for process in reversed(processes):
            stop(process)
        if mode == "celery" and broker:
            _flush_celery_queue(broker)
        shutil.rmtree(work, ignore_errors=True)


class _CpuLog:
    """Samples a process's CPU time every 0.2 s, to tell its CPU use in any window."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self._samples: list[tuple[float, float]] = []
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(0.2):
            with contextlib.suppress(psutil.NoSuchProcess):
                times = self._process.cpu_times()
                self._samples.append((time.time(), times.user + times.system))

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def cores(self, start: float, end: float) -> float:
        inside = [(t, c) for t, c in self._samples if start <= t <= end]
        if len(inside) < 2:
            return float("nan")
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def _answers(port: int) -> bool:
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        connection.request("GET", "/ping")
        ok = connection.getresponse().status == 200
        connection.close()
        return ok
    except OSError:
        return False


def _flush_celery_queue(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    client.delete("bench-isolation", "unacked", "unacked_index")
    client.close()


def calibrate(target_s: float = 1.0) -> int:
    """Loop iterations that take `target_s` of CPU on an idle core."""
    from bench.isolation_app import spin

    n = 2_000_000
    began = time.process_time()
    spin(n)
    per_iteration = (time.process_time() - began) / n
    return int(target_s / per_iteration)


# --- per-task overhead ------------------------------------------------------------------------


def overhead_http(args: argparse.Namespace) -> list[dict[str, tuple[float, float]]]:
    """Per pass: req/s and server CPU µs per request for each /noop/ endpoint.

    The endpoints are measured one after another in each pass, in alternating order (ABBA),
    so a ratio of two endpoints from one pass compares like with like on a drifting machine.
    """
    work = Path(tempfile.mkdtemp(prefix="offload-bench-noop-"))
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}",
        "OFFLOAD_DATA_DIR": str(work / "data"),
        "OFFLOAD_INLINE_HISTORY": "1000",
    }
    server = spawn(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.isolation_app:app",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        env,
        work / "server.log",
    )
    kinds = ["none", "bt", "bt-deferrals", "inline"]
    passes: list[dict[str, tuple[float, float]]] = []
    try:
        wait_for(lambda: _answers(port), 30, "uvicorn")
        process = psutil.Process(server.pid)
        for number in range(args.overhead_passes * len(kinds)):
            pass_number, position = divmod(number, len(kinds))
            if position == 0:
                passes.append({})
            kind = kinds[position] if pass_number % 2 == 0 else kinds[-1 - position]
            samples_path = work / f"{kind}.bin"
            start_at = time.time() + 0.5
            stop_at = start_at + args.overhead_duration
            loadgen = spawn(
                [
                    sys.executable,
                    __file__,
                    "--loadgen",
                    "--port",
                    str(port),
                    "--path",
                    f"/noop/{kind}",
                    "--connections",
                    str(args.connections),
                    "--start-at",
                    repr(start_at),
                    "--stop-at",
                    repr(stop_at),
                    "--out",
                    str(samples_path),
                ],
                env,
                work / "loadgen.log",
            )
            time.sleep(max(0.0, start_at - time.time()))
            cpu0 = sum(process.cpu_times()[:2])
            loadgen.wait(timeout=args.overhead_duration + 30)
            cpu1 = sum(process.cpu_times()[:2])
            raw = array("d")
            raw.frombytes(samples_path.read_bytes())
            count = len(raw) // 2
            passes[-1][kind] = (count / (stop_at - start_at), (cpu1 - cpu0) / count * 1e6)
    finally:
        stop(server)
        shutil.rmtree(work, ignore_errors=True)
    return passes


def overhead_in_process(count: int = 20_000) -> dict[str, float]:
    """µs per no-op async task: BackgroundTasks vs the inline lane, without HTTP."""
    from starlette.background import BackgroundTasks

    from offload import Offload
    from offload.lanes.inline.deferrals import Deferrals, current_deferrals

    data_dir = tempfile.mkdtemp(prefix="offload-bench-micro-")
    jobs = Offload(data_dir=data_dir, inline_history=10)

    @jobs.task(lane="inline")
    async def nothing() -> None:
        return None

    async def plain() -> None:
        return None

    async def measure() -> dict[str, float]:
        began = time.perf_counter()
        for _ in range(count):
            tasks = BackgroundTasks()
            tasks.add_task(plain)
            await tasks()
        bt = (time.perf_counter() - began) / count * 1e6
        async with jobs.lifespan(None):
            began = time.perf_counter()
            for _ in range(count):
                deferrals = Deferrals()  # what `jobs.deferrals` sets up on current FastAPI
                current_deferrals.set(deferrals)
                await nothing.defer()
                await deferrals.end()  # what FastAPI's request exit stack calls
                while jobs.inline._admitted > 50:  # noqa: ASYNC110 - let started runs finish
                    await asyncio.sleep(0)
            while jobs.inline._admitted:  # noqa: ASYNC110 - polling is the point here
                await asyncio.sleep(0)
            inline = (time.perf_counter() - began) / count * 1e6
        return {"bt": bt, "inline": inline}

    try:
        return asyncio.run(measure())
    finally:
        jobs.close()
        shutil.rmtree(data_dir, ignore_errors=True)


# --- report -----------------------------------------------------------------------------------


def _number(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def median_range(values: list[float]) -> str:
    clean = [v for v in values if v == v]
    if not clean:
        return "n/a"
    if len(clean) == 1:
        return _number(clean[0])
    return f"{_number(statistics.median(clean))} ({_number(min(clean))}-{_number(max(clean))})"


def report(results: dict[str, list[Result]], idle: list[Result]) -> None:
    print(
        "\n/ping during the busy window (median of rounds, min-max); ratios vs the idle run of "
        "the same round"
    )
    header = (
        "| mode | req/s | p50 ms | p99 ms | req/s vs idle | p50 vs idle | p99 vs idle "
        "| 5-task wall s |"
    )
    print(header)
    print("|---|---|---|---|---|---|---|---|")
    for mode, rows in results.items():
        pairs = list(zip(rows, idle, strict=False))  # round by round
        rps_ratio = [r.rps / i.rps for r, i in pairs]
        p50_ratio = [r.p50_ms / i.p50_ms for r, i in pairs]
        p99_ratio = [r.p99_ms / i.p99_ms for r, i in pairs]
        walls = [r.wall_s for r in rows if r.wall_s is not None]
        wall = median_range(walls) if mode != "idle" else "-"
        if mode != "idle" and len(walls) < len(rows):
            wall += f" ({len(rows) - len(walls)} unfinished)"
        latency = (
            f"{median_range([r.p50_ms for r in rows])} | {median_range([r.p99_ms for r in rows])}"
        )
        print(
            f"| {LABELS[mode]} | {median_range([r.rps for r in rows])} | {latency} "
            f"| {median_range(rps_ratio)}x | {median_range(p50_ratio)}x "
            f"| {median_range(p99_ratio)}x | {wall} |"
        )
    print(
        "\nThe same, against each run's own lead-in (its first seconds, before any POST; immune "
        "to a box that got busier between runs)"
    )
    print("| mode | req/s vs lead-in | p50 vs lead-in | p99 vs lead-in |")
    print("|---|---|---|---|")
    for mode, rows in results.items():
        if mode == "idle":
            continue
        print(
            f"| {LABELS[mode]} | {median_range([r.rps / r.lead_rps for r in rows])}x "
            f"| {median_range([r.p50_ms / r.lead_p50_ms for r in rows])}x "
            f"| {median_range([r.p99_ms / r.lead_p99_ms for r in rows])}x |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loadgen", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--path", default="/ping", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--stop-at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=24.0, help="load seconds per mode")
    parser.add_argument(
        "--lead-in", type=float, default=4.0, help="seconds of load before the first POST"
    )
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--iterations", type=int, help="CPU loop size (default: ~1 s, measured)")
    parser.add_argument("--overhead", action="store_true", help="also measure no-op task cost")
    parser.add_argument("--overhead-duration", type=float, default=3.0)
    parser.add_argument("--overhead-passes", type=int, default=5, help="per round")
    parser.add_argument("--json", help="also write every measurement to this file")
    args = parser.parse_args()
    if args.loadgen:
        run_loadgen(args)
        return
    # SIGTERM unwinds like Ctrl-C, so every `finally` stops the processes this run started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    modes = args.modes.split(",")
    if "idle" not in modes:
        modes.insert(0, "idle")
    iterations = args.iterations or calibrate()
    print(f"CPU task: {iterations:,} iterations (~1 s on an idle core); {args.rounds} rounds")
    results: dict[str, list[Result]] = {mode: [] for mode in modes}
    overheads: list[dict[str, Any]] = []
    for round_number in range(args.rounds):
        order = modes[round_number % len(modes) :] + modes[: round_number % len(modes)]
        for mode in order:
            result = run_mode(mode, args, iterations)
            if result is None:
                continue
            results[mode].append(result)
            wall = "-" if result.wall_s is None else f"{result.wall_s:.1f}s"
            print(
                f"  round {round_number + 1} {mode:<9} {result.rps:7.0f} req/s  "
                f"p50 {result.p50_ms:6.1f} ms  p99 {result.p99_ms:7.1f} ms  "
                f"window {result.window_s:5.1f}s  5-task wall {wall}  "
                f"(lead-in {result.lead_rps:.0f} req/s p99 {result.lead_p99_ms:.1f} ms; uvicorn "
                f"CPU {result.lead_cpu:.2f} -> {result.busy_cpu:.2f} cores; "
                f"load avg {result.load_avg:.2f})",
                flush=True,
            )
        if args.overhead:
            http_costs = overhead_http(args)
            micro = overhead_in_process()
            overheads.append({"http": http_costs, "micro": micro})
            cpu = {k: statistics.median(p[k][1] for p in http_costs) for k in http_costs[0]}
            print(
                f"  round {round_number + 1} no-op task, server CPU µs/request: "
                + ", ".join(f"{kind} {value:.0f}" for kind, value in cpu.items())
                + f"; in process {micro['bt']:.1f} vs {micro['inline']:.1f} µs/task",
                flush=True,
            )
    results = {mode: rows for mode, rows in results.items() if rows}
    report(results, results["idle"])
    if overheads:
        print_overheads(overheads)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "iterations": iterations,
                    "results": {m: [r.__dict__ for r in rows] for m, rows in results.items()},
                    "overheads": overheads,
                },
                indent=2,
            )
        )


def print_overheads(overheads: list[dict[str, Any]]) -> None:
    def med(values: list[float]) -> float:
        return statistics.median(values)

    passes = [p for o in overheads for p in o["http"]]
    cpu = {k: med([p[k][1] for p in passes]) for k in passes[0]}
    rps = {k: med([p[k][0] for p in passes]) for k in passes[0]}
    print(f"\nOne no-op async task per request (median of {len(passes)} passes)")
    print("| endpoint | req/s | server CPU µs/request | over /noop/none µs |")
    print("|---|---|---|---|")
    for kind in cpu:
        share = "-" if kind == "none" else f"{cpu[kind] - cpu['none']:.1f}"
        print(f"| /noop/{kind} | {rps[kind]:.0f} | {cpu[kind]:.1f} | {share} |")

    def paired(name: str, of: str, to: str) -> str:
        """Median (min-max) of the ratio within each pass: drift between passes cancels."""
        ratios = [p[of][1] / p[to][1] for p in passes]
        times = [p[to][0] / p[of][0] for p in passes]
        return f"{name}: {median_range(ratios)}x CPU, {median_range(times)}x time per request"

    print(f"- {paired('inline lane vs BackgroundTasks', 'inline', 'bt')}")
    print(
        "- "
        + paired(
            "in an app that applies jobs.deferrals everywhere (its fixed cost paid either way)",
            "inline",
            "bt-deferrals",
        )
    )
    bt_micro = med([o["micro"]["bt"] for o in overheads])
    inline_micro = med([o["micro"]["inline"] for o in overheads])
    print(
        f"- in process, without HTTP: BackgroundTasks {bt_micro:.1f} µs/task, inline lane "
        f"{inline_micro:.1f} µs/task ({inline_micro / bt_micro:.2f}x)"
    )


if __name__ == "__main__":
    main()
