"""FastAPI glue: the `deferrals` dependency, offload's errors as HTTP, and the lifespan.

```python
app = FastAPI(
    lifespan=jobs.lifespan,
    exception_handlers=jobs.exception_handlers,
    dependencies=[jobs.deferrals],
)
```
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from types import FrameType
from typing import TYPE_CHECKING, Any

import fastapi
from fastapi import BackgroundTasks, Depends, Request, params
from fastapi.responses import JSONResponse
from starlette.responses import Response

from offload.errors import (
    IdempotencyConflictError,
    LaneFullError,
    OffloadError,
    QueueNotFoundError,
    RunNotFoundError,
    ScheduleNotFoundError,
    TaskArgumentsError,
)
from offload.lanes.inline.deferrals import Deferrals, current_deferrals
from offload.web.guard import LoopGuard

if TYPE_CHECKING:
    from offload.lanes.inline.lane import InlineLane

logger = logging.getLogger("offload.fastapi")

Lifespan = Callable[[Any], AbstractAsyncContextManager[None]]
ExceptionHandler = Callable[[Request, Any], Coroutine[Any, Any, Response]]
ExceptionHandlers = dict[int | type[Exception], ExceptionHandler]


# --- deferring after the response -----------------------------------------------------------


def _stack_closes_after_response() -> bool:
    """FastAPI 0.118 and later close the request's exit stack after the response is sent."""
    major, minor = (int(part) for part in fastapi.__version__.split(".")[:2])
    return (major, minor) >= (0, 118)


async def _deferrals(request: Request) -> None:
    # FastAPI closes this stack after the response and the request's background tasks, and
    # also when the endpoint raised. Asking for no `BackgroundTasks` here keeps FastAPI from
    # attaching one to every response.
    stack = request.scope.get("fastapi_inner_astack")
    if isinstance(stack, AsyncExitStack):
        deferrals = Deferrals()
        current_deferrals.set(deferrals)
        stack.push_async_callback(deferrals.end)


async def _deferrals_before_0_118(request: Request, background_tasks: BackgroundTasks) -> None:
    # These versions close the stack before the response is sent: start the runs as a
    # background task, and from the stack only when none runs (the endpoint raised).
    deferrals = Deferrals(background_tasks.add_task)
    current_deferrals.set(deferrals)
    stack = request.scope.get("fastapi_astack")
    if isinstance(stack, AsyncExitStack):
        stack.push_async_callback(deferrals.end)


DEFERRALS: params.Depends = Depends(
    _deferrals if _stack_closes_after_response() else _deferrals_before_0_118
)
"""`Depends(...)` that starts the request's inline runs once its response is sent."""


# --- errors as HTTP ---------------------------------------------------------------------------


async def _arguments_error(_request: Request, exc: TaskArgumentsError) -> Response:
    return JSONResponse({"detail": exc.errors or [{"loc": [], "msg": str(exc)}]}, 422)


async def _not_found(_request: Request, exc: LookupError) -> Response:
    return JSONResponse({"detail": str(exc)}, 404)


async def _conflict(_request: Request, exc: IdempotencyConflictError) -> Response:
    return JSONResponse({"detail": str(exc), "run_id": exc.run_id}, 409)


async def _lane_full(_request: Request, exc: LaneFullError) -> Response:
    retry_after = str(max(1, math.ceil(exc.retry_after_s)))
    return JSONResponse({"detail": str(exc)}, 503, headers={"Retry-After": retry_after})


async def _offload_error(request: Request, exc: OffloadError) -> Response:
    logger.error(
        "%s %s failed: %s", request.method, request.url.path, exc, exc_info=exc
    )  # the body says only what kind of error, never a traceback or internals
    return JSONResponse(
        {"detail": f"{type(exc).__name__}: internal error in offload; see the server log"}, 500
    )


EXCEPTION_HANDLERS: ExceptionHandlers = {
    TaskArgumentsError: _arguments_error,
    RunNotFoundError: _not_found,
    ScheduleNotFoundError: _not_found,
    QueueNotFoundError: _not_found,
    IdempotencyConflictError: _conflict,
    LaneFullError: _lane_full,
    OffloadError: _offload_error,
}
"""Starlette picks the most specific class of an error, so `OffloadError` catches the rest."""


# --- lifespan ---------------------------------------------------------------------------------


def lifespan_of(lane: InlineLane, loop_block_threshold_s: float) -> Lifespan:
    """The lifespan that starts and stops an inline lane and the event-loop guard."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        await lane.start()
        guard = LoopGuard(loop_block_threshold_s)
        guard.start()
        restore = _on_shutdown_signal(lane)
        try:
            yield
        finally:
            restore()
            try:
                await lane.stop()
            finally:
                guard.stop()

    return lifespan


def _on_shutdown_signal(lane: InlineLane) -> Callable[[], None]:
    """Make SIGTERM and SIGINT stop the lane's intake at once, then call the server's handler.

    uvicorn runs the lifespan's shut-down only after open requests finish; the lane should stop
    taking work (and spill what waits) from the signal on. Only a Python handler that a server
    installed is chained: with none, offload leaves signals alone.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(lane.begin_stop)
        chained = previous[signum]
        chained(signum, frame)

    for signum in (signal.SIGTERM, signal.SIGINT):
        current = signal.getsignal(signum)
        if callable(current):
            previous[signum] = current
            signal.signal(signum, handler)

    def restore() -> None:
        for signum, chained in previous.items():
            if signal.getsignal(signum) is handler:
                signal.signal(signum, chained)

    return restore
