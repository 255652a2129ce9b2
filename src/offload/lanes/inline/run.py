"""`InlineRun`: one inline run, held in the API process's memory."""

from __future__ import annotations

import asyncio
import contextvars
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from offload.core.context import TaskContext
from offload.core.run import (
    ACTIVE_STATES,
    WAITING_STATES,
    JSONValue,
    Lane,
    Progress,
    RunState,
    RunStatus,
)

if TYPE_CHECKING:
    from offload.core.task import Task


@dataclass(eq=False, slots=True)
class InlineRun:
    """One inline run, in memory. Changed on the event loop only (threads set `started_at`)."""

    id: str
    task: Task[Any, Any]
    kwargs: dict[str, JSONValue]
    created_at: float
    context: contextvars.Context | None  #: the deferring caller's context; dropped when done
    delay_s: float | None = None
    idempotency_key: str | None = None
    state: RunState = RunState.PENDING
    attempts: int = 0
    failures: int = 0
    progress: Progress | None = None
    result: JSONValue = None
    error: str | None = None
    traceback: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    attempt_started: float = 0.0
    cancel_requested: bool = False
    launched: bool = False
    gone: bool = False  #: spilled to the durable lane: no longer ours
    worker: asyncio.Task[None] | None = None
    thread_id: int | None = None
    pid: int | None = None

    def status(self) -> RunStatus:
        """This run as the one `RunStatus` schema."""
        return RunStatus(
            id=self.id,
            task=self.task.name,
            lane=Lane.INLINE,
            queue=None,
            state=self.state,
            dead=False,
            progress=self.progress,
            # As in the ledger, an attempt counts once it starts: a run still waiting for a
            # thread or a process (its attempt begun here, not there) shows the tries that failed.
            attempts=self.failures if self.state in WAITING_STATES else self.attempts,
            result=self.result,
            error=self.error,
            created_at=datetime.fromtimestamp(self.created_at, UTC),
            started_at=_utc(self.started_at),
            finished_at=_utc(self.finished_at),
        )

    def report_progress(self, fraction: float, message: str | None) -> None:
        """What `ctx.progress()` reported: kept, and a running run shows PROGRESS."""
        self.progress = Progress(fraction=fraction, message=message)
        if self.state in ACTIVE_STATES:
            self.state = RunState.PROGRESS

    def context_for_attempt(self) -> TaskContext:
        """The `TaskContext` of this run's current attempt, in this process."""
        return TaskContext(
            run_id=self.id,
            task=self.task.name,
            attempt=self.attempts,
            write_progress=self.report_progress,
            probe_cancel=lambda: self.cancel_requested,
            progress_interval_s=0.0,
            cancel_check_interval_s=0.0,
        )


def _utc(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC)
