"""The admin API: look into any run and fix what failed. Replay, discard, purge, cancel.

- `GET {prefix}/runs`: runs newest first that the query's filter takes, paged by `cursor`.
  `?dead=true` is the dead-letter queue; also `state`, `task`, `queue`, `error` (text in the
  error), `error_type`, `replayed`, `created_after`, `created_before`, `finished_before`.
- `GET {prefix}/runs/counts`: how many runs the filter takes, per task.
- `GET {prefix}/runs/{id}`: one run with its arguments and every attempt (error, traceback,
  timings).
- `POST {prefix}/runs/{id}/replay`: start a FAILURE or CANCELLED run again; a body
  `{"args": {...}}` edits arguments (422 naming a bad one). 201 with the new run.
- `POST {prefix}/runs/{id}/cancel`: cancel a waiting run, ask a running one to stop.
- `DELETE {prefix}/runs/{id}`: discard a finished run (204).
- `POST {prefix}/runs/replay`: replay every run a JSON `RunFilter` body takes
  (`{"dead": true}`: the whole dead-letter queue); `{"replayed": n}`.
- `POST {prefix}/runs/purge`: delete every finished run a JSON `RunFilter` body takes.
- `GET {prefix}/schedules`: every schedule with its next fire and last run.
- `POST {prefix}/schedules/{name}/pause`, `.../resume`: stop and restart a schedule's fires.
- `POST {prefix}/schedules/{name}/run-now`: fire it now; 201 with the run.
- `GET {prefix}/queues`: every queue with its backlog, held runs and pause.
- `POST {prefix}/queues/{name}/pause`, `.../resume`: hold a queue's runs, and let them go.

Unknown ids, schedule and queue names answer 404, a run in the wrong state 409 (saying why).

Mount it with a prefix: `app.include_router(jobs.admin_router(), prefix="/admin/jobs")`. Every
route asks `authorize(request, action)` first; the default lets loopback callers only, so an
admin API reachable from elsewhere needs an `authorize` of yours (a token, a session check).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Annotated, Any, Literal, Protocol

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request, Response
from pydantic import BaseModel, Field

from offload.core.handle import RunHandle
from offload.core.overview import QueueStatus
from offload.core.run import RunDetail, RunFilter, RunPage, RunStatus
from offload.core.schedule import ScheduleStatus
from offload.errors import (
    ConfigurationError,
    QueueNotFoundError,
    RunNotFoundError,
    RunStateError,
    ScheduleNotFoundError,
    TaskArgumentsError,
)
from offload.web.api import RunQuery, is_loopback

AdminAction = Literal["read", "cancel", "replay", "discard", "purge", "schedule", "queue"]
AdminAuthorize = Callable[[Request, AdminAction], bool | Awaitable[bool]]
"""`authorize(request, action) -> bool` (or an awaitable of one)."""


class Admin(Protocol):
    """What the admin API asks: `Offload` answers it."""

    async def list_runs(
        self, where: RunFilter | None = None, *, limit: int = 50, cursor: str | None = None
    ) -> RunPage: ...

    async def count_runs(self, where: RunFilter | None = None) -> dict[str, int]: ...

    async def get_run(self, run_id: str) -> RunDetail: ...

    async def status(self, run_id: str) -> RunStatus: ...

    async def cancel(self, run_id: str) -> RunStatus: ...

    async def replay(
        self, run_id: str, args: Mapping[str, Any] | None = None
    ) -> RunHandle[Any]: ...

    async def replay_all(self, where: RunFilter | None = None) -> int: ...

    async def discard(self, run_id: str) -> None: ...

    async def purge(self, where: RunFilter | None = None) -> int: ...

    async def list_schedules(self) -> list[ScheduleStatus]: ...

    async def pause_schedule(self, name: str) -> ScheduleStatus: ...

    async def resume_schedule(self, name: str) -> ScheduleStatus: ...

    async def run_schedule_now(self, name: str) -> RunHandle[Any]: ...

    async def list_queues(self) -> list[QueueStatus]: ...

    async def pause_queue(self, name: str) -> QueueStatus: ...

    async def resume_queue(self, name: str) -> QueueStatus: ...


class ReplayRequest(BaseModel):
    """Arguments to change in the replay; the others stay as the failed run had them."""

    args: dict[str, Any] = Field(default_factory=dict)


class Replayed(BaseModel):
    replayed: int


class Purged(BaseModel):
    purged: int


def loopback_admin(request: Request, _action: AdminAction) -> bool:
    """The default `authorize`: callers on this machine only."""
    return is_loopback(request)


@contextlib.contextmanager
def _as_http() -> Iterator[None]:
    """offload's errors as the HTTP answers a client can act on."""
    try:
        yield
    except (RunNotFoundError, ScheduleNotFoundError, QueueNotFoundError) as exc:
        raise HTTPException(404, detail=str(exc)) from None
    except RunStateError as exc:
        raise HTTPException(409, detail=str(exc)) from None
    except TaskArgumentsError as exc:
        raise HTTPException(422, detail=exc.errors or [{"loc": [], "msg": str(exc)}]) from None
    except ConfigurationError as exc:
        raise HTTPException(500, detail=str(exc)) from None
    except ValueError as exc:  # a cursor this API did not hand out
        raise HTTPException(400, detail=str(exc)) from None


