"""The reference service: an ordinary FastAPI app that imports only `offload`'s public API.

Run it with `scripts/serve` (or `offload serve reference.main:app`): the API, a worker and the
scheduler on SQLite files in ./offload-data, and the stand-ins for the outside world (an SMTP
sink, a Slack-style webhook sink, a payment provider simulator) on loopback. The README's
"Reference service" section walks through it with curl.

- `POST /signup`, `POST /login`: a user and a JWT in milliseconds; the welcome email, the
  analytics event, the Slack notice and the default workspace run after the response.
- `POST /reports`: one to twenty PDF reports, each a durable `cpu_bound` run; follow them at
  `GET /reports/{id}` and `/reports/{id}/events`, fetch `/reports/{id}/download`.
- `POST /orders`: a durable payment, exactly once through a flaky provider.
"""

from __future__ import annotations

import contextlib
import html
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import BaseModel, Field, StringConstraints
from starlette.concurrency import run_in_threadpool

from offload import RunNotFoundError, RunState, RunStatus
from reference import auth, store
from reference.auth import CurrentUser
from reference.sinks import MailSink, Outside
from reference.tasks import (
    charge_order,
    config,
    create_default_workspace,
    jobs,
    notify_slack,
    record_event,
    render_report,
    report_path,
    send_welcome_email,
)

dev: dict[str, Any] = {}  # the running stand-ins, when this process started them

Email = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, to_lower=True, max_length=320, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$"
    ),
]
Password = Annotated[str, StringConstraints(min_length=8, max_length=200)]


class Credentials(BaseModel):
    email: Email
    password: Password


class SignedIn(BaseModel):
    user_id: int
    token: str


class ReportRequest(BaseModel):
    count: int = Field(1, ge=1, le=20, description="reports to build at once")
    pages: int = Field(12, ge=2, le=60)


class ReportLinks(BaseModel):
    id: str
    status_url: str
    events_url: str
    download_url: str


class OrderRequest(BaseModel):
    amount_cents: int = Field(gt=0, le=100_000_000)
    currency: Literal["USD", "EUR"] = "USD"


class OrderStatus(BaseModel):
    id: int
    amount_cents: int
    currency: str
    status: Literal["pending", "paid", "payment_failed"]
    charge_id: str | None
    run_id: str | None


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await run_in_threadpool(store.db, config)
    with contextlib.ExitStack() as stack:
        if config.start_sinks:
            mail = stack.enter_context(MailSink(port=config.smtp_port))
            outside = stack.enter_context(
                Outside(
                    port=config.sinks_port,
                    payment_failure_rate=config.payment_failure_rate,
                    payment_latency_s=config.payment_latency_s,
                )
            )
            dev.update(mail=mail, outside=outside)
            print(f"reference: SMTP sink at {mail.url} (read it at /dev/mail)", flush=True)  # noqa: T201
            print(f"reference: Slack webhook sink at {outside.url}/hooks", flush=True)  # noqa: T201
            print(  # noqa: T201
                f"reference: payment provider simulator at {outside.url}/v1/charges "
                f"({config.payment_failure_rate:.0%} of calls fail)",
                flush=True,
            )
        async with jobs.lifespan(app):
            yield
        dev.clear()


app = FastAPI(
    title="offload reference service",
    lifespan=lifespan,
    exception_handlers=jobs.exception_handlers,
    dependencies=[jobs.deferrals],
)


# -- users ------------------------------------------------------------------------------------


def _create_user(email: str, password: str) -> int | None:
    """Hash, insert; None when the email is taken."""
    hashed = auth.hash_password(password)
    try:
        with store.db(config).begin() as conn:
            inserted = store.users.insert().values(
                email=email, password_hash=hashed, created_at=time.time()
            )
            return int(conn.execute(inserted.returning(store.users.c.id)).scalar_one())
    except sa.exc.IntegrityError:
        return None


@app.post("/signup", status_code=201)
async def sign_up(body: Credentials) -> SignedIn:
    user_id = await run_in_threadpool(_create_user, body.email, body.password)
    if user_id is None:
        raise HTTPException(409, f"{body.email} already has an account: POST /login")
    # All four run after the response is sent: the caller waits for none of them.
    await send_welcome_email.defer(body.email)
    await record_event.defer(user_id, "signup")
    await notify_slack.defer(f"New signup: user {user_id}")
    await create_default_workspace.defer(user_id, body.email)
    return SignedIn(user_id=user_id, token=auth.issue_token(user_id))


