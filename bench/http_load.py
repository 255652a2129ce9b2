"""Offload driven the way users drive it: an API whose endpoint starts one durable run per request.

One uvicorn process serves `bench/http_load_app.py` for one system at a time (offload on
SQLite or Redis, raw Celery `.delay()` on Redis, Huey on Redis), with that system's workers
running (`bench/peers_systems.py` starts and stops them). A load generator in its own process
drives `POST /work/{tag}` from 1, 10 and 100 concurrent keep-alive HTTP/1.1 connections (raw
asyncio streams; loopback) for `--duration` seconds each. Every task reports when its body
started, so each request also gives a request → task start latency.

Printed per system and client count: requests/s, request p50/p99, request → task start
p50/p99, and the ratios of offload to raw Celery and to Huey. Systems are interleaved across
`--rounds`; medians of the rounds are printed.

    .venv/bin/python bench/http_load.py --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python bench/http_load.py` imports bench.*

from bench.peers_systems import SYSTEMS, Collector, System, Workers  # noqa: E402

DEFAULT_SYSTEMS = ["offload-sqlite", "offload-redis", "celery-redis", "huey-redis"]
BASELINES = ["celery-redis", "huey-redis"]


# --- the load generator (runs in its own process: `http_load.py --loadgen ...`) -------------


async def _client(
    port: int, name: str, stop_at: float, sent: list[tuple[str, float, float]]
) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    errors = 0
    number = 0
    while time.time() < stop_at:
        tag = f"{name}.{number}"
        number += 1
        request = f"POST /work/{tag} HTTP/1.1\r\nHost: bench\r\nContent-Length: 0\r\n\r\n"
        began = time.time()
        writer.write(request.encode())
        head = await reader.readuntil(b"\r\n\r\n")
        match = re.search(rb"(?i)content-length: *(\d+)", head)
        await reader.readexactly(int(match.group(1)) if match else 0)
        if head.startswith(b"HTTP/1.1 202"):
            sent.append((tag, began, time.time()))
        else:
            errors += 1
    writer.close()
    return errors


async def _load(port: int, clients: int, duration: float, prefix: str) -> dict[str, Any]:
    sent: list[tuple[str, float, float]] = []
    began = time.time()
    errors = await asyncio.gather(
        *(_client(port, f"{prefix}{i}", began + duration, sent) for i in range(clients))
    )
    return {"elapsed": time.time() - began, "errors": sum(errors), "sent": sent}


def run_loadgen(port: int, clients: int, duration: float, prefix: str, out: Path) -> None:
    out.write_text(json.dumps(asyncio.run(_load(port, clients, duration, prefix))))


# --- one system under load ---------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Starts:
    """Reads the collector on a thread while the load runs, so that its buffer never fills."""

    def __init__(self, collector: Collector) -> None:
        self.collector = collector
        self.at: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            got = self.collector.receive(0.05)
            if got is not None:
                self.at[got[0]] = got[1]

    def wait_for(self, tags: set[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not tags <= self.at.keys() and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def session(
    system_name: str, client_counts: list[int], duration: float, work: Path, log: Any
) -> dict[int, dict[str, float]]:
    """Start `system_name`'s workers and the API, load it at each client count; the numbers."""
    directory = Path(tempfile.mkdtemp(prefix=f"{system_name}-", dir=work))
    collector = Collector(directory)
    system: System = SYSTEMS[system_name](directory, collector.path)
    system.reset_services()
    env = {**system.env, "BENCH_HTTP_SYSTEM": system_name, "BENCH_COLLECTOR_WAIT_S": "1"}
    workers = Workers(log)
    server = None
    starts = Starts(collector)
    results: dict[int, dict[str, float]] = {}
    try:
        for command in system.worker_commands():
            workers.start(command, env)
        port = free_port()
        server = subprocess.Popen(
            [
                *(sys.executable, "-m", "uvicorn", "bench.http_load_app:app"),
                *("--port", str(port), "--log-level", "warning", "--no-access-log"),
            ],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=log,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.post(f"http://127.0.0.1:{port}/work/warm-up", timeout=5)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"{system_name}: the API did not start") from None
                time.sleep(0.1)
        starts.wait_for({"warm-up"}, 30)  # the workers are up
        if "warm-up" not in starts.at:
            raise RuntimeError(f"{system_name}: the workers never ran the warm-up task")
        for clients in client_counts:
            out = directory / f"load-{clients}.json"
            subprocess.run(
                [
                    *(sys.executable, str(Path(__file__).resolve()), "--loadgen"),
                    *(str(port), str(clients), str(duration), f"c{clients}-", str(out)),
                ],
                check=True,
                cwd=ROOT,
            )
            load = json.loads(out.read_text())
            sent = load["sent"]
            tags = {tag for tag, _, _ in sent}
            starts.wait_for(tags, 60)  # a backlog drains before the next client count
            started = [starts.at[tag] - began for tag, began, _ in sent if tag in starts.at]
            latencies = [ended - began for _, began, ended in sent]
            results[clients] = {
                "rps": len(sent) / load["elapsed"],
                "p50_ms": percentile(latencies, 0.5) * 1000,
                "p99_ms": percentile(latencies, 0.99) * 1000,
                "start_p50_ms": percentile(started, 0.5) * 1000,
                "start_p99_ms": percentile(started, 0.99) * 1000,
                "errors": load["errors"],
                "never_started": len(tags - starts.at.keys()),
            }
    finally:
        starts.close()
        if server is not None:
            server.terminate()
            server.wait(timeout=20)
        workers.stop()
        system.cleanup_services()
        collector.close()
    return results


