"""The README's first example, whole: a durable task, an inline one, and the status API."""

from typing import Literal

from fastapi import FastAPI
from pydantic import BaseModel

from offload import Backoff, Offload, TaskContext

jobs = Offload()  # settings: arguments, then OFFLOAD_* environment variables, then defaults
REQUESTED: dict[str, int] = {}  # reports asked for, by kind (your metrics in real life)


@jobs.task(retries=5, backoff=Backoff(base=2, cap=300), timeout=120, cpu_bound=True)
def render_report(ctx: TaskContext, user_id: int, kind: Literal["pdf", "csv"]) -> str:
    ctx.progress(0.6, "rendering")  # visible through the run's status
    return f"reports/{user_id}.{kind}"


@jobs.task(lane="inline")
async def count_request(kind: str) -> None:  # in the API process, after the response
    REQUESTED[kind] = REQUESTED.get(kind, 0) + 1


class ReportRequest(BaseModel):
    user_id: int
    kind: Literal["pdf", "csv"] = "pdf"


app = FastAPI(
    lifespan=jobs.lifespan,  # runs the inline lane
    exception_handlers=jobs.exception_handlers,  # a wrong argument is a 422, not a 500
    dependencies=[jobs.deferrals],  # inline runs start after the response
)
app.include_router(jobs.router, prefix="/tasks")  # GET /tasks/{id}: state, progress, result


@app.post("/reports", status_code=202)
async def request_report(request: ReportRequest) -> dict[str, str]:
    run = await render_report.defer(user_id=request.user_id, kind=request.kind)
    await count_request.defer(request.kind)
    return {"task_id": run.id, "status_url": f"/tasks/{run.id}"}
