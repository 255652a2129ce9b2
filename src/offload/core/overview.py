"""What the dashboard's overview shows of the durable lane, read from the ledger at once,
and the queues' status."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict

from offload.core.run import RunState, RunStatus, WorkerStatus


class Minute(BaseModel):
    """Runs that finished in one minute: the overview's throughput chart."""

    model_config = ConfigDict(frozen=True)

    at: datetime  #: the minute's start
    succeeded: int
    failed: int  #: FAILURE runs (dead or not) and CANCELLED ones

    @property
    def total(self) -> int:
        return self.succeeded + self.failed


class QueueStatus(BaseModel):
    """One queue: its backlog, how long the oldest has waited, and whether it is paused."""

    model_config = ConfigDict(frozen=True)

    name: str
    due: int  #: waiting runs due and not started (held ones included)
    held: int  #: runs a worker took while the queue was paused; its resume publishes them
    oldest_wait_s: float | None  #: since the oldest due run became due
    paused: bool
    paused_at: datetime | None


class Running(BaseModel):
    """A run a worker is running now, and which process runs it."""

    model_config = ConfigDict(frozen=True)

    run: RunStatus
    worker: str | None  #: host:pid:start of the process running the attempt


class Overview(BaseModel):
    """The durable lane at one moment: every count comes from one ledger transaction."""

    model_config = ConfigDict(frozen=True)

    at: datetime
    states: dict[RunState, int]
    dead: int
    minutes: list[Minute]  #: the last hour, oldest first, one per minute (empty ones too)
    queues: list[QueueStatus]
    workers: list[WorkerStatus]
    running: list[Running]  #: the longest-running first

    def runs_of(self, worker: WorkerStatus) -> list[RunStatus]:
        """The runs this worker process runs itself (a prefork pool's children have ids of
        their own: their runs are listed in `running` only)."""
        return [r.run for r in self.running if r.worker == worker.id]

    @property
    def finished_last_hour(self) -> int:
        return sum(m.total for m in self.minutes)

    @property
    def failure_rate(self) -> float | None:
        """Failed runs among those that finished in the last hour (None if none did)."""
        total = self.finished_last_hour
        return sum(m.failed for m in self.minutes) / total if total else None
