"""Every README snippet of the inline lane and the status API, run for real."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from docs.examples import lifespan as lifespan_example

from tests.integration.conftest import ServerFactory
from tests.integration.test_status_api import read_events
from tests.integration.web_client import wait_status
from tests.support import wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def slack() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A loopback stand-in for Slack's webhook that records what it was sent."""
    received: list[dict[str, Any]] = []

    class Webhook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            received.append(json.loads(self.rfile.read(length)))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Webhook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_inline_lane_example(
    serve: ServerFactory, slack: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    url, received = slack
    audit = tmp_path / "audit.log"
    server = serve("docs.examples.inline_lane:app", SLACK_WEBHOOK_URL=url, AUDIT_LOG=audit)
    with httpx.Client(base_url=server.url) as client:
        response = client.post("/signups/7")
        assert response.status_code == 202
        body = response.json()
        scored = wait_status(client, body["task_id"], "SUCCESS", timeout=30)
        assert client.get(body["status_url"]).json()["id"] == body["task_id"]
    assert scored["lane"] == "inline"
    assert scored["progress"] == {"fraction": 1.0, "message": "step 10 of 10"}
    assert isinstance(scored["result"], int)
    wait_until(lambda: received, 10, "the Slack webhook call")
    assert received == [{"text": "user 7 signed up"}]
    wait_until(audit.exists, 10, "the audit line")
    assert audit.read_text() == "7 signup\n"


def test_status_api_example(serve: ServerFactory) -> None:
    server = serve("docs.examples.status_api:app")
    alice, bob = {"x-user": "alice"}, {"x-user": "bob"}
    with httpx.Client(base_url=server.url, timeout=20) as client:
        started = client.post("/exports", params={"rows": 300}, headers=alice).json()
        run_id = started["task_id"]
        # Bob cannot see, follow or cancel Alice's export
        assert client.get(f"/tasks/{run_id}", headers=bob).status_code == 404
        assert client.post(f"/tasks/{run_id}/cancel", headers=bob).status_code == 404
        # Alice follows it to the end over Server-Sent Events
        with client.stream("GET", started["events"], headers=alice) as response:
            statuses = [event["data"] for event in read_events(response)]
        assert statuses[-1]["state"] == "SUCCESS"
        assert statuses[-1]["result"] == "export-300.csv"
        messages = {s["progress"]["message"] for s in statuses if s["progress"]}
        assert messages & {"0 of 300 rows", "100 of 300 rows", "200 of 300 rows"}
        # and can cancel her own
        second = client.post("/exports", params={"rows": 100_000}, headers=alice).json()
        client.headers.update(alice)
        wait_status(client, second["task_id"], {"STARTED", "PROGRESS"})
        assert client.post(f"/tasks/{second['task_id']}/cancel").json()["state"] == "CANCELLED"
        assert [r["id"] for r in client.get("/tasks").json()["runs"]] == [
            second["task_id"],
            run_id,
        ]


async def test_lifespan_example_nests_offloads_lifespan_in_yours() -> None:
    lifespan_example.EVENTS.clear()
    async with lifespan_example.lifespan(lifespan_example.app):
        await lifespan_example.jobs.inline.wait_idle(timeout=5)
    lifespan_example.jobs.close()
    assert lifespan_example.EVENTS == [
        "database pool opened",
        "cache warmed",
        "database pool closed",
    ]
