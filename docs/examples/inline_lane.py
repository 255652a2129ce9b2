"""README "The inline lane": fast background work after the response, without freezing the API.

Needs httpx (`pip install httpx`) for the Slack notice: offload itself does not depend on it.
"""

from __future__ import annotations

import os

import httpx
from fastapi import FastAPI

from offload import Offload, TaskContext

jobs = Offload()


@jobs.task(lane="inline", retries=2, timeout=10)
async def notify_slack(text: str) -> None:
    """`async def`: runs on the event loop, concurrently with other inline runs."""
    async with httpx.AsyncClient() as client:
        response = await client.post(os.environ["SLACK_WEBHOOK_URL"], json={"text": text})
        response.raise_for_status()


@jobs.task(lane="inline")
def write_audit_line(user_id: int, action: str) -> None:
    """`def`: runs on the inline lane's own threads, never the endpoints' threadpool."""
    with open(os.environ.get("AUDIT_LOG", "audit.log"), "a") as log:
        log.write(f"{user_id} {action}\n")


@jobs.task(lane="inline", cpu_bound=True)
def score_signup(ctx: TaskContext, user_id: int) -> int:
    """`cpu_bound=True`: runs in a separate low-priority process; the API keeps its CPU."""
    score = 0
    for step in range(1, 11):
        score += sum(i * i for i in range(50_000 * user_id % 7 + 10_000))
        ctx.progress(step / 10, f"step {step} of 10")
    return score % 1000


@jobs.task(lane="inline", spill=True)
async def send_welcome_email(user_id: int) -> None:
    """`spill=True`: when the lane is full or stopping, the run goes to the durable lane."""


app = FastAPI(
    lifespan=jobs.lifespan,  # starts the lane and the event-loop guard; drains on shutdown
    exception_handlers=jobs.exception_handlers,  # 422 / 404 / 503 + Retry-After
    dependencies=[jobs.deferrals],  # inline runs start after the response is sent
)


@app.post("/signups/{user_id}", status_code=202)
async def sign_up(user_id: int) -> dict[str, str]:
    await notify_slack.defer(text=f"user {user_id} signed up")
    await write_audit_line.defer(user_id, "signup")
    await send_welcome_email.defer(user_id)
    scoring = await score_signup.defer(user_id)
    return {"task_id": scoring.id, "status_url": f"/tasks/{scoring.id}"}


app.include_router(jobs.router, prefix="/tasks")
