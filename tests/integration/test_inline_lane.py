"""The inline lane under a real uvicorn: after the response, concurrent, isolated, loud."""

from __future__ import annotations

import http.server
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from tests.integration.conftest import ServerFactory
from tests.integration.web_client import at, defer, metric, wait_status
from tests.support import wait_until

pytestmark = pytest.mark.timeout(90)


def test_async_inline_runs_overlap_instead_of_queueing(serve: ServerFactory) -> None:
    # Given a server, when 20 half-second async tasks are deferred
    server = serve()
    with httpx.Client(base_url=server.url) as client:
        began = time.monotonic()
        ids = [defer(client, "nap", seconds=0.5) for _ in range(20)]
        runs = [wait_status(client, i, "SUCCESS") for i in ids]
        elapsed = time.monotonic() - began
    # Then every run started before the first one finished, and all took ~one task's time
    assert max(at(r["started_at"]) for r in runs) < min(at(r["finished_at"]) for r in runs)
    assert elapsed < 4.0  # Starlette's BackgroundTasks, one after another: 10 s


def test_inline_run_starts_only_after_the_response_is_sent(serve: ServerFactory) -> None:
    server = serve()
    with httpx.Client(base_url=server.url) as client:
        body = client.post("/defer-then-linger", params={"seconds": 0.3}).json()
        run = wait_status(client, body["id"], "SUCCESS")
    assert at(run["started_at"]) >= body["returned_at"]


def test_run_deferred_before_the_endpoint_fails_still_runs(serve: ServerFactory) -> None:
    # Given an endpoint that defers a run and then raises: Starlette would drop the task
    server = serve()
    with httpx.Client(base_url=server.url) as client:
        response = client.post("/defer-then-fail", json={"seconds": 0.01})
        assert response.status_code == 500
    with httpx.Client(base_url=server.url) as client:  # uvicorn closed that connection
        # Then the run it was promised still happens
        listed = client.get("/tasks", params={"task": "nap"}).json()["runs"]
        assert len(listed) == 1
        assert wait_status(client, listed[0]["id"], "SUCCESS")["result"] == 0.01


def test_sync_inline_tasks_leave_the_endpoint_threadpool_free(serve: ServerFactory) -> None:
    # Given 60 blocking sync inline tasks: as Starlette BackgroundTasks they would hold 40
    # threadpool tokens (the whole default pool); on the lane they use its own 8 threads
    server = serve(OFFLOAD_INLINE_THREADS=8)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        ids = [defer(client, "blocking_nap", seconds=3) for _ in range(60)]
        wait_until(
            lambda: client.get(f"/tasks/{ids[0]}").json()["state"] == "STARTED", 10, "a start"
        )
        # When a sync endpoint is called while they run
        timings = []
        for _ in range(5):
            began = time.monotonic()
            assert client.get("/sync-ping").status_code == 200
            timings.append(time.monotonic() - began)
        # Then it answers at once
        assert max(timings) < 1.0, timings  # generous: CI boxes are shared
        states = {client.get(f"/tasks/{i}").json()["state"] for i in ids}
        assert "PENDING" in states  # the lane's 8 threads are all busy; the rest wait

        # And the same work through plain BackgroundTasks does freeze that endpoint
        with ThreadPoolExecutor(45) as pool:
            list(
                pool.map(
                    lambda _: client.post("/starlette-blocking", params={"seconds": 3, "count": 1}),
                    range(45),
                )
            )
        began = time.monotonic()
        assert client.get("/sync-ping").status_code == 200
        assert time.monotonic() - began > 1.5  # waited for a 3 s sleep to free a token


def test_failing_inline_task_is_logged_with_its_run_id_and_counted(serve: ServerFactory) -> None:
    server = serve()
    with httpx.Client(base_url=server.url) as client:
        run_id = defer(client, "explode", reason="card declined")
        run = wait_status(client, run_id, "FAILURE")
        failures = metric(client, "offload_runs_total", task="explode", state="FAILURE")
    assert run["error"] == "ValueError: card declined"
    log = server.log()
    assert f"run {run_id} explode failed on attempt 1: ValueError: card declined" in log
    assert "Traceback (most recent call last)" in log
    assert "raise ValueError(reason)" in log
    assert failures == 1.0


