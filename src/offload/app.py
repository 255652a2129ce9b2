"""`Offload`, the facade: owns the settings, the task registry, the ledger and both lanes.

It builds each lane with what the lane needs (settings, clock, the registry, callables for
spilling and publishing) and answers what adapters ask (the status API, the CLI, `RunHandle`s):
nothing below this module imports it. No module globals.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, TypeVar, overload

from offload.core.credentials import BasicAuth, BearerAuth
from offload.core.handle import RunHandle
from offload.core.overview import Minute, Overview, QueueStatus
from offload.core.run import (
    DEAD_RUNS,
    Lane,
    RunDetail,
    RunFilter,
    RunPage,
    RunState,
    RunStatus,
    WorkerStatus,
    new_run_id,
)
from offload.core.schedule import CatchUp, Schedule, SchedulerLease, ScheduleStatus
from offload.core.task import Backoff, Call, Policy, Task, Timeout
from offload.core.threads import BlockingCalls
from offload.errors import (
    ConfigurationError,
    QueueNotFoundError,
    RunStateError,
    ScheduleNotFoundError,
    TaskDefinitionError,
)
from offload.lanes.durable.group import GroupCommit
from offload.ledger import Ledger, queries, retention
from offload.ledger import schedules as ledger_schedules
from offload.settings import Settings

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from celery import Celery
    from fastapi import APIRouter
    from fastapi.params import Depends

    from offload.core.context import TaskContext
    from offload.lanes.durable.lane import DurableLane
    from offload.lanes.durable.scheduler import Scheduler
    from offload.lanes.inline.lane import InlineLane
    from offload.web.admin import AdminAuthorize
    from offload.web.api import Authorize
    from offload.web.dashboard import Dashboard, DashboardAuth
    from offload.web.fastapi import ExceptionHandlers, Lifespan

P = ParamSpec("P")
R = TypeVar("R")

REPLAY_BATCH = 500
"""Runs one step of a bulk replay reads, records and publishes."""


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
        self.schedules: dict[str, Schedule] = {}
        self._blocking = BlockingCalls()
        self._dispatch = _Dispatch(self, self._blocking)
        self._durable: DurableLane | None = None
        self._inline: InlineLane | None = None
        self._router: APIRouter | None = None

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
        if name in self.tasks:
            existing = self.tasks[name].fn
            where = f"{inspect.getsourcefile(existing)}:{existing.__code__.co_firstlineno}"
            raise TaskDefinitionError(
                f"Task {name!r} is already registered ({where}); give one of them name='...'"
            )
        task: Task[Any, Any] = Task(self._dispatch, fn, name, policy)
        self.tasks[name] = task
        if policy.runs_on_workers:
            # A spilling inline task must also be known to workers, which run its overflow.
            self.durable.register(task)
        return task

    # --- schedules -------------------------------------------------------------------------

    def periodic(
        self,
        *,
        cron: str | None = None,
        every: timedelta | float | None = None,
        timezone: str = "UTC",
        args: Mapping[str, Any] | None = None,
        name: str | None = None,
        catch_up: CatchUp = "once",
        max_catch_up: int = 100,
    ) -> Callable[[Task[P, R]], Task[P, R]]:
        """Run a durable task on a schedule: `@jobs.periodic(cron="0 3 * * *",
        timezone="Europe/Paris")` or `@jobs.periodic(every=timedelta(minutes=5))`, above
        `@jobs.task(...)` (or on a plain function, declared as a task with the default policy).
        The arguments are `schedule()`'s; returns the task.
        """

        def decorate(target: Task[P, R]) -> Task[P, R]:
            task = target if isinstance(target, Task) else self.task(target)
            self.schedule(
                task,
                cron=cron,
                every=every,
                timezone=timezone,
                args=args,
                name=name,
                catch_up=catch_up,
                max_catch_up=max_catch_up,
            )
            return task

        return decorate

    def schedule(
        self,
        task: Task[Any, Any],
        *,
        cron: str | None = None,
        every: timedelta | float | None = None,
        timezone: str = "UTC",
        args: Mapping[str, Any] | None = None,
        name: str | None = None,
        catch_up: CatchUp = "once",
        max_catch_up: int = 100,
    ) -> Schedule:
        """Declare a schedule of a durable task; several may run one task with other `args`.

        - `cron`: five fields, read on the wall clock of `timezone` (an IANA name); a fire in
          an hour the clock skips runs once at the first minute that exists, an hour the clock
          repeats fires once. Or `every`: whole seconds (or a timedelta), aligned to the epoch.
        - `args`: the task's arguments, validated now (`TaskArgumentsError` names a bad one).
        - `name`: unique (default: the task's name).
        - `catch_up`: what fires missed while no scheduler ran become: `"once"` (one run now),
          `"skip"` (none, unless the latest is at most a minute late), `"all"` (one each, at
          most `max_catch_up`, the latest).
        Schedules fire while a scheduler runs: `offload serve` starts one, `offload beat`
        runs one on its own; several may run (one fires, the others stand by).
        """
        if self.tasks.get(task.name) is not task:
            raise TaskDefinitionError(f"{task.name!r} is not a task of this app: declare it first")
        if task.policy.lane is not Lane.DURABLE:
            raise TaskDefinitionError(
                f"schedule of {task.name!r}: schedules run durable tasks (this one is inline)"
            )
        name = name or task.name
        if name in self.schedules:
            raise TaskDefinitionError(
                f"schedule {name!r} is already declared; give the second one name='...'"
            )
        every_s = every.total_seconds() if isinstance(every, timedelta) else every
        if every_s is not None and every_s != int(every_s):
            raise TaskDefinitionError(f"schedule {name!r}: every= takes whole seconds")
        call = task.prepare((), dict(args or {}))
        schedule = Schedule(
            name=name,
            task=task.name,
            args=call.kwargs,
            cron=cron,
            every_s=None if every_s is None else int(every_s),
            timezone=timezone,
            catch_up=catch_up,
            max_catch_up=max_catch_up,
        )
        self.schedules[name] = schedule
        return schedule

    def scheduler(self) -> Scheduler:
        """A scheduler for this app's schedules (`offload beat` and `offload serve` run one)."""
        from offload.lanes.durable.scheduler import Scheduler

        return Scheduler(
            self.ledger,
            self.schedules,
            self.tasks,
            self.durable.publish,
            lease_s=self.settings.scheduler_lease_s,
            clock=self.clock,
        )

    def list_schedules_sync(self) -> list[ScheduleStatus]:
        """Every schedule with its next fire and last run: the ledger's, and those declared
        here that no scheduler has recorded yet."""
        known = self.ledger.read(ledger_schedules.list_statuses)
        now = self.clock()
        recorded = {status.name for status in known}
        for schedule in self.schedules.values():
            if schedule.name not in recorded:
                known.append(
                    ScheduleStatus(
                        name=schedule.name,
                        task=schedule.task,
                        spec=schedule.spec,
                        args=schedule.args,
                        catch_up=schedule.catch_up,
                        paused=False,
                        next_fire_at=queries.as_datetime(schedule.next_fire(now)),
                        last_fire_at=None,
                        last_run_id=None,
                        last_run_state=None,
                    )
                )
        return sorted(known, key=lambda status: status.name)

    async def list_schedules(self) -> list[ScheduleStatus]:
        """Async twin of `list_schedules_sync()`."""
        return await self._blocking.run(self.list_schedules_sync)

    def pause_schedule_sync(self, name: str) -> ScheduleStatus:
        """Stop a schedule firing until it is resumed. Raises `ScheduleNotFoundError`."""
        return self._set_paused(name, True)

    async def pause_schedule(self, name: str) -> ScheduleStatus:
        """Async twin of `pause_schedule_sync()`."""
        return await self._blocking.run(self._set_paused, name, True)

    def resume_schedule_sync(self, name: str) -> ScheduleStatus:
        """Let a paused schedule fire again, from its next fire time (missed fires are not
        caught up). Raises `ScheduleNotFoundError`."""
        return self._set_paused(name, False)

    async def resume_schedule(self, name: str) -> ScheduleStatus:
        """Async twin of `resume_schedule_sync()`."""
        return await self._blocking.run(self._set_paused, name, False)

    def _set_paused(self, name: str, paused: bool) -> ScheduleStatus:
        declared = self.schedules.get(name)

        def write(conn: Any) -> ScheduleStatus:
            if declared is not None:
                ledger_schedules.ensure(conn, declared, self.clock())
            return ledger_schedules.set_paused(conn, name, paused, self.clock())

        return self.ledger.write(write)

    def run_schedule_now_sync(self, name: str) -> RunHandle[Any]:
        """Fire a schedule now, besides its timing; a run like its other fires. Needs the
        schedule declared in this app (it publishes). Raises `ScheduleNotFoundError`."""
        if name not in self.schedules:
            known = {s.name for s in self.ledger.read(ledger_schedules.list_statuses)}
            if name in known:
                raise ConfigurationError(
                    f"schedule {name!r} is not declared in this app: running it publishes, so "
                    "it needs the app that declares it (CLI: --app MODULE:jobs or OFFLOAD_APP)"
                )
            raise ScheduleNotFoundError(name, sorted(known | set(self.schedules)))
        return RunHandle(self, self.scheduler().run_now(name))

    async def run_schedule_now(self, name: str) -> RunHandle[Any]:
        """Async twin of `run_schedule_now_sync()`."""
        return await self._blocking.run(self.run_schedule_now_sync, name)

    # --- queues ------------------------------------------------------------------------
    # A paused queue's runs wait: a worker that gets one leaves it in the ledger, held, and
    # acknowledges its message; the resume publishes the held runs again. Ledger-driven, so
    # it reads the same on every broker and holds for workers started later.

    def list_queues_sync(self) -> list[QueueStatus]:
        """Every queue a task here declares, a live worker consumes, a run waits in or someone
        paused: its backlog, its oldest run's wait, whether it is paused."""
        now = self.clock()

        def read(conn: Any) -> list[QueueStatus]:
            found = {q.name: q for q in queries.queue_statuses(conn, now)}
            stale = self.settings.stale_after_s
            names = queries.consumed_queues(conn, now, stale) | set(found)
            names |= {t.queue for t in self.tasks.values() if t.policy.runs_on_workers}
            names.add(self.settings.default_queue)
            idle = {"due": 0, "held": 0, "oldest_wait_s": None, "paused": False, "paused_at": None}
            return [found.get(n) or QueueStatus(name=n, **idle) for n in sorted(names)]

        return self.ledger.read(read)

    async def list_queues(self) -> list[QueueStatus]:
        """Async twin of `list_queues_sync()`."""
        return await self._blocking.run(self.list_queues_sync)

    def pause_queue_sync(self, name: str) -> QueueStatus:
        """Pause a queue: workers start none of its runs until it is resumed; those they get
        meanwhile wait in the ledger. Raises `QueueNotFoundError` for a queue nobody uses."""
        self._queue_named(name)
        self.ledger.write(lambda conn: queries.set_queue_paused(conn, name, True, self.clock()))
        return self._queue_named(name)

    async def pause_queue(self, name: str) -> QueueStatus:
        """Async twin of `pause_queue_sync()`."""
        return await self._blocking.run(self.pause_queue_sync, name)

    def resume_queue_sync(self, name: str) -> QueueStatus:
        """Resume a paused queue, publishing again the runs held meanwhile (500 at a time)."""
        self._queue_named(name)
        self.ledger.write(lambda conn: queries.set_queue_paused(conn, name, False, self.clock()))
        self.durable.release_held(name)
        return self._queue_named(name)

    async def resume_queue(self, name: str) -> QueueStatus:
        """Async twin of `resume_queue_sync()`."""
        return await self._blocking.run(self.resume_queue_sync, name)

    def _queue_named(self, name: str) -> QueueStatus:
        known = self.list_queues_sync()
        for queue in known:
            if queue.name == name:
                return queue
        raise QueueNotFoundError(name, [queue.name for queue in known])

    def scheduler_lease_sync(self) -> SchedulerLease | None:
        """Which scheduler fires the schedules now, and until when its lease runs."""
        return self.ledger.read(ledger_schedules.get_lease)

    # --- lanes -----------------------------------------------------------------------------

    @property
    def durable(self) -> DurableLane:
        """The durable lane (built on first use; building it opens no connection)."""
        if self._durable is None:
            from offload.lanes.durable.lane import DurableLane

            self._durable = DurableLane(self.settings, self.ledger, self.tasks)
        return self._durable

    @property
    def celery(self) -> Celery:
        """The Celery app behind the durable lane. Celery's `-A` takes a module attribute:
        name it (`celery_app = jobs.celery`), then `celery -A module:celery_app worker`."""
        return self.durable.celery

    @property
    def inline(self) -> InlineLane:
        """The inline lane (started and stopped by `lifespan`)."""
        if self._inline is None:
            from offload.lanes.inline.lane import InlineLane

            self._inline = InlineLane(
                self.settings,
                clock=self.clock,
                tasks=self.tasks,
                spill=self._spill,
                blocking=self._blocking,
            )
        return self._inline

    def _spill(
        self, task: Task[Any, Any], calls: Sequence[Call], run_ids: Sequence[str] | None
    ) -> list[str]:
        return self.durable.submit(task, calls, run_ids)

    @property
    def is_stopping(self) -> bool:
        """True once the inline lane began shutting down (a signal or the lifespan's end)."""
        return self._inline is not None and self._inline.is_stopping

    # --- FastAPI ---------------------------------------------------------------------------

    @property
    def lifespan(self) -> Lifespan:
        """Starts and stops the inline lane and the event-loop guard: `FastAPI(lifespan=...)`.

        To add your own start-up and shut-down, nest it: `async with jobs.lifespan(app): ...`.
        """
        from offload.web.fastapi import lifespan_of

        return lifespan_of(self.inline, self.settings.loop_block_threshold_s)

    @property
    def deferrals(self) -> Depends:
        """The dependency that makes inline `defer()` run after the response.

        `FastAPI(dependencies=[jobs.deferrals])`, or per route with `dependencies=[...]`.
        """
        from offload.web.fastapi import DEFERRALS

        return DEFERRALS

    @property
    def exception_handlers(self) -> ExceptionHandlers:
        """offload's errors as HTTP responses: `FastAPI(exception_handlers=...)`."""
        from offload.web.fastapi import EXCEPTION_HANDLERS

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

    def admin_router(self, *, authorize: AdminAuthorize | None = None) -> APIRouter:
        """The admin API (replay, discard, purge, cancel, any run's arguments and attempts);
        `authorize(request, action)` decides who may; the default allows loopback callers."""
        from offload.web.admin import build_admin_router

        return build_admin_router(self, authorize=authorize)

    def dashboard(self, *, auth: DashboardAuth | None = None) -> Dashboard:
        """The dashboard as an ASGI app: `app.mount("/offload", jobs.dashboard(auth=...))`.

        `auth` is `BasicAuth(user, password)`, `BearerAuth(token)`, a tuple of both, or an
        `authorize(request, action) -> bool` callable. Without it the settings decide
        (`OFFLOAD_DASHBOARD_PASSWORD`, `OFFLOAD_DASHBOARD_TOKEN`); with neither, the page
        answers on a loopback address only.
        """
        from offload.web.dashboard import Dashboard

        if auth is None:
            configured: list[BasicAuth | BearerAuth] = []
            if self.settings.dashboard_password is not None:
                password = self.settings.dashboard_password.get_secret_value()
                configured.append(BasicAuth(self.settings.dashboard_username, password))
            if self.settings.dashboard_token is not None:
                configured.append(BearerAuth(self.settings.dashboard_token.get_secret_value()))
            auth = tuple(configured) or None
        return Dashboard(self, auth)

    def metrics_app(self) -> Any:
        """Prometheus' `/metrics` as an ASGI app: this process's inline-lane and event-loop
        series and the durable lane's from the ledger (every worker, every machine).
        `app.mount("/metrics", jobs.metrics_app())`."""
        from offload.web.metrics import build_metrics_app

        return build_metrics_app(lambda: self.ledger, self.settings.stale_after_s)

    # --- runs ------------------------------------------------------------------------------
    # Every question has a blocking twin (`..._sync`) and an async form that asks the ledger
    # off the event loop. Inline runs this process holds answer from memory first.

    def run(self, run_id: str) -> RunHandle[Any]:
        """A handle for an existing run id (nothing is checked until you ask it something)."""
        return RunHandle(self, run_id)

    def _inline_holding(self, run_id: str) -> InlineLane | None:
        """The inline lane, if it holds this run (then it answers from memory)."""
        lane = self._inline
        return lane if lane is not None and lane.knows(run_id) else None

    def status_sync(self, run_id: str) -> RunStatus:
        """A run's status. Raises `RunNotFoundError` for an unknown id."""
        found = None if self._inline is None else self._inline.status(run_id)
        return found if found is not None else self.ledger.status(run_id)

    async def status(self, run_id: str) -> RunStatus:
        """Async twin of `status_sync()`."""
        found = None if self._inline is None else self._inline.status(run_id)
        return found if found is not None else await self._blocking.run(self.ledger.status, run_id)

    def get_run_sync(self, run_id: str) -> RunDetail:
        """A run's status with every attempt it made. Raises `RunNotFoundError` if unknown."""
        lane = self._inline_holding(run_id)
        if lane is not None:
            status = self.status_sync(run_id)
            return RunDetail(**dict(status), args=lane.arguments_of(run_id), attempt_history=[])

        def read(conn: Any) -> RunDetail:
            status = queries.get_status(conn, run_id)
            args = queries.get_message(conn, run_id).args
            attempts = queries.get_attempts(conn, run_id)
            return RunDetail(**dict(status), args=args, attempt_history=attempts)

        return self.ledger.read(read)

    async def get_run(self, run_id: str) -> RunDetail:
        """Async twin of `get_run_sync()`."""
        if self._inline_holding(run_id) is not None:
            return self.get_run_sync(run_id)
        return await self._blocking.run(self.get_run_sync, run_id)

    def traceback_sync(self, run_id: str) -> str | None:
        """The traceback of a run's last failed attempt, if any."""
        lane = self._inline_holding(run_id)
        if lane is not None:
            return lane.traceback_of(run_id)
        last = self.ledger.last_attempt(run_id)
        return last.traceback if last is not None else None

    async def traceback(self, run_id: str) -> str | None:
        """Async twin of `traceback_sync()`."""
        if self._inline_holding(run_id) is not None:
            return self.traceback_sync(run_id)
        return await self._blocking.run(self.traceback_sync, run_id)

    def cancel_sync(self, run_id: str) -> RunStatus:
        """Cancel a run (see `RunHandle.cancel_sync`)."""
        lane = self._inline_holding(run_id)
        if lane is not None:
            return lane.cancel_threadsafe(run_id)
        return self.ledger.write(lambda conn: queries.request_cancel(conn, run_id, self.clock()))

    async def cancel(self, run_id: str) -> RunStatus:
        """Async twin of `cancel_sync()`."""
        lane = self._inline_holding(run_id)
        if lane is not None:
            return lane.cancel_threadsafe(run_id)
        return await self._blocking.run(self.cancel_sync, run_id)

    def list_runs_sync(
        self, where: RunFilter | None = None, *, limit: int = 50, cursor: str | None = None
    ) -> RunPage:
        """Runs newest first, inline and durable, that `where` takes; pass `next_cursor` back
        for more. Raises `ValueError` for a cursor this method did not return."""
        where = where or RunFilter()
        after = queries.decode_cursor(cursor) if cursor else None
        found = self.ledger.read(
            lambda conn: queries.list_runs(conn, where, after=after, limit=limit + 1)
        )
        if self._inline is not None and not where.dead and where.queue is None:
            # Inline runs live in this process's memory; they merge into the same order.
            inline = [
                (created, status)
                for created, status in self._inline.listing()
                if where.matches(status) and (after is None or (created, status.id) < after)
            ]
            if inline:
                # Sorted whole: runs deferred in one instant are held in deferral order, not in
                # the (created_at, id) order that pages follow.
                found = sorted([*found, *inline], key=lambda e: (e[0], e[1].id), reverse=True)
        page = found[:limit]
        next_cursor = None
        if len(found) > limit:
            created, last = page[-1]
            next_cursor = queries.encode_cursor(created, last.id)
        return RunPage(runs=[status for _, status in page], next_cursor=next_cursor)

    async def list_runs(
        self, where: RunFilter | None = None, *, limit: int = 50, cursor: str | None = None
    ) -> RunPage:
        """Async twin of `list_runs_sync()`."""
        return await self._blocking.run(
            functools.partial(self.list_runs_sync, where, limit=limit, cursor=cursor)
        )

    def count_runs_sync(self, where: RunFilter | None = None) -> dict[str, int]:
        """How many runs in the ledger `where` takes, per task (`dead_counts` for dead ones)."""
        return self.ledger.read(lambda conn: queries.count_by_task(conn, where or RunFilter()))

    async def count_runs(self, where: RunFilter | None = None) -> dict[str, int]:
        """Async twin of `count_runs_sync()`."""
        return await self._blocking.run(self.count_runs_sync, where)

    # --- fixing runs: replay, discard, purge -----------------------------------------------
    # A replay is a new durable run with the arguments of a FAILURE or CANCELLED one (edited,
    # if asked); the two name each other (`replay_of`, `replayed_by`), and a run is replayed
    # at most once. Bulk operations go `REPLAY_BATCH` runs at a time: memory holds one batch.

    def replay_sync(self, run_id: str, args: Mapping[str, Any] | None = None) -> RunHandle[Any]:
        """Start a failed or cancelled run again; `args` replaces some of its arguments.

        The edited arguments are validated like `defer()`'s (`TaskArgumentsError` names a bad
        one; nothing is written). Raises `RunNotFoundError`, `RunStateError` (not failed or
        cancelled, or already replayed), `ConfigurationError` (a task this app does not
        declare: replaying publishes, so the app must know the task's queue).
        """
        if self._inline_holding(run_id) is not None:
            raise RunStateError(
                f"run {run_id} ran in the inline lane, which keeps no run to replay; defer it again"
            )
        status, message = self.ledger.read(
            lambda conn: (queries.get_status(conn, run_id), queries.get_message(conn, run_id))
        )
        refusal = queries.replay_refusal(run_id, status.state, status.replayed_by)
        if refusal is not None:
            raise refusal
        replay = self._replay_of(message, args)
        self.durable.replay([replay], strict=True)
        return RunHandle(self, replay[0].id)

    async def replay(self, run_id: str, args: Mapping[str, Any] | None = None) -> RunHandle[Any]:
        """Async twin of `replay_sync()`."""
        return await self._blocking.run(self.replay_sync, run_id, args)

    def replay_all_sync(
        self, where: RunFilter | None = None, *, on_progress: Callable[[int], None] | None = None
    ) -> int:
        """Replay every FAILURE or CANCELLED run `where` takes that nobody replayed yet.

        `RunFilter(dead=True)` is the whole dead-letter queue. Goes `REPLAY_BATCH` at a time;
        `on_progress(replayed so far)` after each batch. Returns how many were replayed.
        Raises `ConfigurationError` before replaying anything if a task is not declared here.
        """
        where = (where or RunFilter()).within(queries.REPLAYABLE_STATES)
        if where is None or where.replayed:
            return 0
        where = where.model_copy(update={"replayed": False})
        unknown = sorted(set(self.count_runs_sync(where)) - self._worker_tasks())
        if unknown:
            raise _undeclared(unknown)
        total = 0
        after: tuple[float, str] | None = None
        while True:
            batch = self.ledger.read(
                functools.partial(
                    queries.list_messages, where=where, after=after, limit=REPLAY_BATCH
                )
            )
            if not batch:
                return total
            after = (batch[-1][0], batch[-1][1].id)
            replays = [self._replay_of(message, None) for _, message in batch]
            total += len(self.durable.replay(replays, strict=False))
            if on_progress is not None:
                on_progress(total)

    async def replay_all(
        self, where: RunFilter | None = None, *, on_progress: Callable[[int], None] | None = None
    ) -> int:
        """Async twin of `replay_all_sync()`."""
        return await self._blocking.run(
            functools.partial(self.replay_all_sync, where, on_progress=on_progress)
        )

    def _worker_tasks(self) -> set[str]:
        return {name for name, task in self.tasks.items() if task.policy.runs_on_workers}

    def _replay_of(
        self, message: queries.RunMessage, edits: Mapping[str, Any] | None
    ) -> tuple[queries.NewRun, Call]:
        task = self.tasks.get(message.task)
        if task is None or not task.policy.runs_on_workers:
            raise _undeclared([message.task])
        queue = message.queue or task.queue
        if edits:
            # Validated like defer(): the stored arguments with the edits over them.
            call = task.options(queue=queue, priority=message.priority).prepare(
                (), {**message.args, **edits}
            )
        else:
            call = Call(task.name, message.args, queue, message.priority, None, None)
        new = queries.NewRun(
            id=new_run_id(),
            task=task.name,
            lane=Lane.DURABLE,
            queue=call.queue,
            priority=call.priority,
            args=call.kwargs,
            idempotency_key=None,
            replay_of=message.id,
        )
        return new, call

    def discard_sync(self, run_id: str) -> None:
        """Delete one finished run (a dead letter, say) and its attempts, for good.

        Raises `RunNotFoundError`, or `RunStateError` for a run still waiting or running.
        """
        self.ledger.write(lambda conn: queries.discard(conn, run_id))

    async def discard(self, run_id: str) -> None:
        """Async twin of `discard_sync()`."""
        await self._blocking.run(self.discard_sync, run_id)

    def purge_sync(
        self, where: RunFilter | None = None, *, on_progress: Callable[[int], None] | None = None
    ) -> int:
        """Delete every finished run `where` takes, in small batches; how many were deleted.

        Waiting and running runs are never deleted. `RunFilter(dead=True)` empties the
        dead-letter queue; `RunFilter(finished_before=...)` is what retention does.
        """
        return retention.purge(self.ledger, where or RunFilter(), on_progress=on_progress)

    async def purge(
        self, where: RunFilter | None = None, *, on_progress: Callable[[int], None] | None = None
    ) -> int:
        """Async twin of `purge_sync()`."""
        return await self._blocking.run(
            functools.partial(self.purge_sync, where, on_progress=on_progress)
        )

    def workers_sync(self) -> list[WorkerStatus]:
        """The worker processes that reported to the ledger lately, alive or not."""
        stale = self.settings.stale_after_s
        return self.ledger.write(lambda conn: queries.list_workers(conn, self.clock(), stale))

    async def workers(self) -> list[WorkerStatus]:
        """Async twin of `workers_sync()`."""
        return await self._blocking.run(self.workers_sync)

    def overview_sync(self, *, running_limit: int = 100) -> Overview:
        """The durable lane now, in one ledger transaction: runs per state, the last hour's
        finished runs per minute, queue backlogs, workers and the runs they are running."""
        now = self.clock()
        this_minute = int(now // 60)
        first = this_minute - 59

        def read(conn: Any) -> Overview:
            states = queries.count_by_state(conn)
            finished = queries.finished_per_minute(conn, first * 60)
            minutes = [
                Minute(
                    at=datetime.fromtimestamp(m * 60, UTC),
                    succeeded=finished.get((m, RunState.SUCCESS), 0),
                    failed=finished.get((m, RunState.FAILURE), 0)
                    + finished.get((m, RunState.CANCELLED), 0),
                )
                for m in range(first, this_minute + 1)
            ]
            return Overview(
                at=datetime.fromtimestamp(now, UTC),
                states=states,
                dead=sum(queries.count_by_task(conn, DEAD_RUNS).values()),
                minutes=minutes,
                queues=queries.queue_statuses(conn, now),
                workers=queries.list_workers(conn, now, self.settings.stale_after_s),
                running=queries.list_running(conn, running_limit),
            )

        return self.ledger.write(read)  # list_workers forgets long-dead workers

    async def overview(self, *, running_limit: int = 100) -> Overview:
        """Async twin of `overview_sync()`."""
        return await self._blocking.run(
            functools.partial(self.overview_sync, running_limit=running_limit)
        )

    def _rebind(self, settings: Settings, clock: Callable[[], float]) -> Callable[[], None]:
        """Point this app at other settings (stores, broker) and clock until the returned
        function restores it: `offload.testing` gives each test its own. The inline lane
        stays: a FastAPI app's lifespan already holds it."""
        saved = (self.settings, self.clock, self.ledger, self._durable)
        self.settings = settings
        self.clock = clock
        self.ledger = Ledger(
            settings.resolved_ledger_url, clock=clock, busy_timeout_s=settings.ledger_busy_timeout_s
        )
        self._durable = None
        for task in self.tasks.values():
            if task.policy.runs_on_workers:
                self.durable.register(task)

        def restore() -> None:
            if self._durable is not None:
                self._durable.close()
            self.ledger.dispose()
            self.settings, self.clock, self.ledger, self._durable = saved

        return restore

    def check_ledger(self) -> None:
        """Raise `LedgerError` unless the ledger exists; creates nothing (for read-only tools)."""
        self.ledger.require_existing()

    def close(self) -> None:
        """Release connections and threads (the app can be used again afterwards)."""
        self._blocking.close()
        if self._durable is not None:
            self._durable.close()
        self.ledger.dispose()


def _undeclared(names: Sequence[str]) -> ConfigurationError:
    return ConfigurationError(
        f"task(s) {', '.join(map(repr, names))} not declared for workers in this app: replaying "
        "publishes runs, so it needs the app that declares them (CLI: --app MODULE:jobs or "
        "OFFLOAD_APP)"
    )


class _Dispatch:
    """How an `Offload`'s tasks start runs (`core.ports.Dispatch`): on the lane their policy
    names. Kept off `Offload` itself so that this plumbing is not part of the public API."""

    __slots__ = ("_blocking", "_group", "_jobs")

    def __init__(self, jobs: Offload, blocking: BlockingCalls) -> None:
        self._jobs = jobs
        self._blocking = blocking
        self._group = GroupCommit(lambda: jobs.durable, blocking.run)

    @property
    def default_queue(self) -> str:
        return self._jobs.settings.default_queue

    def now(self) -> float:
        return self._jobs.clock()

    def submit(self, task: Task[Any, Any], calls: Sequence[Call]) -> list[RunHandle[Any]]:
        jobs = self._jobs
        if task.policy.lane is Lane.INLINE and calls:
            run_ids = jobs.inline.submit(task, calls)
        else:
            run_ids = jobs.durable.submit(task, calls)
        return [RunHandle(jobs, run_id) for run_id in run_ids]

    async def submit_async(
        self, task: Task[Any, Any], calls: Sequence[Call]
    ) -> list[RunHandle[Any]]:
        jobs = self._jobs
        if task.policy.lane is Lane.INLINE and calls:
            run_ids = await jobs.inline.submit_async(task, calls)
        else:
            # Recording and publishing block on the ledger and the broker: off the loop, and
            # shared with the defers of other requests in flight (one commit for them all).
            run_ids = await self._group.submit(task, calls)
        return [RunHandle(jobs, run_id) for run_id in run_ids]


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
