"""The event-loop guard: notices when something blocks the loop, and says who.

The loop sets a heartbeat every `interval_s`; a watchdog thread checks it. When the heartbeat is
older than `threshold_s` (default 100 ms) the watchdog samples the loop thread's stack
(`sys._current_frames()`), names what runs there (an inline task, a Starlette background task,
or an endpoint) and logs one warning per culprit of a blocking episode.
`offload_event_loop_blocked_total` counts episodes, `offload_event_loop_blocked_seconds` their
length and `offload_event_loop_lag_seconds` holds the latest lag.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import sysconfig
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from offload import metrics
from offload.lanes.inline import TASK_NAME_PREFIX

logger = logging.getLogger("offload.guard")

_HINT = "blocking calls (time.sleep, requests, sync database drivers, CPU loops) do not belong "
_ADVICE = {
    "inline": "in async def code: await an async equivalent, or declare the task def (it then "
    "runs on the inline lane's threads) or cpu_bound=True (a separate process)",
    "background": "in an async def BackgroundTasks function, which runs on the event loop: await "
    "an async equivalent, declare it def (Starlette runs it on its threadpool), or make it an "
    'offload inline task (@jobs.task(lane="inline"))',
    "endpoint": "in an async def endpoint: await an async equivalent, declare the endpoint def "
    "(FastAPI runs it on its threadpool), or defer the work to a task",
    "other": "on the event loop: await an async equivalent, or run the call in a thread "
    "(await asyncio.to_thread(...))",
}


@dataclass(frozen=True)
class Blocked:
    """One blocking episode, as the guard reported it."""

    at: float  #: when it was noticed (seconds since the epoch)
    stalled_s: float  #: how long the loop had not run by then
    culprit: str
    where: str


RECENT: deque[Blocked] = deque(maxlen=20)
"""This process's latest blocking episodes, newest last: the dashboard's overview shows them.
Per process like the counters: each guard watches a loop of this process."""


class LoopGuard:
    """Watches one event loop; `start()` on the loop, `stop()` when done."""

    def __init__(self, threshold_s: float = 0.1, interval_s: float | None = None) -> None:
        self.threshold_s = threshold_s
        self.interval_s = interval_s if interval_s is not None else min(threshold_s / 4, 0.05)
        self._beat = time.monotonic()
        self._expected = self._beat
        self._flagged = False
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._handle: asyncio.TimerHandle | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start watching the running loop."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._beat = time.monotonic()
        self._expected = self._beat + self.interval_s
        self._handle = self._loop.call_later(self.interval_s, self._tick)
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="offload-loop-guard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (joins the watchdog thread)."""
        self._stop.set()
        if self._handle is not None:
            self._handle.cancel()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _tick(self) -> None:
        now = time.monotonic()
        lag = max(0.0, now - self._expected)
        metrics.LOOP_LAG.set(lag)
        if self._flagged:
            self._flagged = False
            metrics.LOOP_BLOCKED_SECONDS.observe(lag + self.interval_s)
        self._beat = now
        self._expected = now + self.interval_s
        assert self._loop is not None
        self._handle = self._loop.call_later(self.interval_s, self._tick)

    def _watch(self) -> None:
        episode: float | None = None
        named: set[str] = set()
        while not self._stop.wait(self.interval_s):
            beat = self._beat
            stalled = time.monotonic() - beat - self.interval_s
            if episode is not None and beat != episode:
                episode = None  # the loop ran again
            if episode is None and stalled > self.threshold_s:
                episode = beat
                named = set()
                self._flagged = True
                metrics.LOOP_BLOCKED.inc()
            if episode is not None:
                self._report(stalled, episode, named)

    def _report(self, stalled_s: float, episode: float, named: set[str]) -> None:
        """Warn about what blocks the loop now, unless this episode already named it.

        One episode can span several culprits: the loop runs a response and then its
        background tasks without a turn in between, so the endpoint's first-request work and
        a blocking background task are one stall. Each of them is named once.
        """
        frame = sys._current_frames().get(self._loop_thread)
        if frame is None:
            return
        # Read who runs before anything slow (formatting reads source files): once the loop
        # moves on, its task is no longer current and a finished frame forgets its caller.
        task = asyncio.current_task(self._loop) if self._loop is not None else None
        frames = _chain(frame)
        culprit, kind = _culprit(frames, task)
        if culprit in named or (named and self._beat != episode):
            return  # named already, or the loop moved on while we looked
        named.add(culprit)
        where = _where(frames)
        RECENT.append(Blocked(time.time(), stalled_s, culprit, where))
        logger.warning(
            "event loop %s for more than %.0f ms by %s, at %s; %s\nblocking stack:\n%s",
            "still blocked" if len(named) > 1 else "blocked",
            stalled_s * 1000,
            culprit,
            where,
            _advice(kind, frames),
            "".join(_stack(frames)).rstrip(),
        )