def _check_password(email: str, password: str) -> int | None:
    with store.db(config).connect() as conn:
        row = conn.execute(sa.select(store.users).where(store.users.c.email == email)).first()
    if row is None or not auth.password_matches(row.password_hash, password):
        return None
    return int(row.id)


@app.post("/login")
async def log_in(body: Credentials) -> SignedIn:
    user_id = await run_in_threadpool(_check_password, body.email, body.password)
    if user_id is None:
        raise HTTPException(401, "wrong email or password")
    return SignedIn(user_id=user_id, token=auth.issue_token(user_id))


# -- reports ----------------------------------------------------------------------------------


def _links(run_id: str) -> ReportLinks:
    base = f"/reports/{run_id}"
    return ReportLinks(
        id=run_id,
        status_url=base,
        events_url=f"{base}/events",
        download_url=f"{base}/download",
    )


def _record_reports(user_id: int, run_ids: list[str], pages: int) -> None:
    with store.db(config).begin() as conn:
        conn.execute(
            store.reports.insert(),
            [
                {"run_id": run_id, "user_id": user_id, "pages": pages, "created_at": time.time()}
                for run_id in run_ids
            ],
        )


async def _users_row(user_id: int, key: sa.Column[Any], value: object) -> Any:
    """The row of `key`'s table whose `key` is `value`, if it is `user_id`'s; else None."""
    table = key.table

    def read() -> Any:
        with store.db(config).connect() as conn:
            mine = sa.select(table).where(key == value, table.c.user_id == user_id)
            return conn.execute(mine).first()

    return await run_in_threadpool(read)


@app.post("/reports", status_code=202)
async def request_reports(body: ReportRequest, user: CurrentUser) -> list[ReportLinks]:
    runs = await render_report.defer_many([{"user_id": user, "pages": body.pages}] * body.count)
    await run_in_threadpool(_record_reports, user, [run.id for run in runs], body.pages)
    await record_event.defer(user, "report")
    return [_links(run.id) for run in runs]


@app.get("/reports")
async def list_reports(user: CurrentUser) -> list[ReportLinks]:
    def mine() -> list[str]:
        with store.db(config).connect() as conn:
            return list(
                conn.execute(
                    sa.select(store.reports.c.run_id)
                    .where(store.reports.c.user_id == user)
                    .order_by(store.reports.c.created_at.desc())
                    .limit(100)
                ).scalars()
            )

    return [_links(run_id) for run_id in await run_in_threadpool(mine)]


@app.get("/reports/{run_id}/download", response_class=FileResponse)
async def download_report(run_id: str, user: CurrentUser) -> FileResponse:
    report = await _users_row(user, store.reports.c.run_id, run_id)
    if report is None:
        raise HTTPException(404, f"no report {run_id[:64]}")
    if report.expired:
        raise HTTPException(410, f"report {run_id} expired and its file was deleted: ask anew")
    status = await jobs.status(run_id)
    path = report_path(config, run_id)
    if status.state is not RunState.SUCCESS or not path.exists():
        raise HTTPException(409, f"report {run_id} is {status.state.value}; wait for SUCCESS")
    return FileResponse(path, media_type="application/pdf", filename=f"report-{run_id}.pdf")


async def _own_report(request: Request, run: RunStatus, _action: str) -> bool:
    """The status routes under /reports show a run only to the user whose report it is."""
    header = request.headers.get("authorization", "")
    user = auth.user_of(header.removeprefix("Bearer ")) if header.startswith("Bearer ") else None
    if user is None or run.task != render_report.name:
        return False
    return await _users_row(user, store.reports.c.run_id, run.id) is not None


# GET /reports/{id}, /reports/{id}/events (Server-Sent Events), POST /reports/{id}/cancel:
# offload's status API behind a token and the ownership check (another user's report is a
# 404, like an unknown one).
app.include_router(
    jobs.status_router(authorize=_own_report),
    prefix="/reports",
    dependencies=[Depends(auth.current_user)],  # no token: 401, as on the other routes
)


# -- orders -----------------------------------------------------------------------------------


def _create_order(user_id: int, body: OrderRequest) -> int:
    with store.db(config).begin() as conn:
        inserted = store.orders.insert().values(
            user_id=user_id,
            amount_cents=body.amount_cents,
            currency=body.currency,
            created_at=time.time(),
        )
        return int(conn.execute(inserted.returning(store.orders.c.id)).scalar_one())


