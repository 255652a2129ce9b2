"""The FastAPI app the inline-lane and status-API tests run under a real uvicorn.

Settings come from the `OFFLOAD_*` environment the test gives the server. Tasks coordinate with
the test through files (a `release` path the test creates), never through guessed sleeps.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

from fastapi import BackgroundTasks, FastAPI, Request

from offload import Backoff, Offload, RunStatus, TaskContext

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

jobs = Offload()


async def _until(path: str, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while not os.path.exists(path):  # noqa: ASYNC240 - a cheap stat, test coordination only
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        await asyncio.sleep(0.01)


def _mark(path: str, line: str) -> None:
    with open(path, "a") as handle:
        handle.write(line + "\n")


@jobs.task(lane="inline")
async def nap(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


@jobs.task(lane="inline")
def blocking_nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@jobs.task(lane="inline")
async def explode(reason: str) -> None:
    raise ValueError(reason)


@jobs.task(lane="inline", retries=2, backoff=Backoff(base=0.05))
async def flaky(ctx: TaskContext, fail_times: int) -> int:
    if ctx.attempt <= fail_times:
        raise ConnectionError(f"attempt {ctx.attempt} failed")
    return ctx.attempt


@jobs.task(lane="inline")
async def blocks_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # noqa: ASYNC251 - the classic mistake, on purpose


@jobs.task(lane="inline")
async def stepper(ctx: TaskContext, release: str) -> str:
    ctx.progress(0.5, "halfway")
    await _until(release)
    ctx.progress(1.0, "done")
    return "finished"


@jobs.task(lane="inline")
def spin_until_cancelled(ctx: TaskContext, started: str) -> str:
    Path(started).write_text("started")
    while not ctx.cancelled:
        time.sleep(0.01)
    return "stopped early"


@jobs.task(lane="inline")
async def wait_forever(started: str) -> None:
    _mark(started, "started")
    await asyncio.Event().wait()


@jobs.task(lane="inline", cpu_bound=True)
def crunch(n: int) -> dict[str, int]:
    total = 0
    for i in range(n):
        total += i
    return {"total": total, "pid": os.getpid(), "nice": os.getpriority(os.PRIO_PROCESS, 0)}


@jobs.task(lane="inline", cpu_bound=True)
def crunch_ignoring_cancel() -> None:
    while True:
        sum(range(1000))


@jobs.task(lane="inline", spill=True)
async def slow_spillable(seconds: float, marker: str, tag: str) -> str:
    await asyncio.sleep(seconds)
    _mark(marker, tag)
    return tag


@jobs.task(lane="inline")
async def slow_local(seconds: float, marker: str, tag: str) -> str:
    await asyncio.sleep(seconds)
    _mark(marker, tag)
    return tag


@jobs.task
def add(a: int, b: int) -> int:
    return a + b


def _floats(scale: float) -> dict[str, Any]:
    return {"whole": 3.0 * scale, "nested": [3.0], "infinite": [float("inf"), -float("inf")]}


@jobs.task
def floats(scale: float) -> float:
    return 3.0 * scale


@jobs.task
def floats_untyped(scale: float) -> Any:
    return _floats(scale)


@jobs.task(lane="inline")
def floats_inline(scale: float) -> float:
    return 3.0 * scale


@jobs.task(lane="inline")
def floats_untyped_inline(scale: float) -> Any:
    return _floats(scale)


@jobs.task
async def durable_stepper(ctx: TaskContext, release: str) -> str:
    ctx.progress(0.5, "halfway")
    await _until(release)
    ctx.progress(1.0, "done")
    return "finished"


OWNERS: dict[str, str] = {}


def owner_only(request: Request, run: RunStatus, action: str) -> bool:
    return OWNERS.get(run.id) == request.headers.get("x-user")


app = FastAPI(
    lifespan=jobs.lifespan,
    exception_handlers=jobs.exception_handlers,
    dependencies=[jobs.deferrals],
)
app.include_router(jobs.router, prefix="/tasks")
app.include_router(jobs.status_router(authorize=owner_only), prefix="/mine")
app.mount("/metrics", jobs.metrics_app())


@app.get("/healthz")
async def healthz() -> dict[str, bool]:
    return {"ok": True}


@app.post("/defer/{name}", status_code=202)
async def defer(name: str, request: Request) -> dict[str, Any]:
    kwargs = await request.json()
    run = await jobs.tasks[name].defer(**kwargs)
    user = request.headers.get("x-user")
    if user:
        OWNERS[run.id] = user
    return {"id": run.id}


@app.post("/defer-many/{name}", status_code=202)
async def defer_many(name: str, request: Request) -> dict[str, Any]:
    calls = await request.json()
    runs = await jobs.tasks[name].defer_many(calls)
    return {"ids": [r.id for r in runs]}


@app.post("/defer-then-fail")
async def defer_then_fail(request: Request) -> None:
    kwargs = await request.json()
    await nap.defer(**kwargs)
    raise RuntimeError("the endpoint failed after deferring")


@app.get("/sync-ping")
def sync_ping() -> dict[str, bool]:
    return {"ok": True}


@app.post("/starlette-blocking")
async def starlette_blocking(seconds: float, count: int, background_tasks: BackgroundTasks) -> None:
    """The baseline: plain BackgroundTasks running sync work in the default threadpool.

    The endpoint is async so that it needs no threadpool token itself: every response is out
    at once and the sleeps alone hold the tokens.
    """
    for _ in range(count):
        background_tasks.add_task(time.sleep, seconds)


@app.post("/defer-then-linger")
async def defer_then_linger(seconds: float) -> dict[str, Any]:
    """Defers a run, then keeps the response back for `seconds`: the run must wait for it."""
    run = await nap.defer(0.0)
    await asyncio.sleep(seconds)
    return {"id": run.id, "returned_at": time.time()}


@app.post("/starlette-async-blocking")
async def starlette_async_blocking(url: str, background_tasks: BackgroundTasks) -> None:
    """The FastAPI docs' trap: a blocking HTTP call inside an async background task."""

    async def post_report() -> None:
        request = urllib.request.Request(url, data=b"{}")
        urllib.request.urlopen(request, timeout=10).read()  # noqa: ASYNC210 - the trap

    background_tasks.add_task(post_report)
