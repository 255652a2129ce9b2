"""The tasks the contract suite runs on every broker and ledger.

`build()` declares them on a fresh Offload; worker subprocesses import `jobs`, whose settings
come from the `OFFLOAD_*` environment the test gives them. Tasks coordinate with the test
through files in the data directory, never through sleeps the test has to guess.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import billiard
from pydantic import BaseModel

from offload import (
    Backoff,
    Offload,
    Retry,
    TaskCancelledError,
    TaskContext,
    TaskTimeoutError,
    Timeout,
)


class Receipt(BaseModel):
    order_id: int
    total_cents: int
    paid_at: datetime


def _wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)


def build(**settings: Any) -> Offload:
    jobs = Offload(**settings)

    @jobs.task
    def add(a: int, b: int) -> int:
        return a + b

    @jobs.task
    def pay(order_id: int, cents: int, paid_at: datetime) -> Receipt:
        return Receipt(order_id=order_id, total_cents=cents, paid_at=paid_at)

    @jobs.task
    def render(user_id: int, kind: Literal["pdf", "csv"] = "pdf") -> str:
        return f"report-{user_id}.{kind}"

    @jobs.task(retries=3, backoff=Backoff(base=0.3, factor=2, jitter=False))
    def flaky(ctx: TaskContext, fail_times: int) -> int:
        if ctx.attempt <= fail_times:
            raise ConnectionError(f"attempt {ctx.attempt} failed")
        return ctx.attempt

    @jobs.task(retries=2, backoff=Backoff(base=0.2, cap=1.0))
    def doomed(reason: str) -> None:
        raise ValueError(reason)

    @jobs.task(retries=5, retry_on=KeyError)
    def picky(error: Literal["key", "value"]) -> None:
        raise KeyError("retried") if error == "key" else ValueError("not retried")

    @jobs.task(retries=1)
    def asks_to_retry(ctx: TaskContext) -> int:
        if ctx.attempt == 1:
            raise Retry(delay=0.2, reason="come back later")
        return ctx.attempt

    @jobs.task(timeout=Timeout(soft=0.5, hard=30))
    def cleans_up(ctx: TaskContext) -> None:
        try:
            while True:
                time.sleep(0.01)
        except TaskTimeoutError:
            ctx.progress(1.0, "cleaned up")
            raise

    @jobs.task(timeout=Timeout(soft=0.3, hard=1.5))
    def stubborn(marker: str) -> None:
        Path(marker).write_text(str(os.getpid()))
        while True:
            try:
                time.sleep(0.01)
            except TaskTimeoutError:
                continue  # ignores the soft timeout on purpose

    @jobs.task(cpu_bound=True, timeout=Timeout(soft=0.5, hard=30))
    def crunch_until_told(ctx: TaskContext) -> None:
        try:
            while True:
                sum(range(10_000))
        except TaskTimeoutError:
            ctx.progress(1.0, "cpu task cleaned up")
            raise

    @jobs.task
    async def fetch(a: int, b: int) -> int:
        await asyncio.sleep(0.01)
        return a * b

    @jobs.task(timeout=0.3)
    async def slow_fetch() -> None:
        await asyncio.sleep(30)

    @jobs.task(cpu_bound=True)
    def where_am_i() -> dict[str, Any]:
        return {"pid": os.getpid(), "process": billiard.current_process().name}

    @jobs.task
    def where_io() -> int:
        return os.getpid()

    @jobs.task
    def step_by_step(ctx: TaskContext, release: str) -> str:
        ctx.progress(0.5, "halfway")
        _wait_for(Path(release))
        ctx.progress(1.0, "done")
        return "finished"

    @jobs.task
    def long_job(ctx: TaskContext, started: str, release: str) -> int:
        with Path(started).open("a") as log:
            log.write(f"{ctx.attempt}\n")
        _wait_for(Path(release))
        return ctx.attempt

    @jobs.task
    def until_cancelled(ctx: TaskContext, started: str) -> str:
        Path(started).write_text("started")
        while not ctx.cancelled:
            time.sleep(0.02)
        return "stopped early"

    @jobs.task
    def ignores_cancel(started: str) -> str:
        Path(started).write_text("started")
        while True:
            time.sleep(0.02)  # never looks at ctx.cancelled

    @jobs.task(cpu_bound=True)
    def ignores_cancel_in_a_process(started: str) -> str:
        Path(started).write_text("started")
        time.sleep(3600)  # a signal interrupts even this
        return "never"

    @jobs.task
    def refuses_cancel(marker: str) -> None:
        Path(marker).write_text(str(os.getpid()))
        while True:
            try:
                time.sleep(0.02)
            except TaskCancelledError:
                continue  # swallows even the forced cancel

    @jobs.task
    def crashes_its_process(marker: str) -> None:
        with Path(marker).open("a") as log:
            log.write(f"{os.getpid()}\n")
        os.kill(os.getpid(), 9)  # like a segfault or the OOM killer

    @jobs.task
    def effect(ctx: TaskContext, ledger: str, ms: int) -> int:
        """A side effect recorded once per run, tolerating its own redelivery."""
        time.sleep(ms / 1000)
        with sqlite3.connect(ledger, timeout=60) as db:
            db.execute(
                "INSERT OR IGNORE INTO effects (run_id, attempt, pid) VALUES (?, ?, ?)",
                (ctx.run_id, ctx.attempt, os.getpid()),
            )
        return ctx.attempt

    @jobs.task
    def unjsonable() -> Any:
        return object()

    @jobs.task(retries=1, backoff=Backoff(base=0.1, jitter=False))
    def charge(order_id: int, cents: int) -> dict[str, int]:
        """Dead on a negative amount (both tries fail); a replay with a fixed amount succeeds."""
        if cents < 0:
            raise ValueError(f"cannot charge {cents} cents for order {order_id}")
        return {"order_id": order_id, "charged": cents}

    return jobs


jobs = build()
