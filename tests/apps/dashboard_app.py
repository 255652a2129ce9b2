"""The app the dashboard tests drive: a task that fails on a bad argument, a slow one with
progress, an hourly schedule, and the dashboard at /offload.

Settings come from the `OFFLOAD_*` environment (the tests set the dashboard's password there).
`POST /charge?amount=N` defers `charge`; a negative amount fails its only try and is dead.
"""

from __future__ import annotations

import time
from datetime import timedelta

from fastapi import FastAPI

from offload import Offload, TaskContext

jobs = Offload()


@jobs.task(retries=0)
def charge(amount: int) -> str:
    if amount < 0:
        raise ValueError(f"amount must not be negative, got {amount}")
    return f"charged {amount}"


@jobs.task
def crunch(ctx: TaskContext, steps: int) -> int:
    for step in range(1, steps + 1):
        time.sleep(0.1)
        ctx.progress(step / steps, f"step {step} of {steps}")
    return steps


@jobs.periodic(every=timedelta(hours=1))
@jobs.task
def hourly_cleanup() -> str:
    return "clean"


app = FastAPI(lifespan=jobs.lifespan, exception_handlers=jobs.exception_handlers)
app.mount("/offload", jobs.dashboard())


@app.post("/charge", status_code=202)
async def request_charge(amount: int) -> dict[str, str]:
    run = await charge.defer(amount=amount)
    return {"id": run.id}


@app.post("/crunch", status_code=202)
async def request_crunch(steps: int) -> dict[str, str]:
    run = await crunch.defer(steps=steps)
    return {"id": run.id}
