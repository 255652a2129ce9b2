"""The status API under a real uvicorn: one schema for inline and durable runs."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import ServerFactory
from tests.integration.web_client import defer, wait_status
from tests.support import Server, WorkerProcess, wait_until

pytestmark = pytest.mark.timeout(90)


def read_events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """Parse a Server-Sent Events stream into `{"event", "id", "data"}` dicts."""
    event: dict[str, Any] = {}
    for line in response.iter_lines():
        if not line:
            if event:
                yield event
            event = {}
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(": ")
            event[field] = json.loads(value) if field == "data" else value


def stream_statuses(
    server: Server, run_id: str, release: Path, release_when: str, prefix: str = "/tasks"
) -> list[dict[str, Any]]:
    """Read the run's SSE stream to its end; create `release` when `release_when` is seen."""
    seen: list[dict[str, Any]] = []
    with (
        httpx.Client(base_url=server.url, timeout=20) as client,
        client.stream("GET", f"{prefix}/{run_id}/events") as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for event in read_events(response):
            assert event["event"] == "status"
            seen.append(event["data"])
            progress = event["data"]["progress"]
            if progress and progress["message"] == release_when:
                release.touch()
    return seen


def test_sse_streams_inline_progress_and_closes_on_the_terminal_state(
    serve: ServerFactory, tmp_path: Path
) -> None:
    server = serve()
    release = tmp_path / "release"
    with httpx.Client(base_url=server.url) as client:
        run_id = defer(client, "stepper", release=str(release))
    began = time.monotonic()
    seen = stream_statuses(server, run_id, release, release_when="halfway")
    assert time.monotonic() - began < 10
    assert [s["progress"] for s in seen if s["progress"]][:1] == [
        {"fraction": 0.5, "message": "halfway"}
    ]
    assert seen[-1]["state"] == "SUCCESS"
    assert seen[-1]["result"] == "finished"
    assert all(s["state"] != "SUCCESS" for s in seen[:-1])  # the stream ended right after
    assert len({json.dumps(s, sort_keys=True) for s in seen}) == len(seen)  # changes only


@pytest.fixture
def durable_server(serve: ServerFactory) -> Iterator[tuple[Server, WorkerProcess]]:
    """The test app plus an `offload worker` on the same SQLite broker and ledger."""
    server = serve(OFFLOAD_PROGRESS_INTERVAL_S=0)
    worker = WorkerProcess(
        "tests.apps.inline_app:jobs",
        {"OFFLOAD_DATA_DIR": str(server.data_dir), "OFFLOAD_PROGRESS_INTERVAL_S": "0"},
        server.data_dir / "worker.log",
    )
    try:
        yield server, worker.start()
    finally:
        worker.stop()


def test_status_and_sse_work_for_durable_runs(
    durable_server: tuple[Server, WorkerProcess], tmp_path: Path
) -> None:
    server, worker = durable_server
    worker.wait_ready()
    release = tmp_path / "release"
    with httpx.Client(base_url=server.url) as client:
        added = wait_status(client, defer(client, "add", a=2, b=40), "SUCCESS", timeout=20)
        assert added["lane"] == "durable"
        assert added["result"] == 42
        run_id = defer(client, "durable_stepper", release=str(release))
    seen = stream_statuses(server, run_id, release, release_when="halfway")
    assert {"fraction": 0.5, "message": "halfway"} in [s["progress"] for s in seen]
    assert seen[-1]["state"] == "SUCCESS"
    assert seen[-1]["lane"] == "durable"


def test_both_lanes_answer_floats_and_infinities_alike(
    durable_server: tuple[Server, WorkerProcess],
) -> None:
    # A float result 3.0 came back as 3 from the SQLite ledger (a JSON column has NUMERIC
    # affinity there), and infinity as null: JSON has no infinity, so it travels as a string.
    server, worker = durable_server
    worker.wait_ready()
    untyped = {"whole": 3.0, "nested": [3.0], "infinite": ["Infinity", "-Infinity"]}
    with httpx.Client(base_url=server.url) as client:
        for suffix in ("", "_inline"):
            typed = wait_status(client, defer(client, f"floats{suffix}", scale=1), "SUCCESS", 20)
            assert isinstance(typed["result"], float), suffix
            assert typed["result"] == 3.0, suffix
            run_id = defer(client, f"floats_untyped{suffix}", scale=1)
            body = wait_status(client, run_id, "SUCCESS", 20)
            assert body["result"] == untyped, suffix
            assert isinstance(body["result"]["whole"], float), suffix
            infinite = defer(client, f"floats{suffix}", scale="Infinity")
            assert wait_status(client, infinite, "SUCCESS", 20)["result"] == "Infinity", suffix


def test_unknown_ids_are_404_everywhere(serve: ServerFactory) -> None:
    server = serve()
    with httpx.Client(base_url=server.url) as client:
        for method, path in [
            ("GET", "/tasks/3f2a0000000000000000000000000000"),
            ("GET", "/tasks/3f2a0000000000000000000000000000/events"),
            ("POST", "/tasks/3f2a0000000000000000000000000000/cancel"),
        ]:
            response = client.request(method, path)
            assert response.status_code == 404, (method, path)
            assert response.json() == {
                "detail": "No run with id '3f2a0000000000000000000000000000'"
            }
        # An id of any length is answered, and the answer repeats only its start.
        long = client.get(f"/tasks/{'7' * 5000}")
        assert long.status_code == 404
        assert long.json() == {"detail": f"No run with id '{'7' * 64}…'"}


def test_cancel_a_pending_and_a_running_inline_run(serve: ServerFactory, tmp_path: Path) -> None:
    # Given one slot: the first run runs, the second waits
    server = serve(OFFLOAD_INLINE_MAX_CONCURRENCY=1)
    with httpx.Client(base_url=server.url) as client:
        first = defer(client, "wait_forever", started=str(tmp_path / "first"))
        second = defer(client, "wait_forever", started=str(tmp_path / "second"))
        wait_status(client, first, "STARTED")
        assert client.get(f"/tasks/{second}").json()["state"] == "PENDING"
        # When both are cancelled
        cancelled_pending = client.post(f"/tasks/{second}/cancel").json()
        cancelled_running = client.post(f"/tasks/{first}/cancel").json()
        # Then both end CANCELLED, and the waiting one never started
        assert cancelled_pending["state"] == "CANCELLED"
        assert cancelled_running["state"] == "CANCELLED"  # its asyncio task was cancelled
        assert cancelled_pending["started_at"] is None
        assert wait_status(client, first, "CANCELLED")["attempts"] == 1
        assert not (tmp_path / "second").exists()
        # And cancelling a finished run changes nothing
        assert client.post(f"/tasks/{first}/cancel").json()["state"] == "CANCELLED"


def test_cancel_asks_a_running_sync_inline_run_to_stop(
    serve: ServerFactory, tmp_path: Path
) -> None:
    server = serve()
    started = tmp_path / "started"
    with httpx.Client(base_url=server.url) as client:
        run_id = defer(client, "spin_until_cancelled", started=str(started))
        wait_until(started.exists, 10, "the task to start")
        asked = client.post(f"/tasks/{run_id}/cancel").json()
        assert asked["state"] in {"STARTED", "CANCELLED"}
        assert wait_status(client, run_id, "CANCELLED")["finished_at"] is not None


def test_a_cpu_bound_run_ignoring_cancel_is_interrupted_after_the_grace(
    serve: ServerFactory,
) -> None:
    server = serve(OFFLOAD_CANCEL_GRACE_S=0.5, OFFLOAD_INLINE_CPU_PROCESSES=1)
    with httpx.Client(base_url=server.url) as client:
        run_id = defer(client, "crunch_ignoring_cancel")
        wait_status(client, run_id, "STARTED")
        assert client.post(f"/tasks/{run_id}/cancel").json()["state"] == "STARTED"
        cancelled = wait_status(client, run_id, "CANCELLED")
        assert cancelled["error"] == (
            "TaskCancelledError: cancelled: the task ignored ctx.cancelled too long"
        )
        # the process survived and runs the next task
        assert (
            wait_status(client, defer(client, "crunch", n=10), "SUCCESS")["result"]["total"] == 45
        )


def test_cancel_a_pending_durable_run(serve: ServerFactory) -> None:
    # No worker runs: the durable run waits in the broker, and cancel ends it at once
    server = serve()
    with httpx.Client(base_url=server.url) as client:
        run_id = defer(client, "add", a=1, b=2)
        assert client.get(f"/tasks/{run_id}").json()["state"] == "PENDING"
        cancelled = client.post(f"/tasks/{run_id}/cancel").json()
    assert cancelled["state"] == "CANCELLED"
    assert cancelled["lane"] == "durable"


def test_authorize_hook_hides_other_users_runs(serve: ServerFactory) -> None:
    server = serve()
    alice, bob = {"x-user": "alice"}, {"x-user": "bob"}
    with httpx.Client(base_url=server.url) as client:
        mine = defer(client, "nap", headers=alice, seconds=0)
        theirs = defer(client, "nap", headers=bob, seconds=0)
        wait_status(client, mine, "SUCCESS")
        wait_status(client, theirs, "SUCCESS")
        # Alice sees her run, and Bob's is as unknown to her as a made-up id
        assert client.get(f"/mine/{mine}", headers=alice).status_code == 200
        hidden = client.get(f"/mine/{theirs}", headers=alice)
        assert hidden.status_code == 404
        assert hidden.json() == {"detail": f"No run with id '{theirs}'"}
        assert client.post(f"/mine/{theirs}/cancel", headers=alice).status_code == 404
        assert client.get(f"/mine/{theirs}/events", headers=alice).status_code == 404
        listed = client.get("/mine", headers=alice).json()["runs"]
        assert [r["id"] for r in listed] == [mine]


def test_listing_merges_inline_and_durable_runs_and_pages(serve: ServerFactory) -> None:
    server = serve()
    with httpx.Client(base_url=server.url) as client:
        ids = []
        for index in range(5):
            task = "nap" if index % 2 else "add"
            kwargs: dict[str, Any] = {"seconds": 0} if task == "nap" else {"a": 1, "b": index}
            ids.append(defer(client, task, **kwargs))
        seen: list[dict[str, Any]] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 2}
            if cursor:
                params["cursor"] = cursor
            page = client.get("/tasks", params=params).json()
            seen.extend(page["runs"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        only_inline = client.get("/tasks", params={"task": "nap"}).json()["runs"]
        waiting = client.get("/tasks", params={"state": "PENDING"}).json()["runs"]
        bad_cursor = client.get("/tasks", params={"cursor": "nonsense"})
    assert [r["id"] for r in seen] == list(reversed(ids))  # newest first, no gap, no repeat
    assert {r["lane"] for r in seen} == {"inline", "durable"}
    assert {r["id"] for r in only_inline} == {ids[1], ids[3]}
    assert {r["id"] for r in waiting} >= {ids[0], ids[2], ids[4]}  # no worker runs them
    assert bad_cursor.status_code == 400


def test_wrong_arguments_are_422_in_fastapis_shape(serve: ServerFactory) -> None:
    server = serve()
    with httpx.Client(base_url=server.url) as client:
        response = client.post("/defer/nap", json={"seconds": "soon", "extra": 1})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert {tuple(d["loc"]) for d in detail} == {("seconds",), ("extra",)}
    assert all({"loc", "msg", "type"} <= set(d) for d in detail)


def test_many_readers_of_one_stream_do_not_hold_up_the_api(
    serve: ServerFactory, tmp_path: Path
) -> None:
    server = serve()
    release = tmp_path / "release"
    with httpx.Client(base_url=server.url) as client:
        run_id = defer(client, "stepper", release=str(release))
        finished: list[list[dict[str, Any]]] = []
        readers = [
            threading.Thread(
                target=lambda: finished.append(
                    stream_statuses(server, run_id, tmp_path / "unused", release_when="-")
                )
            )
            for _ in range(10)
        ]
        for reader in readers:
            reader.start()
        began = time.monotonic()
        assert client.get("/healthz").status_code == 200
        assert time.monotonic() - began < 0.5
        release.touch()
        for reader in readers:
            reader.join(timeout=20)
    assert len(finished) == 10
    assert all(stream[-1]["state"] == "SUCCESS" for stream in finished)
