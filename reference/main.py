"""The reference service: an ordinary FastAPI app that imports only `offload`.

Run it with `scripts/serve` (or `offload serve reference.main:app`): the API on
http://127.0.0.1:8000 and a worker beside it, on SQLite files in ./offload-data.

    curl -X POST localhost:8000/reports -H 'content-type: application/json' \
         -d '{"user_id": 7, "kind": "pdf"}'
    curl localhost:8000/tasks/<task_id>            # status, progress, result
    curl -N localhost:8000/tasks/<task_id>/events  # the same, pushed as it changes
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Literal

from fastapi import FastAPI
from pydantic import BaseModel

from offload import Backoff, Offload, TaskContext

jobs = Offload()
audit = logging.getLogger("reference.audit")


class ReportRequest(BaseModel):
    user_id: int
    kind: Literal["pdf", "csv"] = "pdf"


class Accepted(BaseModel):
    task_id: str
    status_url: str


@jobs.task(retries=3, backoff=Backoff(base=2, cap=60), timeout=120, cpu_bound=True)
def render_report(ctx: TaskContext, user_id: int, kind: Literal["pdf", "csv"]) -> str:
    """Render a report page by page (CPU work), reporting progress as it goes."""
    digest = hashlib.sha256(f"{user_id}:{kind}".encode())
    pages = 10
    for page in range(1, pages + 1):
        if ctx.cancelled:
            return "cancelled"
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline:
            digest.update(digest.digest())
        ctx.progress(page / pages, f"rendered page {page} of {pages}")
    return f"reports/{user_id}-{digest.hexdigest()[:12]}.{kind}"


@jobs.task(lane="inline")
async def record_audit(user_id: int, action: str) -> None:
    """Fast and disposable: after the response, in the API process."""
    audit.info("user %s: %s", user_id, action)


app = FastAPI(
    title="offload reference service",
    lifespan=jobs.lifespan,
    exception_handlers=jobs.exception_handlers,
    dependencies=[jobs.deferrals],
)
app.include_router(jobs.router, prefix="/tasks")
# What runs, what failed and why: http://127.0.0.1:8000/offload/ (loopback only until
# OFFLOAD_DASHBOARD_PASSWORD or OFFLOAD_DASHBOARD_TOKEN is set).
app.mount("/offload", jobs.dashboard())


@app.post("/reports", status_code=202)
async def request_report(body: ReportRequest) -> Accepted:
    run = await render_report.defer(user_id=body.user_id, kind=body.kind)
    await record_audit.defer(user_id=body.user_id, action=f"requested a {body.kind} report")
    return Accepted(task_id=run.id, status_url=f"/tasks/{run.id}")
