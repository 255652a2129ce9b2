"""An app that Celery's own tools run, as the README prints it:
`celery -A tests.apps.celery_tools:celery_app inspect ping`, `... flower`, `... worker`.

Settings come from the `OFFLOAD_*` environment; the test builds its own twin with `build()`.
"""

from __future__ import annotations

import time
from typing import Any

from offload import Backoff, Offload, TaskContext


def build(**settings: Any) -> Offload:
    jobs = Offload(**settings)

    @jobs.task
    def add(a: int, b: int) -> int:
        return a + b

    @jobs.task(retries=1, backoff=Backoff(base=0.1, jitter=False))
    def always_fails(reason: str) -> None:
        raise ValueError(reason)

    @jobs.task
    def until_cancelled(ctx: TaskContext) -> str:
        ctx.progress(0.0, "started")
        while not ctx.cancelled:
            time.sleep(0.02)
        return "stopped"

    return jobs


jobs = build()
celery_app = jobs.celery
