"""What Celery's task events say about an attempt, when `task_events` is on.

offload's task body records every outcome in the ledger and returns, so to Celery every
delivery would look like a success. With task events on, Flower and celery-exporter must see
what the ledger saw: the body ends the way a Celery task with that outcome would.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from celery.exceptions import Ignore, Retry

from offload.core.run import RunState
from offload.lanes.durable.executor import Ended


class RunFailed(Exception):
    """A failed attempt, as Celery sees it: the run's error, already in the ledger."""


def report(celery_task: Any, ended: Ended) -> Any:
    """End the Celery task as `ended` says: return the result (task-succeeded), raise `Retry`
    (task-retried), raise `RunFailed` (task-failed), or announce task-revoked (a cancel)."""
    if ended.state is RunState.SUCCESS:
        return ended.result
    if ended.state is RunState.RETRY:
        # offload published the next attempt itself; Retry only tells Celery so.
        due = datetime.now(UTC) + timedelta(seconds=ended.retry_in_s or 0)
        raise Retry(ended.error, exc=RunFailed(ended.error), when=due)
    if ended.state is RunState.CANCELLED:
        celery_task.send_event("task-revoked", terminated=False, signum=None, expired=False)
        raise Ignore
    raise RunFailed(ended.error)
