"""The status API: one `RunStatus` schema for inline and durable runs.

| route | answers |
|---|---|
| `GET {prefix}` | runs newest first, filtered and paged (see `list_runs`; opaque `cursor`) |
| `GET {prefix}/{id}` | one run's `RunStatus`; 404 for an unknown id (never a made-up PENDING) |
| `GET {prefix}/{id}/events` | Server-Sent Events: a `status` event per change, until done |
| `POST {prefix}/{id}/cancel` | cancel a waiting run, ask a running one to stop |

Mount it with a prefix: `app.include_router(jobs.router, prefix="/tasks")`. Every route asks
`authorize(request, run, action)` (action `"read"` or `"cancel"`); a run the caller may not see
answers 404 like an unknown one, so ids of other users' runs cannot be probed. The default
allows loopback callers only.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Annotated, Literal, Protocol

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import StreamingResponse

from offload.core.run import Lane, RunFilter, RunPage, RunState, RunStatus
from offload.errors import RunNotFoundError

Action = Literal["read", "cancel"]
Authorize = Callable[[Request, RunStatus, Action], bool | Awaitable[bool]]
"""`authorize(request, run, action) -> bool` (or an awaitable of one)."""

INLINE_POLL_S = 0.1
LEDGER_POLL_S = 0.2
KEEPALIVE_S = 15.0


class Runs(Protocol):
    """What the status API asks: `Offload` answers it, for its inline runs and its ledger."""

    @property
    def is_stopping(self) -> bool:
        """True once the app began shutting down: open event streams end."""
        ...

    async def status(self, run_id: str) -> RunStatus: ...

    async def cancel(self, run_id: str) -> RunStatus: ...

    async def list_runs(
        self, where: RunFilter | None = None, *, limit: int = 50, cursor: str | None = None
    ) -> RunPage: ...


def is_loopback(request: Request) -> bool:
    """True for a caller on this machine."""
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loopback_only(request: Request, _run: RunStatus, _action: Action) -> bool:
    """The default `authorize`: callers on this machine only."""
    return is_loopback(request)


def run_filter(
    state: Annotated[list[RunState] | None, Query(description="Only runs in these states.")] = None,
    task: str | None = None,
    queue: str | None = None,
    dead: bool | None = None,
    error: Annotated[str | None, Query(description="Text in the error line, any case.")] = None,
    error_type: Annotated[str | None, Query(description="The error's exception type.")] = None,
    replayed: bool | None = None,
    schedule: Annotated[str | None, Query(description="Only fires of this schedule.")] = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    finished_before: datetime | None = None,
) -> RunFilter:
    """A `RunFilter` from query parameters (`?state=FAILURE&state=CANCELLED&task=...`)."""
    return RunFilter(
        states=tuple(state or ()),
        task=task,
        queue=queue,
        dead=dead,
        error=error,
        error_type=error_type,
        replayed=replayed,
        schedule=schedule,
        created_after=created_after,
        created_before=created_before,
        finished_before=finished_before,
    )


RunQuery = Annotated[RunFilter, Depends(run_filter)]
"""A route parameter: the `RunFilter` its query string describes."""


def _not_found(run_id: str) -> HTTPException:
    return HTTPException(404, detail=str(RunNotFoundError(run_id)))


def build_router(jobs: Runs, authorize: Authorize | None = None) -> APIRouter:
    """The status API of `jobs`; see the module docstring."""
    decide = authorize or loopback_only
    router = APIRouter(tags=["offload runs"])

    async def allowed(request: Request, status: RunStatus, action: Action) -> bool:
        verdict = decide(request, status, action)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        return bool(verdict)

    async def visible(request: Request, run_id: str, action: Action) -> RunStatus:
        try:
            status = await jobs.status(run_id)
        except RunNotFoundError:
            raise _not_found(run_id) from None
        if not await allowed(request, status, action):
            raise _not_found(run_id)
        return status

    @router.get("", response_model=RunPage, summary="List runs, newest first")
    async def list_runs(
        request: Request,
        where: RunQuery,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: str | None = None,
    ) -> RunPage:
        try:
            page = await jobs.list_runs(where, limit=limit, cursor=cursor)
        except ValueError as exc:
            raise HTTPException(400, detail=str(exc)) from None
        shown = [s for s in page.runs if await allowed(request, s, "read")]
        return RunPage(runs=shown, next_cursor=page.next_cursor)

    @router.get("/{run_id}", response_model=RunStatus, summary="One run's status")
    async def get_run(request: Request, run_id: str) -> RunStatus:
        return await visible(request, run_id, "read")

    @router.post("/{run_id}/cancel", response_model=RunStatus, summary="Cancel a run")
    async def cancel_run(request: Request, run_id: str) -> RunStatus:
        await visible(request, run_id, "cancel")
        try:
            return await jobs.cancel(run_id)
        except RunNotFoundError:
            raise _not_found(run_id) from None

    @router.get(
        "/{run_id}/events",
        summary="Server-Sent Events: the run's status on every change",
        response_class=StreamingResponse,
    )
    async def run_events(request: Request, run_id: str) -> StreamingResponse:
        first = await visible(request, run_id, "read")
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(
            _events(jobs, run_id, first), media_type="text/event-stream", headers=headers
        )

    return router


async def _events(jobs: Runs, run_id: str, status: RunStatus) -> AsyncIterator[str]:
    """A `status` event whenever the run changes, until it finishes or the lane stops."""
    poll_s = INLINE_POLL_S if status.lane is Lane.INLINE else LEDGER_POLL_S
    last = ""
    quiet_since = time.monotonic()
    number = 0
    while True:
        body = status.model_dump_json()
        if body != last:
            number += 1
            yield f"event: status\nid: {number}\ndata: {body}\n\n"
            last = body
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > KEEPALIVE_S:
            yield ": keep-alive\n\n"
            quiet_since = time.monotonic()
        if status.is_terminal or jobs.is_stopping:
            return
        await asyncio.sleep(poll_s)
        try:
            status = await jobs.status(run_id)
        except RunNotFoundError:
            return  # forgotten (an old inline run) or spilled to another process's view
