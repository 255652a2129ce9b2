"""Deferring inside a request: the inline runs a request deferred start after its response.

`current_deferrals` holds the request's `Deferrals` while its endpoint runs (the web glue's
`jobs.deferrals` dependency sets it); the inline lane hands each admitted run's start to it.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Coroutine
from typing import Any


class Deferrals:
    """The inline runs one request deferred; started once its response is sent.

    `end()` starts them: the `jobs.deferrals` dependency has FastAPI call it from the
    request's exit stack, which FastAPI closes after the response and the request's
    background tasks, and also when the endpoint raised. On FastAPI versions that close
    that stack before the response, `schedule` (the request's `BackgroundTasks.add_task`)
    runs `end()` after the response instead. Every run of the request starts at once, so
    they run concurrently (Starlette would run background tasks one after another). A
    deferred run was promised (the caller holds its id), so it starts rather than being lost.
    """

    __slots__ = ("_schedule", "_starts", "closed")

    def __init__(
        self, schedule: Callable[[Callable[[], Coroutine[Any, Any, None]]], Any] | None = None
    ) -> None:
        self._schedule = schedule
        self._starts: list[Callable[[], None]] = []
        self.closed = False

    def add(self, start: Callable[[], None]) -> None:
        """Call `start()` (one run's launch) once the response is sent."""
        if not self._starts and self._schedule is not None:
            self._schedule(self.end)
        self._starts.append(start)

    async def end(self) -> None:
        """The request is over: start every deferred run; later deferrals start at once."""
        self.closed = True
        starts, self._starts = self._starts, []
        for start in starts:
            start()
        if current_deferrals.get() is self:
            current_deferrals.set(None)  # callers sharing one context (tests) start clean


current_deferrals: contextvars.ContextVar[Deferrals | None] = contextvars.ContextVar(
    "offload_deferrals", default=None
)
