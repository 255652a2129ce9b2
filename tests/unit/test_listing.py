"""Listing runs through the facade (what `GET /tasks` and `offload runs list` call): filters,
and pages that never repeat or skip a row, on a real SQLite ledger and broker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from offload import IdempotencyConflictError, Offload, RunFilter, RunState

SAME_MICROSECOND = 1_790_000_000.1234567
"""Every run below is created at this instant: the datetime shown rounds it to .123457."""


@pytest.fixture
async def jobs(tmp_path: Path) -> AsyncIterator[Offload]:
    jobs = Offload(data_dir=tmp_path, clock=lambda: SAME_MICROSECOND)

    @jobs.task(name="report")
    def report(n: int) -> int:
        return n

    @jobs.task(name="email", queue="mail")
    def email(to: str) -> None: ...

    @jobs.task(name="ping", lane="inline")
    async def ping(n: int) -> int:
        return n

    async with jobs.lifespan(None):
        yield jobs
    jobs.close()


def _page_through(jobs: Offload, limit: int) -> list[str]:
    seen: list[str] = []
    cursor = None
    for _ in range(100):
        page = jobs.list_runs_sync(limit=limit, cursor=cursor)
        assert len(page.runs) <= limit
        seen.extend(r.id for r in page.runs)
        cursor = page.next_cursor
        if cursor is None:
            return seen
    raise AssertionError(f"paging did not end: {len(seen)} rows so far")


async def test_pages_of_one_walk_every_run_once_when_all_share_a_microsecond(
    jobs: Offload,
) -> None:
    durable = jobs.tasks["report"].defer_many_sync([{"n": i} for i in range(6)])
    inline = [await jobs.tasks["ping"].defer(i) for i in range(3)]
    await jobs.inline.wait_idle(timeout=5)
    made = {r.id for r in [*durable, *inline]}

    for limit in (1, 2, 4):
        seen = _page_through(jobs, limit)
        assert len(seen) == len(made), f"limit={limit}: {len(seen)} rows for {len(made)} runs"
        assert set(seen) == made
        assert seen == sorted(seen, reverse=True)  # same instant: newest first is by id


async def test_the_http_listing_pages_the_same_way(jobs: Offload) -> None:
    made = {r.id for r in jobs.tasks["report"].defer_many_sync([{"n": i} for i in range(5)])}
    api = FastAPI()
    api.include_router(jobs.status_router(authorize=lambda *_: True), prefix="/tasks")
    seen: list[str] = []
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=api), base_url="http://test"
    ) as client:
        params: dict[str, str | int] = {"limit": 1}
        while True:
            page = (await client.get("/tasks", params=params)).json()
            seen.extend(r["id"] for r in page["runs"])
            if page["next_cursor"] is None:
                break
            params["cursor"] = page["next_cursor"]
            assert len(seen) <= len(made), "a page came back twice"
        bad = await client.get("/tasks", params={"cursor": "not-a-cursor"})
    assert sorted(seen) == sorted(made)
    assert bad.status_code == 400
    assert "not one this API returned" in bad.json()["detail"]


async def test_filters_by_queue_task_state_and_time(jobs: Offload) -> None:
    reports = jobs.tasks["report"].defer_many_sync([{"n": i} for i in range(2)])
    mail = jobs.tasks["email"].defer_sync(to="a@example.com")
    pinged = await jobs.tasks["ping"].defer(1)
    await pinged.result(timeout=5)

    assert [r.id for r in jobs.list_runs_sync(RunFilter(queue="mail")).runs] == [mail.id]
    assert {r.id for r in jobs.list_runs_sync(RunFilter(task="report")).runs} == {
        r.id for r in reports
    }
    assert [r.id for r in jobs.list_runs_sync(RunFilter(states=(RunState.SUCCESS,))).runs] == [
        pinged.id
    ]
    assert jobs.list_runs_sync(RunFilter(dead=True)).runs == []
    at = datetime.fromtimestamp(SAME_MICROSECOND, UTC)
    later = datetime.fromtimestamp(SAME_MICROSECOND + 1, UTC)
    assert len(jobs.list_runs_sync(RunFilter(created_after=later)).runs) == 0
    assert len(jobs.list_runs_sync(RunFilter(created_before=later)).runs) == 4
    # created_after is inclusive; the datetime is rounded, so ask from a moment before
    before = datetime.fromtimestamp(SAME_MICROSECOND - 0.001, UTC)
    assert len(jobs.list_runs_sync(RunFilter(created_after=before)).runs) == 4
    assert at.microsecond == 123457


def test_an_idempotency_key_with_other_arguments_is_refused(jobs: Offload) -> None:
    task = jobs.tasks["report"].options(idempotency_key="monthly-2026-11")
    first = task.defer_sync(n=1)
    assert task.defer_sync(n=1) == first
    with pytest.raises(IdempotencyConflictError, match=f"already names run {first.id}") as caught:
        task.defer_sync(n=2)
    assert caught.value.run_id == first.id
    assert [r.id for r in jobs.list_runs_sync().runs] == [first.id]  # nothing else written


async def test_an_idempotency_conflict_is_http_409(jobs: Offload) -> None:
    api = FastAPI(exception_handlers=jobs.exception_handlers)
    task = jobs.tasks["report"].options(idempotency_key="k-1")

    @api.post("/reports/{n}")
    async def make(n: int) -> dict[str, str]:
        return {"id": (await task.defer(n=n)).id}

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=api), base_url="http://test"
    ) as client:
        first = await client.post("/reports/1")
        again = await client.post("/reports/1")
        other = await client.post("/reports/2")
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert other.status_code == 409
    assert other.json()["run_id"] == first.json()["id"]
    assert "idempotency_key 'k-1'" in other.json()["detail"]
