"""The contract app's jobs behind a FastAPI app: the admin API and `/metrics`, under uvicorn.

Settings come from the `OFFLOAD_*` environment the test gives the server.
"""

from __future__ import annotations

from fastapi import FastAPI

from tests.apps.contract import jobs

app = FastAPI(lifespan=jobs.lifespan, exception_handlers=jobs.exception_handlers)
app.include_router(jobs.router, prefix="/tasks")
app.include_router(jobs.admin_router(), prefix="/admin/jobs")
app.mount("/metrics", jobs.metrics_app())
