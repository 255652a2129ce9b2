"""README "The status API": let each user see and cancel only their own runs."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Header, Request

from offload import Offload, RunStatus, TaskContext

jobs = Offload()

# Your application knows who started which run; a table in your database in real life.
OWNERS: dict[str, str] = {}


@jobs.task(lane="inline")
async def build_export(ctx: TaskContext, rows: int) -> str:
    for done in range(0, rows, 100):
        if ctx.cancelled:
            return "cancelled"
        ctx.progress(done / rows, f"{done} of {rows} rows")
        await asyncio.sleep(0.2)  # stands for real work
    return f"export-{rows}.csv"


def own_runs_only(request: Request, run: RunStatus, action: str) -> bool:
    """`authorize` hook: called for every run a request would see ("read") or cancel."""
    user = request.headers.get("x-user")
    return user is not None and OWNERS.get(run.id) == user


app = FastAPI(
    lifespan=jobs.lifespan,
    exception_handlers=jobs.exception_handlers,
    dependencies=[jobs.deferrals],
)
app.include_router(jobs.status_router(authorize=own_runs_only), prefix="/tasks")


@app.post("/exports", status_code=202)
async def start_export(rows: int, x_user: str = Header()) -> dict[str, str]:
    run = await build_export.defer(rows)
    OWNERS[run.id] = x_user
    return {"task_id": run.id, "events": f"/tasks/{run.id}/events"}
