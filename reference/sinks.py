"""Stand-ins for the outside world a development machine cannot reach, each a real server on
loopback. Nothing here runs in production: the reference service starts them in its API process
(REFERENCE_START_SINKS), and tests start them directly.

- `MailSink`: an SMTP server (aiosmtpd) that delivers nothing and keeps every message.
- `Outside`: one HTTP server (uvicorn, FastAPI) with a Slack-style webhook sink (`POST
  /hooks/slack`, `GET /hooks`) and a Stripe-like payment provider simulator (`POST /v1/charges`
  with a required `Idempotency-Key`; `GET /v1/charges[?order_id=]`, the ledger). It is as slow
  and fails as often as told (`POST /v1/settings`); a failure is a 503 before charging or, as
  often, a 502 after the charge is recorded (the answer was lost), the case where only the key
  keeps a retry from charging twice.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import socket
import threading
import time
from collections.abc import Awaitable
from dataclasses import asdict, dataclass
from email import policy
from email.parser import BytesParser
from typing import Any, Self

import uvicorn
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

_THREAD = "reference-sink"  # the sinks' threads; their records below WARNING are dropped


def _quiet(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not (record.threadName or "").startswith(_THREAD)


for _name in ("mail.log", "uvicorn.error", "uvicorn.access"):  # shared with the host's uvicorn
    logging.getLogger(_name).addFilter(_quiet)


class _Sink:
    host: str
    port: int
    scheme: str

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def start(self) -> None: ...
    def stop(self) -> None: ...

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


@dataclass(frozen=True)
class Mail:
    sender: str
    to: tuple[str, ...]
    subject: str
    body: str  # the text/plain part (else the text/html one), decoded
    received_at: float


class _Controller(Controller):
    """On a socket bound beforehand: with port=0 start() fails, connecting to `self.port`."""

    def __init__(self, handler: object, sock: socket.socket) -> None:
        host, port = sock.getsockname()[:2]
        # server_hostname: else every connection calls socket.getfqdn(), a DNS lookup.
        super().__init__(handler, hostname=host, port=port, server_hostname="localhost")
        self._sock = sock

    def _create_server(self) -> Awaitable[asyncio.AbstractServer]:
        return self.loop.create_server(self._factory_invoker, sock=self._sock)

    def _run(self, ready_event: threading.Event) -> None:
        threading.current_thread().name = f"{_THREAD}-mail"
        super()._run(ready_event)


class MailSink(_Sink):
    """An SMTP server (aiosmtpd's Controller, in its own thread) keeping every message."""

    scheme = "smtp"

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port, self._wanted_port = host, port, port
        self._lock = threading.Lock()
        self._mail: list[Mail] = []
        self._controller: _Controller | None = None

    def messages(self) -> list[Mail]:
        with self._lock:
            return list(self._mail)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)  # as decode_data=False (the default) gives
        parsed = BytesParser(policy=policy.default).parsebytes(envelope.content)
        part = parsed.get_body(("plain", "html"))
        mail = Mail(
            envelope.mail_from or "",
            tuple(envelope.rcpt_tos),
            str(parsed.get("subject", "")),
            str(part.get_content()).replace("\r\n", "\n") if part is not None else "",
            time.time(),
        )
        with self._lock:
            self._mail.append(mail)
        return "250 OK: kept by the development mail sink"

    def start(self) -> None:
        if self._controller is None:
            sock = socket.create_server((self.host, self._wanted_port))
            controller = _Controller(self, sock)
            try:
                controller.start()
            except BaseException:
                controller.stop(no_assert=True)  # which closes the socket
                raise
            self.port, self._controller = sock.getsockname()[1], controller

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None


@dataclass(frozen=True)
class Charge:
    id: str
    order_id: str
    amount_cents: int
    currency: str
    idempotency_key: str
    created_at: float


DECLINED_ABOVE_CENTS = 1_000_000
"""Charges over this are declined (402), as a card over its limit would be."""


class ChargeRequest(BaseModel):
    order_id: str = Field(min_length=1)
    amount_cents: int = Field(gt=0)
    currency: str = Field(min_length=3, max_length=3)


class Settings(BaseModel):
    failure_rate: float = Field(ge=0, le=1)
    latency_s: float = Field(ge=0)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=status)


