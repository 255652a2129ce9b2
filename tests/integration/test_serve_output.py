"""What `offload serve` prints: one line per component with its URL, no Celery banner or
root warning per consumer unless asked for (`--log-level info`), and a stop that says so."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.integration.web_client import wait_status
from tests.support import ROOT, free_port, offload_cli, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

APP = "docs.examples.reports:app"  # the README's first example: a durable and an inline task


def serve_and_stop(tmp_path: Path, *options: str) -> str:
    """Run `offload serve APP OPTIONS`, defer one report through it, SIGTERM it; its output."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OFFLOAD_DATA_DIR": str(tmp_path / "data")}
    for name in ("OFFLOAD_BROKER_URL", "OFFLOAD_LEDGER_URL"):
        env.pop(name, None)
    output = tmp_path / "serve.out"
    with open(output, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "offload", "serve", APP, "--port", str(port), *options],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

                def up() -> bool:
                    try:
                        return client.get("/tasks/none").status_code == 404
                    except httpx.TransportError:
                        return False

                wait_until(up, 60, "offload serve to answer")
                started = client.post("/reports", json={"user_id": 7, "kind": "csv"}).json()
                done = wait_status(client, started["task_id"], "SUCCESS", timeout=60)
                assert done["result"] == "reports/7.csv"
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return output.read_text(errors="replace")


def test_serve_prints_one_line_per_component_and_no_celery_noise(tmp_path: Path) -> None:
    lines = serve_and_stop(tmp_path).splitlines()

    port_line = lines[0]
    assert port_line.startswith("offload serve: API at http://127.0.0.1:")
    assert port_line.endswith("/ (bound to 127.0.0.1)")
    worker_line = next(line for line in lines if "embedded worker" in line)
    assert worker_line.endswith("(3 low-priority process(es): io0, io1, cpu)")
    assert lines[-1] == "offload serve: workers stopped"
    text = "\n".join(lines)
    for noise in ("[queues]", "SecurityWarning", "Warm shutdown", "Uvicorn running"):
        assert noise not in text
    root_lines = [line for line in lines if "running as root" in line]
    assert len(root_lines) == (1 if os.geteuid() == 0 else 0)
    # Nothing else: each line is offload's own
    assert all(line.startswith("offload serve: ") for line in lines), text


def test_log_level_info_reaches_uvicorn_and_the_workers(tmp_path: Path) -> None:
    text = serve_and_stop(tmp_path, "--log-level", "info")

    assert "Uvicorn running on http://127.0.0.1:" in text
    assert text.count("[queues]") == 3  # each consumer's Celery banner
    assert '"POST /reports HTTP/1.1" 202' in text  # uvicorn's access log


def test_an_unknown_log_level_is_refused_naming_the_choices() -> None:
    answer = offload_cli("serve", APP, "--log-level", "loud", env={})
    assert answer.returncode == 2
    assert "'loud' is not one of" in answer.stderr
    assert "warning" in answer.stderr
