"""Who may open the dashboard, and that no action runs without its own page's CSRF token.

Real uvicorn servers of `tests/apps/dashboard_app.py` on the embedded SQLite default. Every
route is walked: the list comes from the dashboard's own router, so a route added later is
walked too. After each refusal the test checks that nothing changed.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.routing import Mount, Route

from offload import Offload, RunState
from tests.support import ROOT, Server, free_port, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

PASSWORD = "correct-horse-battery"
TOKEN = "t0ken-for-scripts-and-proxies"
AUTH = ("admin", PASSWORD)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    env = {"OFFLOAD_DASHBOARD_PASSWORD": PASSWORD, "OFFLOAD_DASHBOARD_TOKEN": TOKEN}
    started = Server("tests.apps.dashboard_app:app", tmp_path / "data", env)
    try:
        yield started.start()
    finally:
        started.stop()


def cancelled_run(server: Server) -> str:
    """A run of `charge` cancelled before any worker took it: one the actions can replay,
    discard and cancel (no worker runs in these tests)."""
    run_id: str = httpx.post(f"{server.url}/charge?amount=1", timeout=10).json()["id"]
    jobs = Offload(data_dir=server.data_dir)
    try:
        assert jobs.cancel_sync(run_id).state == RunState.CANCELLED
    finally:
        jobs.close()
    return run_id


def routes(server: Server, run_id: str) -> list[tuple[str, str]]:
    """Every dashboard route as (method, path), its parameters filled in."""
    jobs = Offload(data_dir=server.data_dir)
    found = []
    for route in jobs.dashboard().app.routes:
        if isinstance(route, Mount):
            found.append(("GET", f"{route.path}/dashboard.css"))
            continue
        assert isinstance(route, Route)
        path = route.path.format(run_id=run_id, name="hourly_cleanup", verb="pause")
        found.extend((method, path) for method in sorted(route.methods or ()) if method != "HEAD")
    assert len(found) > 10
    assert any(m == "POST" for m, _ in found)
    return found


def state_of(server: Server, run_id: str) -> tuple[RunState, str | None, bool]:
    """What the walks must leave alone: the run's state and replay, and the schedule's pause."""
    board = httpx.Client(base_url=f"{server.url}/offload", auth=AUTH, timeout=10)
    with board:
        page = board.get(f"/runs/{run_id}").text
        schedules = board.get("/schedules").text
    state = re.search(r'class="state state-\w+[^"]*">(\w+)<', page)
    assert state is not None
    replayed = re.search(r"Replayed by</dt><dd><a[^>]*>(\w+)<", page)
    paused = "paused</span>" in schedules
    return RunState(state[1]), (replayed[1] if replayed else None), paused


def test_every_route_refuses_a_caller_without_credentials(server: Server) -> None:
    run_id = cancelled_run(server)
    before = state_of(server, run_id)
    with httpx.Client(base_url=f"{server.url}/offload", timeout=10) as stranger:
        for method, path in [*routes(server, run_id), ("GET", "/no/such/page")]:
            for headers in (
                {},
                {"authorization": "Basic YWRtaW46d3Jvbmc="},
                {"authorization": "Bearer not-the-token-at-all"},
            ):
                form = {"csrf": "x" * 43} if method == "POST" else None
                answer = stranger.request(method, path, headers=headers, data=form)
                assert answer.status_code == 401, (method, path, headers, answer.status_code)
                assert answer.headers["www-authenticate"].startswith("Basic"), path
                assert "Sign in" in answer.text
                assert "offload_csrf" not in answer.cookies  # nothing to learn for a stranger
    assert state_of(server, run_id) == before == (RunState.CANCELLED, None, False)


def test_every_action_refuses_a_foreign_or_missing_csrf_token(server: Server) -> None:
    run_id = cancelled_run(server)
    before = state_of(server, run_id)
    actions = [(m, p) for m, p in routes(server, run_id) if m == "POST"]
    with httpx.Client(base_url=f"{server.url}/offload", auth=AUTH, timeout=10) as admin:
        page = admin.get(f"/runs/{run_id}")
        mine = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert mine is not None
        assert admin.cookies["offload_csrf"] == mine[1]
        foreign = "f" * 43  # the token of another browser, or one an attacker made up
        for method, path in actions:
            for form, headers in [
                ({"csrf": foreign, "args": '{"amount": 1}'}, {}),
                ({"args": '{"amount": 1}'}, {}),
                ({"csrf": mine[1]}, {"sec-fetch-site": "cross-site"}),
            ]:
                answer = admin.request(method, path, data=form, headers=headers)
                assert answer.status_code == 403, (path, form, headers, answer.status_code)
                assert "refused" in answer.text or "token" in answer.text
        assert state_of(server, run_id) == before

        # Its own token works (the one action that proves the walk above could succeed).
        replay = admin.post(f"/runs/{run_id}/replay", data={"csrf": mine[1], "args": ""})
        assert replay.status_code == 303
    assert state_of(server, run_id)[1] is not None


def test_a_bearer_token_opens_it_and_bad_ids_are_404_pages(server: Server) -> None:
    bearer = {"authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=f"{server.url}/offload", headers=bearer, timeout=10) as script:
        assert script.get("/").status_code == 200
        for path in (f"/runs/{'0' * 32}", "/dead/not-an-id", "/no/such/page"):
            missing = script.get(path)
            assert missing.status_code == 404, path
            assert missing.headers["content-type"].startswith("text/html")
            assert "<h1>Not found</h1>" in missing.text
        assert script.get("/runs?cursor=garbage").status_code == 400
        assert script.get("/runs?state=NOPE").status_code == 400
        assert script.post("/schedules/nope/pause", data={"a": "1"}).status_code == 403  # CSRF
        assert script.post("/schedules/nope/pause", content=b"{}").status_code == 415
        huge = script.post(
            "/dead/purge",
            content=b"csrf=" + b"x" * (2 << 20),
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert huge.status_code == 413


def _outside_address() -> str | None:
    """This machine's address on a non-loopback interface, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.254", 9))  # no packet is sent: this only picks a route
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def test_without_credentials_it_answers_on_loopback_only(tmp_path: Path) -> None:
    address = _outside_address()
    if address is None:
        pytest.skip("this machine has no non-loopback interface to reach the server on")
    open_board = Server("tests.apps.dashboard_app:app", tmp_path / "data", host="0.0.0.0")
    try:
        open_board.start()
        local = httpx.get(f"{open_board.url}/offload/", timeout=10)
        assert local.status_code == 200
        # A page of another site whose name now points at 127.0.0.1 (DNS rebinding).
        rebound = httpx.get(
            f"{open_board.url}/offload/", headers={"host": "attacker.example"}, timeout=10
        )
        assert rebound.status_code == 403
        outside = httpx.get(f"http://{address}:{open_board.port}/offload/", timeout=10)
        assert outside.status_code == 403
        assert "OFFLOAD_DASHBOARD_PASSWORD" in outside.text
    finally:
        open_board.stop()


def test_offload_serve_refuses_an_open_dashboard_on_a_public_bind_and_prints_its_url(
    tmp_path: Path,
) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_DASHBOARD_")},
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "OFFLOAD_DATA_DIR": str(tmp_path / "data"),
    }
    command = [sys.executable, "-m", "offload", "serve", "tests.apps.dashboard_app:app"]
    refused = subprocess.run(
        [*command, "--host", "0.0.0.0", "--no-embedded-worker"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert "has no credentials and may not be served on 0.0.0.0" in refused.stderr
    assert "OFFLOAD_DASHBOARD_PASSWORD" in refused.stderr

    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen(
            [*command, "--port", str(port), "--no-embedded-worker", "--no-scheduler"],
            cwd=ROOT,
            env={**env, "OFFLOAD_DASHBOARD_PASSWORD": PASSWORD},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            url = f"http://127.0.0.1:{port}/offload/"
            wait_until(lambda: url in log.read_text(), 30, "serve to print the dashboard's URL")
            wait_until(lambda: _answers(url), 30, "the dashboard to answer")
            assert httpx.get(url, auth=AUTH, timeout=10).status_code == 200
        finally:
            serve.terminate()
            serve.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 401
    except httpx.TransportError:
        return False
