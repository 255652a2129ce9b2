"""Checked by mypy only (never run): defer() takes exactly the task's parameters."""

from __future__ import annotations

from typing import assert_type

from offload import Offload, RunHandle, TaskContext

jobs = Offload()


@jobs.task
def add(a: int, b: int) -> int:
    return a + b


@jobs.task(retries=3)
def report(ctx: TaskContext, user_id: int) -> str:
    return str(user_id)


@jobs.task
async def fetch(url: str) -> bytes:
    return b""


async def callers() -> None:
    assert_type(await add.defer(1, b=2), RunHandle[int])
    assert_type(add.defer_sync(1, 2), RunHandle[int])
    assert_type(await report.defer(user_id=7), RunHandle[str])  # ctx is not an argument
    assert_type(await fetch.defer("https://example.org"), RunHandle[bytes])
    assert_type(await (await fetch.defer("u")).result(), bytes)
    assert_type(report.options(delay=5).defer_sync(7), RunHandle[str])
    await add.defer(1, "2")  # type: ignore[arg-type]
    await report.defer(user_id="7")  # type: ignore[arg-type]
    await add.defer(1, 2, 3)  # type: ignore[call-arg]
