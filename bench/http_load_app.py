"""The app `bench/http_load.py` serves: one endpoint that starts one background run per request.

`BENCH_HTTP_SYSTEM` picks how, each the way its users write it: offload's `await defer()`,
raw Celery's `.delay()` and Huey's call, both straight from the `async def` endpoint (what
their docs and most FastAPI tutorials show). The task bodies report their start time to the
benchmark's collector (`bench/peers_apps/common.py`).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI

SYSTEM = os.environ.get("BENCH_HTTP_SYSTEM", "offload-sqlite")
enqueue: Callable[[str], Awaitable[Any]]
lifespan: Any = None

if SYSTEM.startswith("offload"):
    from bench.peers_apps.offload_app import jobs
    from bench.peers_apps.offload_app import noop as offload_noop

    lifespan = jobs.lifespan

    async def enqueue(tag: str) -> Any:
        return await offload_noop.defer(tag=tag)

elif SYSTEM.startswith("celery"):
    from bench.peers_apps.celery_app import noop as celery_noop

    async def enqueue(tag: str) -> Any:
        return celery_noop.delay(tag)

elif SYSTEM.startswith("huey"):
    from bench.peers_apps.huey_app import noop as huey_noop

    async def enqueue(tag: str) -> Any:
        return huey_noop(tag)

else:
    raise SystemExit(f"BENCH_HTTP_SYSTEM={SYSTEM!r}: offload-*, celery-* or huey-*")

app = FastAPI(lifespan=lifespan)


@app.post("/work/{tag}", status_code=202)
async def work(tag: str) -> dict[str, bool]:
    await enqueue(tag)
    return {"queued": True}
