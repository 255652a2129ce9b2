"""Runs: their states and the one `RunStatus` schema everything reports."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict

JSONValue = Any
"""A value that travels as JSON: arguments, results and progress payloads."""


_ID_BYTES = 16
_IDS_PER_READ = 256
_id_buffers = threading.local()


def new_run_id() -> str:
    """A new run id: 128 random bits as 32 hex digits, like a uuid4's `.hex`.

    The bytes come from `os.urandom` 4 KiB at a time: one getrandom() call costs 0.5-5 µs
    on this project's machine kind, more than the rest of an inline `defer()`. Each thread
    has its own buffer, and a forked child starts with none, so no two share bytes.
    """
    local = _id_buffers.__dict__
    buffer: bytes = local.get("buffer", b"")
    offset: int = local.get("offset", 0)
    if offset >= len(buffer):
        buffer = local["buffer"] = os.urandom(_ID_BYTES * _IDS_PER_READ)
        offset = 0
    local["offset"] = offset + _ID_BYTES
    return buffer[offset : offset + _ID_BYTES].hex()


def _drop_id_buffers() -> None:
    global _id_buffers  # the child must not reuse its parent's random bytes
    _id_buffers = threading.local()


os.register_at_fork(after_in_child=_drop_id_buffers)


class RunState(StrEnum):
    """Where a run is in its life. `dead` is a flag on FAILURE runs that used their last try."""

    PENDING = "PENDING"  #: deferred, waiting for a worker (or for its eta)
    STARTED = "STARTED"  #: a worker is running an attempt
    PROGRESS = "PROGRESS"  #: running, and the task reported progress
    RETRY = "RETRY"  #: an attempt failed; another one is scheduled
    SUCCESS = "SUCCESS"  #: finished; `result` holds the return value
    FAILURE = "FAILURE"  #: finished with an error; no attempt is left
    CANCELLED = "CANCELLED"  #: cancelled before or while running


TERMINAL_STATES = frozenset({RunState.SUCCESS, RunState.FAILURE, RunState.CANCELLED})
ACTIVE_STATES = frozenset({RunState.STARTED, RunState.PROGRESS})
WAITING_STATES = frozenset({RunState.PENDING, RunState.RETRY})


class Lane(StrEnum):
    """Where a task runs."""

    INLINE = "inline"  #: in the API process, after the response
    DURABLE = "durable"  #: persisted in the broker, run by worker processes


class Progress(BaseModel):
    """What a running task last reported through `ctx.progress()`."""

    model_config = ConfigDict(frozen=True)

    fraction: float
    message: str | None = None


class Attempt(BaseModel):
    """One try at running a run: when, where, and how it ended."""

    model_config = ConfigDict(frozen=True)

    number: int
    worker: str | None
    started_at: datetime
    finished_at: datetime | None
    outcome: str | None  #: success, error, timeout, lost, cancelled; None while running
    error: str | None
    traceback: str | None


class WorkerStatus(BaseModel):
    """A worker process, as it last reported itself to the ledger."""

    model_config = ConfigDict(frozen=True)

    id: str  #: host:pid:process-start
    name: str
    queues: list[str]
    pool: str
    concurrency: int
    running: int  #: runs it was executing at its last heartbeat
    started_at: datetime
    heartbeat_at: datetime
    alive: bool  #: heart-beat within `stale_after_s`


class RunStatus(BaseModel):
    """The state of one run, as the status API, SSE, the dashboard and the CLI report it."""

    model_config = ConfigDict(frozen=True)

    id: str
    task: str
    lane: Lane
    queue: str | None
    state: RunState
    dead: bool
    progress: Progress | None
    attempts: int
    result: JSONValue
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    replay_of: str | None = None  #: the failed or cancelled run this one replays
    replayed_by: str | None = None  #: the run that replays this one
    schedule: str | None = None  #: the schedule that fired this run
    scheduled_for: datetime | None = None  #: the fire time it is the run of

    @property
    def is_terminal(self) -> bool:
        """True once the run can no longer change (SUCCESS, FAILURE or CANCELLED)."""
        return self.state in TERMINAL_STATES


class RunFilter(BaseModel):
    """Which runs a listing or a bulk operation (replay, purge) takes; every field narrows.

    `error` is text anywhere in the error line (any case); `error_type` its exception type
    (the error line is `"ValueError: reason"`, or just `"ValueError"`). `created_after` is
    inclusive, the other bounds exclusive. `replayed=False` keeps runs nobody replayed yet.
    """

    model_config = ConfigDict(frozen=True)

    states: tuple[RunState, ...] = ()
    task: str | None = None
    queue: str | None = None
    dead: bool | None = None
    error: str | None = None
    error_type: str | None = None
    replayed: bool | None = None
    schedule: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    finished_before: datetime | None = None

    def within(self, states: Iterable[RunState]) -> RunFilter | None:
        """This filter narrowed to runs in `states` (all of them if it names none); None if
        it takes none of them (it names only other states)."""
        allowed = tuple(states)
        kept = tuple(s for s in self.states or allowed if s in allowed)
        return self.model_copy(update={"states": kept}) if kept else None

    def matches(self, status: RunStatus) -> bool:
        """The same question asked of a run in memory (the inline lane's)."""
        error = status.error or ""
        return (
            (not self.states or status.state in self.states)
            and (self.task is None or status.task == self.task)
            and (self.queue is None or status.queue == self.queue)
            and (self.dead is None or status.dead == self.dead)
            and (self.error is None or self.error.lower() in error.lower())
            and (
                self.error_type is None
                or error == self.error_type
                or error.startswith(f"{self.error_type}:")
            )
            and (self.replayed is None or (status.replayed_by is not None) == self.replayed)
            and (self.schedule is None or status.schedule == self.schedule)
            and (self.created_after is None or status.created_at >= self.created_after)
            and (self.created_before is None or status.created_at < self.created_before)
            and (
                self.finished_before is None
                or (status.finished_at is not None and status.finished_at < self.finished_before)
            )
        )


DEAD_RUNS = RunFilter(states=(RunState.FAILURE,), dead=True)
"""The dead-letter queue: runs that failed their last try."""


class RunPage(BaseModel):
    """One page of runs, newest first; pass `next_cursor` back for the next page."""

    runs: list[RunStatus]
    next_cursor: str | None


class RunDetail(RunStatus):
    """One run with its arguments (as stored, JSON) and every attempt it made, oldest first."""

    args: dict[str, JSONValue]
    attempt_history: list[Attempt]
