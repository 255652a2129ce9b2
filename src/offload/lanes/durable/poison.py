"""Poison becomes dead runs: every message the workers can never run is recorded in the ledger.

Celery acknowledges and forgets a message it cannot decode, that is not a task message, or whose
task it does not know; offload's consumer records each as a dead run with a readable reason
first. The SQLite broker dead-letters a message delivered `max_deliveries` times, and the
listener records that too.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

from celery.worker.consumer import Consumer

from offload.core.run import new_run_id
from offload.errors import LedgerError
from offload.ledger import Ledger, queries

logger = logging.getLogger("offload.durable")

RAW_BODY_MAX_CHARS = 2000
"""How much of an undecodable body is kept, as its `repr`."""


def bury(
    ledger: Ledger, headers: dict[str, Any], body: Any, queue: str | None, reason: str
) -> None:
    """Record a message that can never run as a dead run, with `reason`."""
    run_id = str(headers.get("id") or new_run_id())
    task = str(headers.get("task") or "?")
    args: dict[str, Any] = {}
    if isinstance(body, list | tuple) and len(body) >= 2 and isinstance(body[1], dict):
        args = body[1]
    elif body is not None:
        args = {"raw": repr(body)[:RAW_BODY_MAX_CHARS]}
    logger.error("run %s %s is poison, recorded as dead: %s", run_id, task, reason)
    try:
        ledger.write(
            lambda conn: queries.bury(
                conn,
                run_id=run_id,
                task=task,
                args=args,
                queue=queue,
                reason=reason,
                now=ledger.clock(),
            )
        )
    except LedgerError:
        logger.exception("recording poison run %s failed", run_id)


def consumer_class(ledger: Ledger) -> type[Consumer]:
    """Celery's consumer, plus: every message it cannot run becomes a dead run in the ledger."""

    def bury_message(message: Any, body: Any, reason: str) -> None:
        queue = (message.delivery_info or {}).get("routing_key")
        if body is None:
            # Celery leaves protocol-2 bodies undecoded until a pool process runs them.
            try:
                body = message.decode()
            except Exception:  # noqa: BLE001 - undecodable is what we record, as raw bytes
                body = message.body
        bury(ledger, dict(message.headers or {}), body, queue, reason)

    class OffloadConsumer(Consumer):
        def on_decode_error(self, message: Any, exc: Exception) -> None:
            bury_message(
                message,
                message.body,
                f"PoisonMessage: cannot decode the message ({type(exc).__name__}: {exc})",
            )
            super().on_decode_error(message, exc)

        def on_unknown_message(self, body: Any, message: Any) -> None:
            bury_message(message, body, "PoisonMessage: not a task message (no task name in it)")
            super().on_unknown_message(body, message)

        def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
            name = (message.headers or {}).get("task")
            bury_message(
                message,
                body,
                f"UnknownTask: no task named {name!r} in this worker; was it "
                "renamed or removed by a deploy?",
            )
            super().on_unknown_task(body, message, exc)

        def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
            bury_message(message, body, f"PoisonMessage: invalid task message: {exc}")
            super().on_invalid_task(body, message, exc)

    return OffloadConsumer


def dead_letter_listener(ledger: Ledger) -> Callable[[str, dict[str, Any], str], None]:
    """For the SQLite broker: a message it dead-lettered (poison) becomes a dead run."""

    def listen(queue: str, payload: dict[str, Any], reason: str) -> None:
        body: Any = payload.get("raw")
        with contextlib.suppress(ValueError, TypeError):
            body = json.loads(payload["body"])
        bury(ledger, dict(payload.get("headers") or {}), body, queue, f"PoisonMessage: {reason}")

    return listen
