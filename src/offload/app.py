"""Offload: owns the settings, the task registry, the ledger and both lanes. No module globals."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, TypeVar, overload

from offload.errors import TaskArgumentsError, TaskDefinitionError
from offload.ledger import Ledger, queries
from offload.run import Lane, RunHandle, RunStatus, WorkerStatus, new_run_id
from offload.settings import Settings
from offload.task import Backoff, Call, Policy, Task, Timeout

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from celery import Celery
    from fastapi import APIRouter
    from fastapi.params import Depends

    from offload.context import TaskContext
    from offload.durable import DurableLane
    from offload.fastapi import ExceptionHandlers, Lifespan
    from offload.inline import InlineLane
    from offload.web.api import Authorize

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


class Offload:
    """The background-work layer of one application.

    ```python
    jobs = Offload()                      # embedded default: ./offload-data/*.sqlite

    @jobs.task(retries=5, backoff=Backoff(base=2, cap=300), timeout=120)
    def render_report(ctx: TaskContext, user_id: int) -> str: ...
    ```
    Settings come from the keyword arguments, then `OFFLOAD_*` environment variables, then
    defaults (see `Settings`); `settings=` passes a ready `Settings` instead.
    """

    def __init__(
        self,
        *,
        broker_url: str | None = None,
        ledger_url: str | None = None,
        data_dir: str | Path | None = None,
        settings: Settings | None = None,
        clock: Callable[[], float] = time.time,
        **more_settings: Any,
    ) -> None:
        if settings is None:
            settings = Settings.build(
                broker_url=broker_url, ledger_url=ledger_url, data_dir=data_dir, **more_settings
            )
        self.settings = settings
        self.clock = clock
        self.ledger = Ledger(
            settings.resolved_ledger_url, clock=clock, busy_timeout_s=settings.ledger_busy_timeout_s
        )
        self.tasks: dict[str, Task[Any, Any]] = {}
        self._durable: DurableLane | None = None
        self._inline: InlineLane | None = None
        self._router: APIRouter | None = None
        self._io: ThreadPoolExecutor | None = None

    def __repr__(self) -> str:
        return f"Offload({self.settings!r})"

    # --- declaring tasks -------------------------------------------------------------------

    @overload
    def task(
        self, fn: Callable[Concatenate[TaskContext, P], Coroutine[Any, Any, R]], /
    ) -> Task[P, R]: ...
    @overload
    def task(self, fn: Callable[Concatenate[TaskContext, P], R], /) -> Task[P, R]: ...
    @overload
    def task(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...
    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...
    @overload
    def task(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        lane: Lane | Literal["inline", "durable"] = Lane.DURABLE,
        retries: int = 0,
        backoff: Backoff | None = None,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = (Exception,),
        timeout: float | Timeout | None = None,
        queue: str | None = None,
        priority: int = 0,
        cpu_bound: bool = False,
        spill: bool = False,
    ) -> _Decorator: ...

    def task(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        lane: Lane | Literal["inline", "durable"] = Lane.DURABLE,
        retries: int = 0,
        backoff: Backoff | None = None,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = (Exception,),
        timeout: float | Timeout | None = None,
        queue: str | None = None,
        priority: int = 0,
        cpu_bound: bool = False,
        spill: bool = False,
    ) -> Any:
        """Declare a task. Use bare (`@jobs.task`) or with a policy (`@jobs.task(retries=3)`).

        - `name`: unique task name (default: the function's name).
        - `lane`: `"durable"` (default: persisted, run by workers) or `"inline"` (in this
          process after the response).
        - `retries`: further attempts after a failure (default 0); `backoff`: delay between
          them (`Backoff()`: 1 s doubling to 300 s, full jitter); `retry_on`: exception types
          that earn a retry (default any `Exception`; a task may always raise `Retry`).
        - `timeout`: seconds, or `Timeout(soft=, hard=)`, per attempt.
        - `queue`, `priority` (0..9, higher first), `cpu_bound` (run in a process pool).
        - `spill`: an inline task may go to the durable lane when the inline lane is full.
        """
        if isinstance(timeout, int | float):
            timeout = Timeout(soft=float(timeout))
        policy = Policy(
            lane=Lane(lane),
            retries=retries,
            backoff=backoff or Backoff(),
            retry_on=retry_on if isinstance(retry_on, tuple) else (retry_on,),
            timeout=timeout,
            queue=queue,
            priority=priority,
            cpu_bound=cpu_bound,
            spill=spill,
        )

        def decorate(function: Callable[..., Any]) -> Task[Any, Any]:
            return self._register(function, name or function.__name__, policy)

        return decorate if fn is None else decorate(fn)

    def _register(self, fn: Callable[..., Any], name: str, policy: Policy) -> Task[Any, Any]:
        if not callable(fn):
            raise TaskDefinitionError(f"@task needs a function, got {fn!r}")
        if name in self.tasks:
            existing = self.tasks[name].fn
            where = f"{inspect.getsourcefile(existing)}:{existing.__code__.co_firstlineno}"
            raise TaskDefinitionError(
                f"Task {name!r} is already registered ({where}); give one of them name='...'"
            )
        if policy.spill and policy.lane is not Lane.INLINE:
            raise TaskDefinitionError(
                f"Task {name!r}: spill=True sends inline overflow to the durable lane; "
                "it needs lane='inline'"
            )
        if policy.lane is Lane.INLINE and policy.cpu_bound and "<locals>" in fn.__qualname__:
            raise TaskDefinitionError(
                f"Task {name!r}: a cpu_bound inline task runs in another process, which "
                "imports it by name; declare it at module level"
            )
        task: Task[Any, Any] = Task(self, fn, name, policy)
        self.tasks[name] = task
        if policy.lane is Lane.DURABLE or policy.spill:
            # A spilling inline task must also be known to workers, which run its overflow.
            self.durable.register(task)
        return task

    # --- lanes -----------------------------------------------------------------------------

    @property
    def durable(self) -> DurableLane:
        """The durable lane (built on first use; building it opens no connection)."""
        if self._durable is None:
            from offload.durable import DurableLane

            self._durable = DurableLane(self)
        return self._durable

    @property
    def celery(self) -> Celery:
        """The Celery app behind the durable lane: `celery -A module:jobs.celery worker`."""
        return self.durable.celery

    @property
    def inline(self) -> InlineLane:
        """The inline lane (started and stopped by `lifespan`)."""
        if self._inline is None:
            from offload.inline import InlineLane

            self._inline = InlineLane(self)
        return self._inline

    # --- FastAPI ---------------------------------------------------------------------------

    @property
    def lifespan(self) -> Lifespan:
        """Starts and stops the inline lane and the event-loop guard: `FastAPI(lifespan=...)`.

        To add your own start-up and shut-down, nest it: `async with jobs.lifespan(app): ...`.
        """
        from offload.fastapi import lifespan_of

        return lifespan_of(self)

    @property
    def deferrals(self) -> Depends:
        """The dependency that makes inline `defer()` run after the response.

        `FastAPI(dependencies=[jobs.deferrals])`, or per route with `dependencies=[...]`.
        """
        from offload.fastapi import DEFERRALS

        return DEFERRALS

    @property
    def exception_handlers(self) -> ExceptionHandlers:
        """offload's errors as HTTP responses: `FastAPI(exception_handlers=...)`."""
        from offload.fastapi import EXCEPTION_HANDLERS

        return dict(EXCEPTION_HANDLERS)

    @property
    def router(self) -> APIRouter:
        """The status API with the default `authorize` (loopback callers only)."""
        if self._router is None:
            self._router = self.status_router()
        return self._router

    def status_router(self, *, authorize: Authorize | None = None) -> APIRouter:
        """The status API; `authorize(request, run, action)` decides who sees or cancels what."""
        from offload.web.api import build_router

        return build_router(self, authorize=authorize)

    # --- runs ------------------------------------------------------------------------------

    def run(self, run_id: str) -> RunHandle[Any]:
        """A handle for an existing run id (nothing is checked until you ask it something)."""
        return RunHandle(self, run_id)

    def now(self) -> datetime:
        """The current time, from this app's clock, as an aware UTC datetime."""
        return datetime.fromtimestamp(self.clock(), UTC)

    def submit(self, task: Task[Any, R], calls: Sequence[Call]) -> list[RunHandle[R]]:
        """Start runs of validated calls on the task's lane; the core of every `defer`."""
        if task.policy.lane is Lane.INLINE and calls:
            return self.inline.submit(task, calls)
        return self.submit_durable(task, calls)

    def submit_durable(
        self, task: Task[Any, R], calls: Sequence[Call], run_ids: Sequence[str] | None = None
    ) -> list[RunHandle[R]]:
        """Record and publish validated calls on the durable lane (blocking).

        `run_ids` keeps ids an inline run already has when it spills.
        """
        if not calls:
            return []
        if len(calls) > 1 and any(c.idempotency_key for c in calls):
            raise TaskArgumentsError(
                f"{task.name}: an idempotency_key names one run; defer_many() cannot share it"
            )
        now = self.clock()
        new = [
            queries.NewRun(
                id=run_ids[index] if run_ids else new_run_id(),
                task=task.name,
                lane=Lane.DURABLE,
                queue=call.queue,
                priority=call.priority,
                args=call.kwargs,
                idempotency_key=call.idempotency_key,
                next_attempt_at=now + call.countdown_s if call.countdown_s else None,
            )
            for index, call in enumerate(calls)
        ]
        recorded = self.ledger.write(lambda conn: queries.insert_runs(conn, new, now))
        fresh = [
            (run_id, call)
            for (run_id, created), call in zip(recorded, calls, strict=True)
            if created
        ]
        if fresh:
            try:
                self.durable.publish(task, fresh)
            except Exception:
                # Nothing half-written: a run the broker never got is not a run.
                self.ledger.write(lambda conn: queries.delete_runs(conn, [r for r, _ in fresh]))
                raise
        return [RunHandle(self, run_id) for run_id, _ in recorded]

    async def submit_async(self, task: Task[Any, R], calls: Sequence[Call]) -> list[RunHandle[R]]:
        """`submit()` for the event loop: durable work runs off it."""
        if task.policy.lane is Lane.INLINE and calls:
            return await self.inline.submit_async(task, calls)
        return await self.to_thread(self.submit_durable, task, calls)

    def _inline_status(self, run_id: str) -> RunStatus | None:
        return None if self._inline is None else self._inline.status(run_id)

    def status_sync(self, run_id: str) -> RunStatus:
        """A run's status: inline runs this process holds, then the ledger.

        Raises `RunNotFoundError` for an unknown id.
        """
        found = self._inline_status(run_id)
        return found if found is not None else self.ledger.status(run_id)

    async def status(self, run_id: str) -> RunStatus:
        """Async twin of `status_sync()`; reads the ledger off the event loop."""
        found = self._inline_status(run_id)
        return found if found is not None else await self.to_thread(self.ledger.status, run_id)

    def last_traceback(self, run_id: str) -> str | None:
        """The traceback of a run's last failed attempt, if any."""
        if self._inline is not None and self._inline.knows(run_id):
            return self._inline.traceback_of(run_id)
        last = self.ledger.last_attempt(run_id)
        return last.traceback if last is not None else None

    def cancel_sync(self, run_id: str) -> RunStatus:
        """Cancel a run (see `RunHandle.cancel_sync`)."""
        if self._inline is not None and self._inline.knows(run_id):
            return self._inline.cancel_threadsafe(run_id)
        return self.ledger.write(lambda conn: queries.request_cancel(conn, run_id, self.clock()))

    async def cancel(self, run_id: str) -> RunStatus:
        """Async twin of `cancel_sync()`."""
        if self._inline is not None and self._inline.knows(run_id):
            return self._inline.cancel_threadsafe(run_id)
        return await self.to_thread(self.cancel_sync, run_id)

    def workers_sync(self) -> list[WorkerStatus]:
        """The worker processes that reported to the ledger lately, alive or not."""
        stale = self.settings.stale_after_s
        return self.ledger.write(lambda conn: queries.list_workers(conn, self.clock(), stale))

    async def workers(self) -> list[WorkerStatus]:
        """Async twin of `workers_sync()`."""
        return await self.to_thread(self.workers_sync)

    def decode_result(self, task_name: str, value: Any) -> Any:
        """Turn a stored JSON result back into the task's declared return type."""
        task = self.tasks.get(task_name)
        if task is None:
            return value
        return task.signature.result_adapter.validate_python(value)

    async def to_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking ledger or broker work on offload's own small thread pool."""
        if self._io is None:
            self._io = ThreadPoolExecutor(max_workers=8, thread_name_prefix="offload-io")
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        call = functools.partial(context.run, fn, *args)
        return await loop.run_in_executor(self._io, call)

    def close(self) -> None:
        """Release connections and threads (the app can be used again afterwards)."""
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None
        if self._durable is not None:
            self._durable.celery.close()
        self.ledger.dispose()


if TYPE_CHECKING:

    class _Decorator:
        @overload
        def __call__(
            self, fn: Callable[Concatenate[TaskContext, P], Coroutine[Any, Any, R]], /
        ) -> Task[P, R]: ...
        @overload
        def __call__(self, fn: Callable[Concatenate[TaskContext, P], R], /) -> Task[P, R]: ...
        @overload
        def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...
        @overload
        def __call__(self, fn: Callable[P, R], /) -> Task[P, R]: ...
        def __call__(self, fn: Callable[..., Any], /) -> Any: ...
