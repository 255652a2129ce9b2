"""The dashboard's pages and actions: server-rendered HTML, refreshed in place while open.

Each page renders one Jinja2 template. Its `live` block is what changes: `dashboard.js` asks
for the page again every two seconds with `X-Offload-Fragment: live` and swaps that block in,
so a run turns green, a failure appears and a count moves without a reload (and without a
front-end build). Actions are plain HTML forms (POST, then a redirect back with what was
done), so every action also works without the script.

Every list is one page of the ledger (`limit` rows and a cursor), never loaded whole.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import parse_qs, urlencode

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from offload import metrics
from offload.core.overview import Overview
from offload.core.run import DEAD_RUNS, RunFilter, RunState, WorkerStatus
from offload.errors import (
    ConfigurationError,
    QueueNotFoundError,
    RunNotFoundError,
    RunStateError,
    ScheduleNotFoundError,
    TaskArgumentsError,
)
from offload.web import guard
from offload.web.admin import Admin
from offload.web.dashboard.access import (
    CSRF_COOKIE,
    CSRF_FIELD,
    Access,
    Action,
    DashboardAuth,
    Refusal,
    csrf_refusal,
    csrf_token,
)

logger = logging.getLogger("offload.dashboard")

PAGE_SIZE = 50
MAX_FORM_BYTES = 1 << 20
"""A replay's edited arguments travel in a form; more than this is refused (413)."""
FRAGMENT_HEADER = "x-offload-fragment"


class Operations(Admin, Protocol):
    """What the dashboard asks: `Offload` answers it."""

    async def overview(self, *, running_limit: int = 100) -> Overview: ...

    async def workers(self) -> list[WorkerStatus]: ...


class _Refused(Exception):
    def __init__(self, refusal: Refusal) -> None:
        self.refusal = refusal


Handler = Callable[[Request], Awaitable[Response]]


