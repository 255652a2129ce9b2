"""The FastAPI app `api_isolation.py` measures: a trivial /ping and five ways to run CPU work.

Configured by the environment the driver sets: `BENCH_ITERATIONS` (the ~1 s loop size),
`BENCH_MARKERS` (a file each finished task appends `tag time` to), `BENCH_REDIS_URL` (raw
Celery's broker) and the usual `OFFLOAD_*` settings.
"""

from __future__ import annotations

import os
import time

from fastapi import BackgroundTasks, FastAPI

from offload import Offload

ITERATIONS = int(os.environ.get("BENCH_ITERATIONS", "20000000"))
MARKERS = os.environ.get("BENCH_MARKERS", "/tmp/offload-bench-markers.txt")


def spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


def mark(tag: str) -> None:
    with open(MARKERS, "a") as handle:
        handle.write(f"{tag} {time.time()!r}\n")


def cpu_sync(tag: str, n: int) -> None:
    spin(n)
    mark(tag)


async def cpu_async(tag: str, n: int) -> None:
    spin(n)  # no await: the loop is frozen for the whole task
    mark(tag)


async def plain_noop() -> None:
    return None


jobs = Offload()


@jobs.task(lane="inline", cpu_bound=True)
def cpu_inline(tag: str, n: int) -> None:
    cpu_sync(tag, n)


@jobs.task(cpu_bound=True)
def cpu_durable(tag: str, n: int) -> None:
    cpu_sync(tag, n)


@jobs.task(lane="inline")
async def noop() -> None:
    return None


app = FastAPI(lifespan=jobs.lifespan, exception_handlers=jobs.exception_handlers)


@app.get("/ping")
async def ping() -> dict[str, bool]:
    return {"ok": True}


@app.post("/work/bt-sync")
async def work_bt_sync(tag: str, background_tasks: BackgroundTasks, n: int = ITERATIONS) -> None:
    background_tasks.add_task(cpu_sync, tag, n)


@app.post("/work/bt-async")
async def work_bt_async(tag: str, background_tasks: BackgroundTasks, n: int = ITERATIONS) -> None:
    background_tasks.add_task(cpu_async, tag, n)


@app.post("/work/inline", dependencies=[jobs.deferrals])
async def work_inline(tag: str, n: int = ITERATIONS) -> None:
    await cpu_inline.defer(tag, n)


@app.post("/work/durable")
async def work_durable(tag: str, n: int = ITERATIONS) -> None:
    await cpu_durable.defer(tag, n)


@app.post("/work/celery")
def work_celery(tag: str, n: int = ITERATIONS) -> None:
    from bench.isolation_celery import app as celery_app

    celery_app.send_task("bench.cpu", args=[tag, n], queue="bench-isolation")


@app.get("/noop/none")
async def noop_none() -> dict[str, bool]:
    return {"ok": True}


@app.get("/noop/bt")
async def noop_bt(background_tasks: BackgroundTasks) -> dict[str, bool]:
    background_tasks.add_task(plain_noop)
    return {"ok": True}


@app.get("/noop/bt-deferrals", dependencies=[jobs.deferrals])
async def noop_bt_deferrals(background_tasks: BackgroundTasks) -> dict[str, bool]:
    """/noop/bt in an app that applies `jobs.deferrals` everywhere: its fixed cost alone."""
    background_tasks.add_task(plain_noop)
    return {"ok": True}


@app.get("/noop/inline", dependencies=[jobs.deferrals])
async def noop_inline() -> dict[str, bool]:
    await noop.defer()
    return {"ok": True}