def test_inline_retries_follow_the_tasks_backoff(serve: ServerFactory) -> None:
    server = serve()
    with httpx.Client(base_url=server.url) as client:
        run_id = defer(client, "flaky", fail_times=2)
        run = wait_status(client, run_id, "SUCCESS")
        retries = metric(client, "offload_inline_retries_total", task="flaky")
    assert run["attempts"] == 3
    assert run["result"] == 3
    assert retries == 2.0
    assert f"run {run_id} flaky failed on attempt 1: ConnectionError" in server.log()


def test_full_lane_answers_503_with_retry_after_or_spills(
    serve: ServerFactory, tmp_path: Path
) -> None:
    # Given a lane with room for one running and one waiting run
    server = serve(OFFLOAD_INLINE_MAX_CONCURRENCY=1, OFFLOAD_INLINE_MAX_BACKLOG=1)
    with httpx.Client(base_url=server.url) as client:
        defer(client, "wait_forever", started=str(tmp_path / "a"))
        defer(client, "wait_forever", started=str(tmp_path / "b"))
        # When a third run of a task that may not spill is deferred
        refused = client.post("/defer/wait_forever", json={"started": str(tmp_path / "c")})
        # And one of a spill=True task
        spilled = client.post(
            "/defer/slow_spillable",
            json={"seconds": 0, "marker": str(tmp_path / "m"), "tag": "x"},
        )
        assert spilled.status_code == 202, spilled.text
        spilled_run = client.get(f"/tasks/{spilled.json()['id']}").json()
        rejected = metric(client, "offload_inline_rejected_total", task="wait_forever")
    # Then the first is refused with a hint, the second went to the durable lane
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert "spill=True" in refused.json()["detail"]
    assert spilled_run["lane"] == "durable"
    assert spilled_run["state"] == "PENDING"
    assert rejected == 1.0


def test_cpu_bound_runs_in_a_low_priority_process(serve: ServerFactory) -> None:
    server = serve(OFFLOAD_INLINE_CPU_PROCESSES=1)
    assert server.process is not None
    with httpx.Client(base_url=server.url) as client:
        run = wait_status(client, defer(client, "crunch", n=100_000), "SUCCESS")
    pid = run["result"]["pid"]
    assert run["result"]["total"] == sum(range(100_000))
    assert pid != server.process.pid
    assert run["result"]["nice"] == 19
    assert os.sched_getscheduler(pid) == os.SCHED_IDLE
    assert "nice 19" in Path(f"/proc/{pid}/autogroup").read_text()
    assert os.getsid(pid) == pid  # its own session, so its own autogroup
    assert psutil.Process(pid).ppid() == server.process.pid


@pytest.fixture
def slow_http_server() -> Iterator[str]:
    """A loopback HTTP server that takes 300 ms per request (the 'outside world')."""

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            time.sleep(0.3)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/report"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_guard_names_an_inline_task_that_blocks_the_loop(serve: ServerFactory) -> None:
    server = serve()
    with httpx.Client(base_url=server.url) as client:
        run_id = defer(client, "blocks_the_loop", seconds=0.4)
        wait_status(client, run_id, "SUCCESS")
        wait_until(lambda: "event loop blocked" in server.log(), 5, "the guard's warning")
        blocked = metric(client, "offload_event_loop_blocked_total")
    log = server.log()
    assert f"by inline task 'blocks_the_loop' (run {run_id})" in log
    assert "inline_app.py:" in log
    assert "time.sleep(seconds)  # noqa: ASYNC251" in log
    assert blocked >= 1.0


def test_guard_names_the_docs_trap_a_blocking_post_in_background_tasks(
    serve: ServerFactory, slow_http_server: str
) -> None:
    # Given the FastAPI docs' example shape: plain BackgroundTasks, an async def task, and a
    # blocking HTTP client call inside it
    server = serve()
    with httpx.Client(base_url=server.url) as client:
        response = client.post("/starlette-async-blocking", params={"url": slow_http_server})
        assert response.status_code == 200
        # On a slow machine the endpoint's first-request work (FastAPI reads source, compiles
        # regexes) can stall the loop first and is named first; wait for the task's own line.
        wait_until(lambda: "by BackgroundTasks task " in server.log(), 5, "the guard's warning")
    log = server.log()
    assert "post_report" in log
    assert "after endpoint POST /starlette-async-blocking" in log
    assert "urllib.request.urlopen" in log
