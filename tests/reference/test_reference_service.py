"""The README's run command: `offload serve reference.main:app` on the embedded default."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support import ROOT, free_port, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_serve_runs_api_and_worker_on_sqlite_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "OFFLOAD_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(ROOT)}
    for name in ("OFFLOAD_BROKER_URL", "OFFLOAD_LEDGER_URL"):
        env.pop(name, None)  # the embedded default: nothing but SQLite files
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    serve = subprocess.Popen(
        [sys.executable, "-m", "offload", "serve", "reference.main:app", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    tree = psutil.Process(serve.pid)
    children: list[psutil.Process] = []
    try:
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{base}/docs", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, 60, "the API to answer")
        accepted = httpx.post(f"{base}/reports", json={"user_id": 7, "kind": "csv"}, timeout=10)
        assert accepted.status_code == 202
        task_id = accepted.json()["task_id"]
        assert accepted.json()["status_url"] == f"/tasks/{task_id}"

        def finished() -> dict[str, object] | None:
            body: dict[str, object] = httpx.get(f"{base}/tasks/{task_id}", timeout=5).json()
            return body if body["state"] == "SUCCESS" else None

        status = wait_until(finished, 60, "the report to render")
        assert str(status["result"]).startswith("reports/7-")
        assert str(status["result"]).endswith(".csv")
        assert status["progress"] == {"fraction": 1.0, "message": "rendered page 10 of 10"}
        assert httpx.get(f"{base}/tasks/{'0' * 32}", timeout=5).status_code == 404
        bad = httpx.post(f"{base}/reports", json={"user_id": 7, "kind": "docx"}, timeout=5)
        assert bad.status_code == 422
        # The dashboard, open to loopback callers (the service sets no credentials).
        board = httpx.get(f"{base}/offload/runs/{task_id}", timeout=10)
        assert board.status_code == 200
        assert "render_report" in board.text
        assert 'class="state state-success">SUCCESS<' in board.text
        children = tree.children(recursive=True)
        assert children, "serve started no embedded worker"
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)
        log.close()
    # Every process it started is gone.
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.pid for p in alive]
    assert f"dashboard at http://127.0.0.1:{port}/offload/" in (tmp_path / "serve.log").read_text()
    assert (tmp_path / "data" / "broker.sqlite").exists()
    assert (tmp_path / "data" / "ledger.sqlite").exists()
