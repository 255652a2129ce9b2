"""The reference service's background work, in both lanes.

Inline (after the response, in the API process): the welcome email, the analytics event, the
Slack notice, the default workspace. Durable (workers, retried, dead-lettered): PDF reports,
payments, and the periodic cleanup and digest.
"""

from __future__ import annotations

import asyncio
import smtplib
import time
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import httpx
import sqlalchemy as sa

from offload import Backoff, Offload, TaskContext
from reference import store
from reference.config import Config
from reference.pdf import Activity, render_pdf

jobs = Offload()
config = Config.from_env()  # read once: the API and each worker inherit one environment

SENDER = "hello@reference.offload.dev"


def _welcome(email: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = SENDER
    message["To"] = email
    message["Subject"] = "Welcome to the reference service"
    message.set_content(f"Hello {email}, your account and your first workspace are ready.")
    return message


# -- inline lane: fast, disposable, after the response ----------------------------------------


@jobs.task(lane="inline", retries=2, backoff=Backoff(base=0.5, cap=5), timeout=30)
async def send_welcome_email(email: str) -> None:
    await aiosmtplib.send(_welcome(email), hostname=config.smtp_host, port=config.smtp_port)


_clients: dict[asyncio.AbstractEventLoop, httpx.AsyncClient] = {}


def _client() -> httpx.AsyncClient:
    """One client per event loop, kept: a new one builds an SSL context (milliseconds of CPU)
    and opens a new connection for every notice."""
    loop = asyncio.get_running_loop()
    if loop not in _clients:
        _clients[loop] = httpx.AsyncClient(timeout=5)
    return _clients[loop]


@jobs.task(lane="inline", retries=2, backoff=Backoff(base=0.5, cap=5), timeout=10)
async def notify_slack(text: str) -> None:
    answer = await _client().post(config.webhook_url, json={"text": text})
    answer.raise_for_status()


@jobs.task(lane="inline")
def record_event(user_id: int, kind: str, amount_cents: int = 0) -> None:
    """An analytics row (a `def` task: the lane's own threads run the blocking insert)."""
    with store.db(config).begin() as conn:
        conn.execute(
            store.events.insert().values(
                user_id=user_id, kind=kind, amount_cents=amount_cents, at=time.time()
            )
        )


@jobs.task(lane="inline")
def create_default_workspace(user_id: int, email: str) -> None:
    with store.db(config).begin() as conn:
        conn.execute(
            store.workspaces.insert().values(user_id=user_id, name=f"{email.split('@')[0]}'s")
        )


# -- durable lane: slow, CPU-heavy, or must complete -------------------------------------------


def report_path(config: Config, run_id: str) -> Path:
    return config.reports_dir / f"{run_id}.pdf"


@jobs.task(retries=3, backoff=Backoff(base=2, cap=60), timeout=300, cpu_bound=True)
def render_report(ctx: TaskContext, user_id: int, pages: int = 12) -> dict[str, int | str]:
    """A PDF of the user's activity, page by page, progress after each page."""
    with store.db(config).connect() as conn:
        owner = conn.execute(
            sa.select(store.users.c.email).where(store.users.c.id == user_id)
        ).scalar_one()
        rows = conn.execute(
            sa.select(store.events.c.at, store.events.c.kind, store.events.c.amount_cents)
            .where(store.events.c.user_id == user_id)
            .order_by(store.events.c.at)
        ).all()
    activity = [
        Activity(datetime.fromtimestamp(at, UTC).date(), kind, cents) for at, kind, cents in rows
    ] or [Activity(datetime.now(UTC).date(), "signup", 0)]

    def on_page(page: int, total: int) -> None:
        ctx.progress(page / total, f"rendered page {page} of {total}")

    pdf = render_pdf(owner, activity, pages=pages, generated_at=datetime.now(UTC), on_page=on_page)
    path = report_path(config, ctx.run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    draft = path.with_suffix(f".{ctx.attempt}.part")
    draft.write_bytes(pdf)
    draft.replace(path)  # a download never sees half a file
    return {"pages": pages, "bytes": len(pdf)}


class PaymentDeclined(Exception):
    """The provider refused the charge for good (4xx): retrying cannot help."""


# Retried: the provider down or slow, its answer lost, the database busy. A refusal (4xx) is
# final: the run dies at once and the order says payment_failed.
@jobs.task(
    retries=4,
    backoff=Backoff(base=0.5, cap=10),
    timeout=60,
    retry_on=(httpx.HTTPError, sa.exc.OperationalError),
)
def charge_order(ctx: TaskContext, order_id: int) -> str:
    """Charge an order exactly once: every try sends the same Idempotency-Key, so a try whose
    answer was lost (or whose worker died) is answered with the charge already made."""
    with store.db(config).connect() as conn:
        order = conn.execute(sa.select(store.orders).where(store.orders.c.id == order_id)).one()
    if order.charge_id:
        return str(order.charge_id)  # recorded by an earlier try
    answer = httpx.post(
        f"{config.payment_url}/v1/charges",
        json={
            "order_id": str(order_id),
            "amount_cents": order.amount_cents,
            "currency": order.currency,
        },
        headers={"Idempotency-Key": f"order-{order_id}"},
        timeout=30,
    )
    if answer.status_code >= 500:
        answer.raise_for_status()  # HTTPStatusError: retried with backoff
    if answer.status_code >= 400:
        raise PaymentDeclined(f"order {order_id}: {answer.status_code} {answer.text[:200]}")
    charge = str(answer.json()["id"])
    with store.db(config).begin() as conn:
        conn.execute(
            store.orders.update()
            .where(store.orders.c.id == order_id)
            .values(charge_id=charge, paid_at=time.time(), run_id=ctx.run_id)
        )
    ctx.logger.info("order %s paid by %s", order_id, charge)
    return charge


@jobs.periodic(cron="0 * * * *", name="hourly-report-cleanup")
@jobs.task(retries=2)
def clean_up_reports() -> int:
    """Delete report files older than `REFERENCE_REPORT_TTL_S`; how many went."""
    cutoff = time.time() - config.report_ttl_s
    with store.db(config).begin() as conn:
        old = (
            conn.execute(
                sa.select(store.reports.c.run_id).where(
                    store.reports.c.created_at < cutoff, sa.not_(store.reports.c.expired)
                )
            )
            .scalars()
            .all()
        )
        for run_id in old:
            report_path(config, run_id).unlink(missing_ok=True)
        if old:
            conn.execute(
                store.reports.update().where(store.reports.c.run_id.in_(old)).values(expired=True)
            )
    return len(old)


@jobs.periodic(cron="0 6 * * *", name="nightly-digest")
@jobs.task(retries=3, backoff=Backoff(base=10, cap=300))
def send_digest() -> int:
    """Email every user who did something yesterday (UTC) a summary; how many were sent."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    since, until = (today - timedelta(days=1)).timestamp(), today.timestamp()
    with store.db(config).connect() as conn:
        counts = conn.execute(
            sa.select(store.users.c.email, sa.func.count())
            .join(store.events, store.events.c.user_id == store.users.c.id)
            .where(store.events.c.at >= since, store.events.c.at < until)
            .group_by(store.users.c.email)
        ).all()
    with smtplib.SMTP(config.smtp_host, config.smtp_port, timeout=30) as smtp:
        for email, count in counts:
            message = EmailMessage()
            message["From"], message["To"] = SENDER, email
            message["Subject"] = "Your day in the reference service"
            message.set_content(f"Yesterday you did {count} thing(s).")
            smtp.send_message(message)
    return len(counts)