def _set_order_run(order_id: int, run_id: str) -> None:
    with store.db(config).begin() as conn:
        conn.execute(
            store.orders.update()
            .where(store.orders.c.id == order_id, store.orders.c.run_id.is_(None))
            .values(run_id=run_id)
        )


@app.post("/orders", status_code=202)
async def place_order(body: OrderRequest, user: CurrentUser) -> OrderStatus:
    order_id = await run_in_threadpool(_create_order, user, body)
    payment = await charge_order.options(idempotency_key=f"order-{order_id}").defer(order_id)
    await run_in_threadpool(_set_order_run, order_id, payment.id)
    await record_event.defer(user, "order", body.amount_cents)
    await notify_slack.defer(f"Order {order_id}: {body.amount_cents / 100:.2f} {body.currency}")
    return await _order_status(user, order_id)


async def _payment_state(run_id: str) -> Literal["pending", "payment_failed"]:
    """Follow a dead payment's replays to the newest: dead with none is a failed payment."""
    for _ in range(100):
        status = await jobs.status(run_id)
        if status.replayed_by is None:
            return "payment_failed" if status.dead else "pending"
        run_id = status.replayed_by
    return "pending"


async def _order_status(user_id: int, order_id: int) -> OrderStatus:
    row = await _users_row(user_id, store.orders.c.id, order_id)
    if row is None:
        raise HTTPException(404, f"no order {order_id}")
    if row.charge_id:
        state: Literal["pending", "paid", "payment_failed"] = "paid"
    else:
        try:
            state = await _payment_state(row.run_id) if row.run_id else "pending"
        except RunNotFoundError:
            state = "pending"
    return OrderStatus(
        id=row.id,
        amount_cents=row.amount_cents,
        currency=row.currency,
        status=state,
        charge_id=row.charge_id,
        run_id=row.run_id,
    )


@app.get("/orders/{order_id}")
async def get_order(order_id: int, user: CurrentUser) -> OrderStatus:
    return await _order_status(user, order_id)


# -- development pages ------------------------------------------------------------------------


@app.get("/dev/mail", response_class=HTMLResponse, include_in_schema=False)
async def read_mail() -> HTMLResponse:
    """The SMTP sink's messages, newest first (only when this process runs the sink)."""
    mail: MailSink | None = dev.get("mail")
    if mail is None:
        raise HTTPException(404, "this process runs no SMTP sink (REFERENCE_START_SINKS=0)")
    items = "".join(
        f"<li><b>{html.escape(m.subject)}</b> to {html.escape(', '.join(m.to))}"
        f"<pre>{html.escape(m.body)}</pre></li>"
        for m in reversed(mail.messages())
    )
    return HTMLResponse(f"<!doctype html><title>Mail</title><h1>Mail</h1><ul>{items}</ul>")


@app.get("/healthz", include_in_schema=False)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


# What runs, what failed and why: http://127.0.0.1:8000/offload/ (loopback only until
# OFFLOAD_DASHBOARD_PASSWORD or OFFLOAD_DASHBOARD_TOKEN is set).
app.mount("/offload", jobs.dashboard())


# -- input limits -----------------------------------------------------------------------------


def _finite(value: Any) -> Any:
    """JSON cannot carry inf or nan (a body with `1e400` parses to inf): say it as text."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


@app.exception_handler(RequestValidationError)
async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's own handler answered 500 when the error echoed an inf input (`1e400`), and a
    # body sent as text/plain is echoed as bytes: both become text.
    return JSONResponse(
        status_code=422, content={"detail": _finite(jsonable_encoder(exc.errors()))}
    )


Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, announced or streamed."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        announced = dict(scope["headers"]).get(b"content-length")
        if announced is not None and (not announced.isdigit() or int(announced) > self.limit):
            await self._refuse(send)
            return
        seen = 0

        async def counted() -> MutableMapping[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        response = JSONResponse(
            {"detail": f"request bodies are limited to {self.limit} bytes"}, status_code=413
        )
        await response({"type": "http"}, _no_body, send)


class _TooLarge(Exception):
    pass


async def _no_body() -> MutableMapping[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


app.add_middleware(BodyLimit, limit=config.max_body_bytes)