class Outside(_Sink):
    """One HTTP server (uvicorn in a thread, FastAPI app) for the webhook sink and the payment
    provider simulator. `payment_failure_rate` and `payment_latency_s` may change at any time."""

    scheme = "http"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        payment_failure_rate: float = 0.0,
        payment_latency_s: float = 0.0,
        seed: int | None = None,
        mail: MailSink | None = None,
    ) -> None:
        self.host, self.port, self._wanted_port = host, port, port
        self.payment_failure_rate = payment_failure_rate
        self.payment_latency_s = payment_latency_s
        self._random = random.Random(seed)
        self._mail = mail  # shown at GET /mail, for a sinks process of their own
        self._lock = threading.Lock()
        self._hooks: list[dict[str, Any]] = []
        self._charges: dict[str, tuple[ChargeRequest, Charge]] = {}  # by key, oldest first
        self._running: tuple[uvicorn.Server, threading.Thread] | None = None

    def hooks(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(hook) for hook in self._hooks]

    def charges(self) -> list[Charge]:
        with self._lock:
            return [charge for _, charge in self._charges.values()]

    def _charge(self, key: str, request: ChargeRequest) -> JSONResponse:
        if request.amount_cents > DECLINED_ABOVE_CENTS:
            return _error(402, "card_declined: the amount is over the card's limit")
        with self._lock:  # decide, look up and record in one step: one charge per key
            failing = self._random.random() < self.payment_failure_rate
            if failing and self._random.random() < 0.5:
                return _error(503, "the provider is unavailable; nothing was charged")
            replayed = key in self._charges
            if not replayed:
                new = Charge(
                    f"ch_{secrets.token_hex(12)}", request.order_id, request.amount_cents,
                    request.currency, key, time.time(),
                )  # fmt: skip
                self._charges[key] = (request, new)
            earlier, charge = self._charges[key]
        if failing:
            return _error(502, "bad gateway: the charge was processed but its answer was lost")
        if earlier != request:
            return _error(409, "this Idempotency-Key was used before with another body")
        body = asdict(charge)
        del body["idempotency_key"], body["created_at"]
        return JSONResponse(
            {**body, "status": "succeeded"},
            status_code=200 if replayed else 201,
            headers={"Idempotent-Replayed": "true"} if replayed else None,
        )

    def app(self) -> FastAPI:
        api = FastAPI(title="offload reference: the outside world (development only)")

        @api.post("/hooks/slack")
        async def slack(body: dict[str, Any]) -> dict[str, bool]:
            with self._lock:
                self._hooks.append(body)
            return {"ok": True}

        @api.get("/mail")
        async def mail() -> list[dict[str, Any]]:
            return [asdict(m) for m in self._mail.messages()] if self._mail else []

        @api.get("/hooks")
        async def hooks() -> list[dict[str, Any]]:
            return self.hooks()

        @api.post("/v1/charges", status_code=201)
        async def charge(
            request: ChargeRequest, idempotency_key: str | None = Header(default=None)
        ) -> JSONResponse:
            if not idempotency_key:
                return _error(400, "an Idempotency-Key header is required on every charge")
            await asyncio.sleep(self.payment_latency_s)
            return self._charge(idempotency_key, request)

        @api.get("/v1/charges")
        async def charges(order_id: str | None = None) -> list[dict[str, Any]]:
            ledger = self.charges()
            return [asdict(c) for c in ledger if order_id in (None, c.order_id)]

        @api.post("/v1/settings")
        async def settings(change: Settings) -> Settings:
            self.payment_failure_rate = change.failure_rate
            self.payment_latency_s = change.latency_s
            return change

        return api

    def start(self) -> None:
        if self._running is not None:
            return
        sock = socket.create_server((self.host, self._wanted_port))
        # No log_config or log_level: uvicorn would reconfigure the loggers of the host's own.
        config = uvicorn.Config(self.app(), lifespan="off", log_config=None, log_level=None)
        server = uvicorn.Server(config)  # serve() off the main thread leaves signals alone
        thread = threading.Thread(
            target=asyncio.run, args=(server.serve([sock]),), name=f"{_THREAD}-outside"
        )
        thread.start()
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError(f"the outside-world server did not start on {self.host}")
            time.sleep(0.005)
        self.port, self._running = sock.getsockname()[1], (server, thread)

    def stop(self) -> None:
        if self._running is not None:
            server, thread = self._running
            server.should_exit = True
            thread.join()
            self._running = None


def main() -> None:
    """`python -m reference.sinks`: the stand-ins in a process of their own, on the ports the
    service's settings name, until SIGTERM or Ctrl-C (start the service with
    REFERENCE_START_SINKS=0)."""
    import signal

    from reference.config import Config

    config = Config.from_env()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with (
        MailSink(config.smtp_host, config.smtp_port) as mail,
        Outside(
            port=config.sinks_port,
            payment_failure_rate=config.payment_failure_rate,
            payment_latency_s=config.payment_latency_s,
            mail=mail,
        ) as outside,
    ):
        print(f"reference.sinks: SMTP sink at {mail.url}", flush=True)  # noqa: T201
        print(f"reference.sinks: webhooks and payments at {outside.url}", flush=True)  # noqa: T201
        stop.wait()


if __name__ == "__main__":
    main()
