"""`offload runs`, `queues` and `workers` as a user types them: a real `offload` process over a
real ledger."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from offload import Offload
from tests.support import WorkerProcess, offload_cli, wait_until


def run_cli(*args: str, cwd: Path, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return offload_cli(*args, env={"OFFLOAD_DATA_DIR": str(data_dir)}, cwd=cwd)


def test_reading_a_missing_ledger_is_an_error_and_creates_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "no-project-here"
    for command in (["runs", "list"], ["runs", "show", "0" * 32], ["workers"]):
        done = run_cli(*command, cwd=tmp_path, data_dir=data_dir)
        assert done.returncode == 1, done
        assert f"No ledger at sqlite:///{data_dir}/ledger.sqlite" in done.stderr
        assert "--ledger-url" in done.stderr
    assert not data_dir.exists()
    assert list(tmp_path.iterdir()) == []


def test_list_filters_and_show_tells_one_run(tmp_path: Path) -> None:
    jobs = Offload(data_dir=tmp_path / "data")

    @jobs.task(name="send_receipt", queue="mail")
    def send_receipt(order_id: int) -> None: ...

    @jobs.task(name="render_report")
    def render_report(user_id: int) -> str:
        return f"report-{user_id}.pdf"

    receipt = send_receipt.defer_sync(order_id=41)
    reports = render_report.defer_many_sync([{"user_id": 1}, {"user_id": 2}])
    jobs.close()

    listed = run_cli("runs", "list", "--json", cwd=tmp_path, data_dir=tmp_path / "data")
    assert listed.returncode == 0, listed.stderr
    assert {r["id"] for r in json.loads(listed.stdout)} == {receipt.id, *(r.id for r in reports)}

    mail = run_cli(
        "runs", "list", "--queue", "mail", "--json", cwd=tmp_path, data_dir=tmp_path / "data"
    )
    assert [r["id"] for r in json.loads(mail.stdout)] == [receipt.id]

    future = run_cli(
        "runs", "list", "--since", "2999-01-01", "--json", cwd=tmp_path, data_dir=tmp_path / "data"
    )
    assert json.loads(future.stdout) == []

    shown = run_cli("runs", "show", receipt.id, "--json", cwd=tmp_path, data_dir=tmp_path / "data")
    body = json.loads(shown.stdout)
    assert (body["id"], body["task"], body["state"]) == (receipt.id, "send_receipt", "PENDING")
    assert body["attempt_history"] == []

    table = run_cli("runs", "list", cwd=tmp_path, data_dir=tmp_path / "data")
    assert receipt.id in table.stdout
    assert "send_receipt" in table.stdout

    unknown = run_cli("runs", "show", "f" * 32, cwd=tmp_path, data_dir=tmp_path / "data")
    assert unknown.returncode == 1
    assert f"No run with id '{'f' * 32}'" in unknown.stderr


def test_queues_pause_and_resume_from_the_cli(tmp_path: Path) -> None:
    jobs = Offload(data_dir=tmp_path / "data")

    @jobs.task(queue="reports")
    def render(user_id: int) -> None: ...

    waiting = render.defer_sync(user_id=1)
    jobs.close()
    paused = run_cli(
        "queues", "pause", "reports", "--json", cwd=tmp_path, data_dir=tmp_path / "data"
    )
    assert paused.returncode == 0, paused.stderr
    [status] = json.loads(paused.stdout)
    assert (status["name"], status["paused"], status["due"]) == ("reports", True, 1)

    listed = run_cli("queues", "list", cwd=tmp_path, data_dir=tmp_path / "data")
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[:3] for line in listed.stdout.splitlines()[1:]] == [
        ["default", "active", "0"],
        ["reports", "paused", "1"],
    ]
    unknown = run_cli("queues", "pause", "reprots", cwd=tmp_path, data_dir=tmp_path / "data")
    assert unknown.returncode == 1
    assert "No queue named 'reprots'; known: default, reports" in unknown.stderr

    resumed = run_cli(
        "queues", "resume", "reports", "--json", cwd=tmp_path, data_dir=tmp_path / "data"
    )
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)[0]["paused"] is False
    assert Offload(data_dir=tmp_path / "data").status_sync(waiting.id).state.value == "PENDING"


def test_workers_lists_a_running_worker_and_says_none_runs_after_it_stops(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    worker = WorkerProcess(
        "tests.apps.inline_app:jobs", {"OFFLOAD_DATA_DIR": str(data_dir)}, tmp_path / "w.log"
    ).start()
    try:
        worker.wait_ready()

        def listed_alive() -> str | None:
            done = run_cli("workers", cwd=tmp_path, data_dir=data_dir)
            return done.stdout if done.returncode == 0 and " alive " in done.stdout else None

        assert wait_until(listed_alive, 30, "the worker in offload workers").startswith("name ")
    finally:
        worker.stop()
    after = run_cli("workers", cwd=tmp_path, data_dir=data_dir)
    assert after.returncode == 0, after.stderr
    assert after.stdout.startswith("no worker is running (a worker that stops cleanly signs off")
    assert "offload worker MODULE:jobs" in after.stdout