def _chain(frame: FrameType) -> list[FrameType]:
    """`frame` and its callers, innermost first, up to the loop's running callback (the
    frames below it, `asyncio.run` and whoever called it, are not what blocks)."""
    frames: list[FrameType] = []
    current: FrameType | None = frame
    while current is not None:
        code = current.f_code
        if frames and code.co_name == "_run" and code.co_filename.endswith("asyncio/events.py"):
            break
        frames.append(current)
        current = current.f_back
    return frames


def _culprit(frames: list[FrameType], task: asyncio.Task[Any] | None) -> tuple[str, str]:
    """Who blocks, and which kind of code that is (a key of `_ADVICE`)."""
    name = task.get_name() if task is not None else ""
    if name.startswith(TASK_NAME_PREFIX):
        task_name, _, run_id = name.removeprefix(TASK_NAME_PREFIX).rpartition(":")
        return f"inline task {task_name!r} (run {run_id})", "inline"
    background = None
    endpoint = None
    for current in frames:
        code = current.f_code
        if background is None and code.co_name == "__call__" and "self" in code.co_varnames:
            owner = current.f_locals.get("self")
            if type(owner).__name__ == "BackgroundTask":
                background = getattr(getattr(owner, "func", None), "__qualname__", "?")
        if endpoint is None and "scope" in code.co_varnames:
            endpoint = _endpoint(current.f_locals.get("scope"))
    if background is not None:
        after = f" after {endpoint}" if endpoint else ""
        return f"BackgroundTasks task {background!r}{after}", "background"
    if endpoint is not None:
        return endpoint, "endpoint"
    return (f"asyncio task {name!r}" if name else "a callback outside any task"), "other"


def _advice(kind: str, frames: list[FrameType]) -> str:
    """What to do about it. With no line of the application on the stack the advice about
    its own code does not fit: say whose code blocks, and when that needs nothing."""
    if any(not _is_library(f.f_code.co_filename) for f in frames):
        return _HINT + _ADVICE[kind]
    outside_stdlib = [f for f in frames if not f.f_code.co_filename.startswith(_STDLIB)]
    owner = _package(outside_stdlib[0].f_code.co_filename) if outside_stdlib else "Python"
    return (
        f"no line of the application is on the stack: {owner} blocks on its own. Once, on a "
        "first request or first use (FastAPI builds /openapi.json on the first request), it "
        "needs nothing; if it recurs, call that code from a thread "
        "(await asyncio.to_thread(...)) or ask its authors"
    )


def _package(filename: str) -> str:
    """The package a library frame belongs to: `fastapi` for .../site-packages/fastapi/x.py."""
    if filename.startswith(_OFFLOAD):
        return "offload"
    if "site-packages" in filename:
        return filename.split("site-packages", 1)[1].strip("/").split("/", 1)[0]
    return "Python"


def _endpoint(scope: Any) -> str | None:
    if not isinstance(scope, dict) or scope.get("type") != "http":
        return None
    route = scope.get("route")
    path = getattr(route, "path", None) or scope.get("path", "?")
    function = getattr(scope.get("endpoint"), "__qualname__", None)
    named = f" ({function})" if function else ""
    return f"endpoint {scope.get('method', '?')} {path}{named}"


_STDLIB = (sysconfig.get_paths()["stdlib"], "<")
_OFFLOAD = str(Path(__file__).resolve().parents[1])  # offload's own frames, installed or not


def _is_library(filename: str) -> bool:
    return filename.startswith((*_STDLIB, _OFFLOAD)) or "site-packages" in filename


def _where(frames: list[FrameType]) -> str:
    """The innermost frame of the application, else of a library (a blocking FastAPI or driver
    call says whose code it is), else the innermost: the standard library's frames never
    name a culprit."""
    chosen = (
        next((f for f in frames if not _is_library(f.f_code.co_filename)), None)
        or next((f for f in frames if not f.f_code.co_filename.startswith(_STDLIB)), None)
        or frames[0]
    )
    return f"{chosen.f_code.co_filename}:{chosen.f_lineno} in {chosen.f_code.co_name}"


def _stack(frames: list[FrameType]) -> list[str]:
    """The formatted stack (`frames` innermost first), outermost first as tracebacks are."""
    summary = traceback.StackSummary.extract((f, f.f_lineno) for f in reversed(frames))
    return summary.format()
