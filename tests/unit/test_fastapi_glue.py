"""offload's FastAPI glue in this process: error mapping, the default authorize, deferrals."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.routing import APIRoute

from offload import LaneFullError, LedgerError, Offload, RunState
from offload.web.api import loopback_only


def request_from(host: str | None) -> Request:
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""}
    if host is not None:
        scope["client"] = (host, 50000)
    return Request(scope)


@pytest.mark.parametrize(
    ("host", "allowed"),
    [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("10.0.0.7", False),
     ("203.0.113.9", False), ("testclient", False), (None, False)],
)  # fmt: skip
def test_default_authorize_allows_loopback_callers_only(host: str | None, allowed: bool) -> None:
    assert loopback_only(request_from(host), None, "read") is allowed  # type: ignore[arg-type]


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[tuple[FastAPI, Offload]]:
    jobs = Offload(data_dir=tmp_path)

    @jobs.task(lane="inline")
    async def noop() -> None:
        return None

    api = FastAPI(lifespan=jobs.lifespan, exception_handlers=jobs.exception_handlers)
    api.include_router(jobs.router, prefix="/tasks")

    @api.get("/ledger-down")
    async def ledger_down() -> None:
        raise LedgerError("ledger sqlite:////srv/secret/ledger.sqlite: disk I/O error")

    @api.get("/full")
    async def full() -> None:
        raise LaneFullError("the inline lane is full", retry_after_s=2.5)

    @api.get("/deferrals-only", dependencies=[jobs.deferrals])
    async def deferrals_only() -> None:
        return None

    @api.get("/defer-without-dependency")
    async def defer_without_dependency() -> dict[str, str]:
        return {"id": (await noop.defer()).id}

    async with jobs.lifespan(api):
        yield api, jobs
    jobs.close()


async def test_other_offload_errors_are_500_without_internals(
    app: tuple[FastAPI, Offload], caplog: pytest.LogCaptureFixture
) -> None:
    api, _ = app
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/ledger-down")
    assert response.status_code == 500
    assert response.json() == {
        "detail": "LedgerError: internal error in offload; see the server log"
    }
    logged = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "GET /ledger-down failed" in logged[0].getMessage()
    assert logged[0].exc_info is not None  # the traceback goes to the log, not the client


async def test_lane_full_is_503_with_a_whole_retry_after(app: tuple[FastAPI, Offload]) -> None:
    api, _ = app
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/full")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "3"


async def test_a_request_context_left_behind_never_swallows_a_later_defer(
    app: tuple[FastAPI, Offload],
) -> None:
    # httpx's ASGITransport runs every request in the caller's context: a deferrals object
    # from an earlier request must not collect runs of a later one
    api, jobs = app
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/deferrals-only")).status_code == 200
        run_id = (await client.get("/defer-without-dependency")).json()["id"]
    await jobs.inline.wait_idle(timeout=5)
    assert (await jobs.run(run_id).status()).state is RunState.SUCCESS


async def test_the_admin_api_refuses_callers_from_elsewhere_by_default(tmp_path: Path) -> None:
    jobs = Offload(data_dir=tmp_path)
    api = FastAPI()
    router = jobs.admin_router()
    api.include_router(router, prefix="/admin")
    # Every route the router has, with made-up ids: none may be forgotten.
    routes = [
        (method, "/admin" + re.sub(r"\{[^}]+\}", "x1", route.path))
        for route in router.routes
        if isinstance(route, APIRoute)
        for method in route.methods or ()
    ]
    assert len(routes) >= 12
    try:
        async with jobs.lifespan(api):
            remote = httpx.ASGITransport(app=api, client=("203.0.113.5", 5000))
            async with httpx.AsyncClient(transport=remote, base_url="http://test") as client:
                for method, path in routes:
                    response = await client.request(method, path, json={})
                    assert response.status_code == 403, (method, path, response.text)
            local = httpx.ASGITransport(app=api, client=("127.0.0.1", 5000))
            async with httpx.AsyncClient(transport=local, base_url="http://test") as client:
                assert (await client.get("/admin/runs")).status_code == 200
                assert (await client.get("/admin/runs/r1")).status_code == 404
                assert (await client.get("/admin/schedules")).json() == []
                missing = await client.post("/admin/schedules/nightly/pause")
                assert missing.status_code == 404
                assert "No schedule named 'nightly'" in missing.json()["detail"]
    finally:
        jobs.close()