# --- the report ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS))
    parser.add_argument("--clients", default="1,10,100")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loadgen", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loadgen:
        port, clients, duration, prefix, out = args.loadgen
        run_loadgen(int(port), int(clients), float(duration), prefix, Path(out))
        return
    names = args.systems.split(",")
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown system(s) {unknown}; known: {sorted(SYSTEMS)}")
    skipped = {n: why for n in names if (why := SYSTEMS[n].missing())}
    for name, why in skipped.items():
        print(f"skipping {name}: {why}")
    names = [n for n in names if n not in skipped]
    client_counts = [int(c) for c in args.clients.split(",")]
    runs: dict[str, list[dict[int, dict[str, float]]]] = {n: [] for n in names}
    with (
        tempfile.TemporaryDirectory(prefix="http-load-") as work,
        open(Path(work) / "processes.log", "wb") as log,
    ):
        for round_number in range(1, args.rounds + 1):
            for name in names:
                print(f"round {round_number}/{args.rounds}: {name} ...", flush=True)
                runs[name].append(session(name, client_counts, args.duration, Path(work), log))
    report(runs, client_counts, args)


def report(
    runs: dict[str, list[dict[int, dict[str, float]]]],
    client_counts: list[int],
    args: argparse.Namespace,
) -> None:
    def median(name: str, clients: int, key: str) -> float:
        return statistics.median(r[clients][key] for r in runs[name])

    print(
        f"\nPOST /work/{{tag}}, one background run per request; {args.duration:g} s per client "
        f"count; medians of {args.rounds} interleaved rounds\n"
    )
    print("| system | clients | requests/s | request p50 / p99 ms | request → start p50 / p99 ms |")
    print("|---|---|---|---|---|")
    for clients in client_counts:
        for name in runs:
            errors = sum(r[clients]["errors"] for r in runs[name])
            lost = sum(r[clients]["never_started"] for r in runs[name])
            flag = f" ({errors} non-202)" if errors else ""
            flag += f" ({lost} never started)" if lost else ""
            print(
                f"| {name} | {clients} | {median(name, clients, 'rps'):,.0f}{flag} | "
                f"{median(name, clients, 'p50_ms'):.2f} / {median(name, clients, 'p99_ms'):.2f} | "
                f"{median(name, clients, 'start_p50_ms'):.2f} / "
                f"{median(name, clients, 'start_p99_ms'):.2f} |"
            )
    ours = [n for n in runs if n.startswith("offload")]
    for baseline in (b for b in BASELINES if b in runs):
        print(f"\nratios to {baseline} (requests/s: higher is better; latencies: lower is)")
        print("| system | clients | requests/s | request p99 | request → start p50 |")
        print("|---|---|---|---|---|")
        for clients in client_counts:
            for name in ours:
                rps = median(name, clients, "rps") / median(baseline, clients, "rps")
                p99 = median(name, clients, "p99_ms") / median(baseline, clients, "p99_ms")
                start = median(name, clients, "start_p50_ms") / median(
                    baseline, clients, "start_p50_ms"
                )
                print(f"| {name} | {clients} | {rps:.2f}x | {p99:.2f}x | {start:.2f}x |")


if __name__ == "__main__":
    main()