class Dashboard:
    """The dashboard as an ASGI app: `app.mount("/offload", jobs.dashboard(auth=...))`."""

    def __init__(self, jobs: Operations, auth: DashboardAuth | None) -> None:
        self.jobs = jobs
        self.access = Access(auth)
        self.templates = Environment(
            loader=PackageLoader("offload.web.dashboard", "templates"),
            autoescape=select_autoescape(default=True),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters.update(
            pretty=lambda value: json.dumps(value, indent=2, sort_keys=True, default=str),
            when=_when,
            timestamp=lambda at: _when(datetime.fromtimestamp(at, UTC)),
            seconds=_seconds,
        )
        static = StaticFiles(packages=[("offload.web.dashboard", "static")])
        self.app = Starlette(
            routes=[
                Route("/", self._page("read", self.overview)),
                Route("/runs", self._page("read", self.runs)),
                Route("/runs/{run_id}", self._page("read", self.run)),
                self._action("/runs/{run_id}/cancel", "cancel", self.cancel),
                self._action("/runs/{run_id}/replay", "replay", self.replay),
                self._action("/runs/{run_id}/discard", "discard", self.discard),
                Route("/dead", self._page("read", self.dead)),
                Route("/dead/confirm", self._page("read", self.confirm)),
                self._action("/dead/replay", "replay", self.replay_dead),
                self._action("/dead/purge", "purge", self.purge_dead),
                Route("/dead/{run_id}", self._page("read", self.dead_run)),
                Route("/queues", self._page("read", self.queues)),
                Route("/schedules", self._page("read", self.schedules)),
                self._action("/schedules/{name}/{verb}", "schedule", self.schedule),
                self._action("/queues/{name}/{verb}", "queue", self.queue),
                Mount("/static", self._guarded(static)),
            ],
            exception_handlers={HTTPException: self._http_error},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)

    # --- access ---------------------------------------------------------------------------

    def _page(self, action: Action, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            refusal = await self.access.refusal(request, action)
            if refusal is not None:
                return self._refused(request, refusal)
            return await self._answer(request, handler)

        return endpoint

    def _action(self, path: str, action: Action, handler: Handler) -> Route:
        async def endpoint(request: Request) -> Response:
            refusal = await self.access.refusal(request, action)
            if refusal is None:
                try:
                    form = await _form(request)
                except _Refused as refused:
                    refusal = refused.refusal
                else:
                    refusal = csrf_refusal(request, form.get(CSRF_FIELD))
                    request.state.form = form
            if refusal is not None:
                return self._refused(request, refusal)
            return await self._answer(request, handler)

        return Route(path, endpoint, methods=["POST"])

    def _guarded(self, app: StaticFiles) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            request = Request(scope, receive)
            refusal = await self.access.refusal(request, "read")
            if refusal is not None:
                await self._refused(request, refusal)(scope, receive, send)
            else:
                await app(scope, receive, send)

        return guarded

    async def _answer(self, request: Request, handler: Handler) -> Response:
        try:
            return await handler(request)
        except (RunNotFoundError, ScheduleNotFoundError, QueueNotFoundError) as exc:
            return self._message(request, 404, "Not found", str(exc))
        except RunStateError as exc:
            return self._message(request, 409, "Not possible now", str(exc))
        except ConfigurationError as exc:
            return self._message(request, 500, "This app cannot do that", str(exc))
        except (ValueError, ValidationError) as exc:  # a cursor or filter the page did not make
            return self._message(request, 400, "Bad request", _first_line(exc))

    def _refused(self, request: Request, refusal: Refusal) -> Response:
        title = "Sign in" if refusal.status == 401 else "Refused"
        response = self.render(
            request,
            "message.html",
            refusal.status,
            trusted=False,
            title=title,
            message=refusal.message,
        )
        if refusal.challenge is not None:
            response.headers["www-authenticate"] = refusal.challenge
        return response

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        refusal = await self.access.refusal(request, "read")
        if refusal is not None:  # an unknown path tells a stranger nothing either
            return self._refused(request, refusal)
        if exc.status_code == 404:
            return self._message(request, 404, "Not found", "No dashboard page lives here.")
        return self._message(request, exc.status_code, "Error", str(exc.detail))

    # --- rendering ------------------------------------------------------------------------

    def render(
        self,
        request: Request,
        name: str,
        status: int = 200,
        *,
        trusted: bool = True,
        **context: Any,
    ) -> Response:
        """`name` rendered; a `trusted` caller (one that passed the access check) also gets
        a CSRF cookie if it has none."""
        token, new = csrf_token(request) if trusted else ("", False)
        base = request.scope.get("root_path", "").rstrip("/")
        context.setdefault("problems", None)
        context.setdefault("edited", None)
        context.update(
            base=base,
            csrf=token,
            csrf_field=CSRF_FIELD,
            done=request.query_params.get("done"),
            path=request.url.path,
        )
        template = self.templates.get_template(name)
        live = template.blocks.get("live")
        # A page shown in answer to a POST (a replay refused) has no URL to poll.
        context["poll"] = live is not None and request.method == "GET"
        if request.headers.get(FRAGMENT_HEADER) == "live" and live is not None:
            html = "".join(live(template.new_context(context)))
        else:
            html = template.render(context)
        response = HTMLResponse(html, status)
        response.headers.update(
            {
                "cache-control": "no-store",
                "x-frame-options": "DENY",
                "x-content-type-options": "nosniff",
                "referrer-policy": "same-origin",
                "content-security-policy": (
                    "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                    "form-action 'self'; base-uri 'none'"
                ),
            }
        )
        if new:
            response.set_cookie(
                CSRF_COOKIE,
                token,
                path=f"{base}/",
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
            )
        return response

    def _message(self, request: Request, status: int, title: str, message: str) -> Response:
        return self.render(request, "message.html", status, title=title, message=message)

    def _back(self, request: Request, to: str, done: str) -> Response:
        base = request.scope.get("root_path", "").rstrip("/")
        joiner = "&" if "?" in to else "?"
        return RedirectResponse(f"{base}{to}{joiner}{urlencode({'done': done})}", 303)

    # --- pages ----------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        overview = await self.jobs.overview()
        busiest = max((m.total for m in overview.minutes), default=0)
        return self.render(
            request,
            "overview.html",
            overview=overview,
            busiest=max(busiest, 1),
            states=list(RunState),
            inline=metrics.inline_counts(),
            blocks=list(reversed(guard.RECENT)),
        )

    async def runs(self, request: Request) -> Response:
        query = request.query_params
        where = RunFilter(
            states=tuple(RunState(s) for s in query.getlist("state") if s),
            task=query.get("task") or None,
            queue=query.get("queue") or None,
            error=query.get("error") or None,
            dead=True if query.get("dead") else None,
        )
        cursor = query.get("cursor") or None
        page = await self.jobs.list_runs(where, limit=PAGE_SIZE, cursor=cursor)
        return self.render(
            request,
            "runs.html",
            page=page,
            where=where,
            states=list(RunState),
            cursor=cursor,
            more=_with(query, cursor=page.next_cursor) if page.next_cursor else None,
        )

    async def run(self, request: Request, *, status: int = 200, **context: Any) -> Response:
        run = await self.jobs.get_run(request.path_params["run_id"])
        return self.render(request, "run.html", status, run=run, **context)

    async def dead_run(self, request: Request, *, status: int = 200, **context: Any) -> Response:
        run = await self.jobs.get_run(request.path_params["run_id"])
        if not run.dead:
            return self._back(request, f"/runs/{run.id}", "This run is not a dead letter.")
        return self.render(request, "dead_run.html", status, run=run, **context)

    async def dead(self, request: Request) -> Response:
        where = _dead_filter(request.query_params)
        cursor = request.query_params.get("cursor") or None
        page = await self.jobs.list_runs(where, limit=PAGE_SIZE, cursor=cursor)
        counts = await self.jobs.count_runs(where)
        query = request.query_params
        return self.render(
            request,
            "dead.html",
            page=page,
            where=where,
            counts=sorted(counts.items()),
            total=sum(counts.values()),
            filters=_dead_fields(query),
            cursor=cursor,
            more=_with(query, cursor=page.next_cursor) if page.next_cursor else None,
        )

    async def confirm(self, request: Request) -> Response:
        action = request.query_params.get("action")
        if action not in ("replay", "purge"):
            return self._message(request, 400, "Bad request", "action must be replay or purge")
        where = _dead_filter(request.query_params)
        if action == "replay":
            where = where.model_copy(update={"replayed": False})
        total = sum((await self.jobs.count_runs(where)).values())
        return self.render(
            request,
            "confirm.html",
            action=action,
            total=total,
            filters=_dead_fields(request.query_params),
        )

    async def queues(self, request: Request) -> Response:
        consumers: dict[str, list[str]] = {}
        for worker in await self.jobs.workers():
            if worker.alive:
                for queue in worker.queues:
                    consumers.setdefault(queue, []).append(worker.name)
        return self.render(
            request, "queues.html", queues=await self.jobs.list_queues(), consumers=consumers
        )

    async def schedules(self, request: Request) -> Response:
        return self.render(request, "schedules.html", schedules=await self.jobs.list_schedules())

    # --- actions --------------------------------------------------------------------------

    async def cancel(self, request: Request) -> Response:
        status = await self.jobs.cancel(request.path_params["run_id"])
        said = "Cancelled." if status.is_terminal else "Asked the run to stop."
        return self._back(request, f"/runs/{status.id}", said)

    async def replay(self, request: Request) -> Response:
        form: dict[str, str] = request.state.form
        run_id = request.path_params["run_id"]
        page = self.dead_run if form.get("from") == "dead" else self.run
        text = form.get("args", "").strip()
        edits: Any = None
        if text:
            try:
                edits = json.loads(text)
            except ValueError as exc:
                problem = f"The arguments are not JSON: {exc}."
                return await page(request, status=422, problems=[problem], edited=text)
            if not isinstance(edits, dict):
                problem = "The arguments must be a JSON object of names and values."
                return await page(request, status=422, problems=[problem], edited=text)
        try:
            handle = await self.jobs.replay(run_id, edits)
        except TaskArgumentsError as exc:
            return await page(request, status=422, problems=_problems(exc), edited=text)
        return self._back(request, f"/runs/{handle.id}", f"Replay of run {run_id} started.")

    async def discard(self, request: Request) -> Response:
        run_id = request.path_params["run_id"]
        await self.jobs.discard(run_id)
        return self._back(request, "/dead", f"Run {run_id} discarded.")

    async def replay_dead(self, request: Request) -> Response:
        form: dict[str, str] = request.state.form
        replayed = await self.jobs.replay_all(_dead_filter(form))
        back = urlencode(_dead_fields(form))
        return self._back(request, f"/dead?{back}", f"Replayed {replayed} dead run(s).")

    async def purge_dead(self, request: Request) -> Response:
        form: dict[str, str] = request.state.form
        purged = await self.jobs.purge(_dead_filter(form))
        return self._back(request, "/dead", f"Deleted {purged} dead run(s).")

    async def queue(self, request: Request) -> Response:
        name, verb = request.path_params["name"], request.path_params["verb"]
        if verb == "pause":
            await self.jobs.pause_queue(name)
            said = f"Queue {name} paused: its runs wait until you resume it."
        elif verb == "resume":
            status = await self.jobs.resume_queue(name)
            said = f"Queue {name} resumed; {status.due} run(s) due."
        else:
            return self._message(request, 404, "Not found", f"No queue action {verb!r}.")
        return self._back(request, "/queues", said)

    async def schedule(self, request: Request) -> Response:
        name, verb = request.path_params["name"], request.path_params["verb"]
        if verb == "pause":
            await self.jobs.pause_schedule(name)
            said = f"Schedule {name} paused."
        elif verb == "resume":
            await self.jobs.resume_schedule(name)
            said = f"Schedule {name} resumed."
        elif verb == "run-now":
            handle = await self.jobs.run_schedule_now(name)
            said = f"Schedule {name} fired now: run {handle.id}."
        else:
            return self._message(request, 404, "Not found", f"No schedule action {verb!r}.")
        return self._back(request, "/schedules", said)


# --- helpers ----------------------------------------------------------------------------------

_DEAD_FIELDS = ("task", "error", "error_type")


def _dead_fields(values: Mapping[str, str]) -> dict[str, str]:
    """The dead-letter filter's fields that are set, to carry in links and forms."""
    return {name: values[name] for name in _DEAD_FIELDS if values.get(name)}


def _dead_filter(values: Mapping[str, str]) -> RunFilter:
    fields = _dead_fields(values)
    return DEAD_RUNS.model_copy(update=fields) if fields else DEAD_RUNS


def _with(query: Any, **changes: str | None) -> str:
    """This page's query string with `changes` (None removes a key)."""
    pairs = [(k, v) for k, v in query.multi_items() if k not in changes and k != "done"]
    pairs += [(k, v) for k, v in changes.items() if v is not None]
    return urlencode(pairs)


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form body, each field's first value. Nothing else is accepted."""
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise _Refused(Refusal(415, "Actions are sent as HTML forms."))
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_FORM_BYTES:
        raise _Refused(Refusal(413, f"The form is larger than {MAX_FORM_BYTES} bytes."))
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise _Refused(Refusal(413, f"The form is larger than {MAX_FORM_BYTES} bytes."))
    try:
        parsed = parse_qs(body.decode(), keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise _Refused(Refusal(400, "The form could not be read.")) from None
    return {name: values[0] for name, values in parsed.items()}


def _problems(exc: TaskArgumentsError) -> list[str]:
    if not exc.errors:
        return [str(exc)]
    found = []
    for error in exc.errors:
        where = ".".join(str(part) for part in error.get("loc", ()))
        found.append(f"{where}: {error.get('msg', '')}" if where else str(error.get("msg", "")))
    return found


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _when(moment: datetime | None) -> str:
    """A time as the page shows it: UTC, to the second."""
    return "" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    return f"{value / 3600:.1f} h"


def mounted_dashboards(app: Any, prefix: str = "") -> list[tuple[str, Dashboard]]:
    """Where an ASGI app mounts dashboards: `(path, dashboard)` pairs (for `offload serve`)."""
    found = []
    for route in getattr(app, "routes", ()):
        if isinstance(route, Mount):
            path = prefix + route.path
            if isinstance(route.app, Dashboard):
                found.append((path or "/", route.app))
            else:
                found.extend(mounted_dashboards(route.app, path))
    return found