def build_admin_router(jobs: Admin, authorize: AdminAuthorize | None = None) -> APIRouter:
    """The admin API of `jobs`; see the module docstring."""
    decide = authorize or loopback_admin

    def allow(action: AdminAction) -> Any:
        async def check(request: Request) -> None:
            verdict = decide(request, action)
            if inspect.isawaitable(verdict):
                verdict = await verdict
            if not verdict:
                raise HTTPException(403, detail=f"not allowed to {action} runs here")

        return Depends(check)

    router = APIRouter(tags=["offload admin"])

    @router.get("/runs", response_model=RunPage, dependencies=[allow("read")])
    async def list_runs(
        where: RunQuery,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: str | None = None,
    ) -> RunPage:
        with _as_http():
            return await jobs.list_runs(where, limit=limit, cursor=cursor)

    @router.get("/runs/counts", dependencies=[allow("read")])
    async def count_runs(where: RunQuery) -> dict[str, int]:
        return await jobs.count_runs(where)

    @router.post("/runs/replay", response_model=Replayed, dependencies=[allow("replay")])
    async def replay_all(where: Annotated[RunFilter, Body()]) -> Replayed:
        with _as_http():
            return Replayed(replayed=await jobs.replay_all(where))

    @router.post("/runs/purge", response_model=Purged, dependencies=[allow("purge")])
    async def purge(where: Annotated[RunFilter, Body()]) -> Purged:
        return Purged(purged=await jobs.purge(where))

    @router.get("/runs/{run_id}", response_model=RunDetail, dependencies=[allow("read")])
    async def get_run(run_id: str) -> RunDetail:
        with _as_http():
            return await jobs.get_run(run_id)

    @router.post(
        "/runs/{run_id}/replay",
        response_model=RunStatus,
        status_code=201,
        dependencies=[allow("replay")],
    )
    async def replay(run_id: str, body: ReplayRequest | None = None) -> RunStatus:
        with _as_http():
            handle = await jobs.replay(run_id, body.args if body else None)
            return await jobs.status(handle.id)

    @router.post("/runs/{run_id}/cancel", response_model=RunStatus, dependencies=[allow("cancel")])
    async def cancel(run_id: str) -> RunStatus:
        with _as_http():
            return await jobs.cancel(run_id)

    @router.delete("/runs/{run_id}", status_code=204, dependencies=[allow("discard")])
    async def discard(run_id: str) -> Response:
        with _as_http():
            await jobs.discard(run_id)
        return Response(status_code=204)

    @router.get("/schedules", response_model=list[ScheduleStatus], dependencies=[allow("read")])
    async def list_schedules() -> list[ScheduleStatus]:
        return await jobs.list_schedules()

    @router.post(
        "/schedules/{name}/pause", response_model=ScheduleStatus, dependencies=[allow("schedule")]
    )
    async def pause_schedule(name: str) -> ScheduleStatus:
        with _as_http():
            return await jobs.pause_schedule(name)

    @router.post(
        "/schedules/{name}/resume", response_model=ScheduleStatus, dependencies=[allow("schedule")]
    )
    async def resume_schedule(name: str) -> ScheduleStatus:
        with _as_http():
            return await jobs.resume_schedule(name)

    @router.post(
        "/schedules/{name}/run-now",
        response_model=RunStatus,
        status_code=201,
        dependencies=[allow("schedule")],
    )
    async def run_schedule_now(name: str) -> RunStatus:
        with _as_http():
            handle = await jobs.run_schedule_now(name)
            return await jobs.status(handle.id)

    @router.get("/queues", response_model=list[QueueStatus], dependencies=[allow("read")])
    async def list_queues() -> list[QueueStatus]:
        return await jobs.list_queues()

    @router.post("/queues/{name}/pause", response_model=QueueStatus, dependencies=[allow("queue")])
    async def pause_queue(name: str) -> QueueStatus:
        with _as_http():
            return await jobs.pause_queue(name)

    @router.post("/queues/{name}/resume", response_model=QueueStatus, dependencies=[allow("queue")])
    async def resume_queue(name: str) -> QueueStatus:
        with _as_http():
            return await jobs.resume_queue(name)

    return router
