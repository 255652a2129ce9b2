"""The dead-letter queue as a user fixes it: a run dies, its arguments are corrected, the
replay succeeds and links to the original. Through the CLI and through the admin HTTP API, on
both ledgers, with real worker processes."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from offload import RunFilter, RunNotFoundError, RunState, RunStatus
from tests.contract.conftest import LEDGERS, Durable, durable_world
from tests.support import Server, offload_cli, wait_until

APP = "tests.apps.contract:jobs"


@pytest.fixture(params=LEDGERS, ids=lambda ledger: f"sqlite-broker/{ledger}-ledger")
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Durable]:
    with durable_world("sqlite", request.param, tmp_path) as world:
        world.worker.start().wait_ready()
        yield world


def offload(world: Durable, *args: str) -> subprocess.CompletedProcess[str]:
    """`offload ARGS` as a user runs it beside the app: same OFFLOAD_* environment."""
    return offload_cli(*args, env=world.env)


def dead(world: Durable, order_id: int, cents: int = -5) -> RunStatus:
    run = world.task("charge").defer_sync(order_id=order_id, cents=cents)
    wait_until(lambda: run.status_sync().dead, 30, f"charge #{order_id} to die")
    status: RunStatus = run.status_sync()
    return status


def test_a_dead_run_is_fixed_from_the_cli(world: Durable) -> None:
    original = dead(world, order_id=7)
    assert original.state is RunState.FAILURE
    assert original.attempts == 2
    assert original.error == "ValueError: cannot charge -5 cents for order 7"

    listed = offload(world, "dlq", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [r["id"] for r in json.loads(listed.stdout)] == [original.id]
    table = offload(world, "dlq", "list", "--error-type", "ValueError")
    assert "1 dead run(s) (charge: 1)" in table.stdout
    assert (
        offload(world, "dlq", "list", "--error", "CANNOT CHARGE", "--json").stdout.count(
            original.id
        )
        == 1
    )
    assert (
        json.loads(offload(world, "dlq", "list", "--error-type", "KeyError", "--json").stdout) == []
    )

    shown = json.loads(offload(world, "dlq", "show", original.id, "--json").stdout)
    assert shown["args"] == {"order_id": 7, "cents": -5}
    assert [a["outcome"] for a in shown["attempt_history"]] == ["error", "error"]
    assert all("ValueError: cannot charge" in a["traceback"] for a in shown["attempt_history"])
    assert all(a["finished_at"] >= a["started_at"] for a in shown["attempt_history"])

    # Replaying publishes runs of the app's tasks: without the app, a usage error says so.
    no_app = offload(world, "dlq", "replay", original.id)
    assert no_app.returncode == 2
    assert "--app" in no_app.stderr

    # A bad edit is refused, naming the argument, and writes nothing.
    bad = offload(world, "dlq", "replay", original.id, "--arg", "cents=lots", "--app", APP)
    assert bad.returncode == 1
    assert "charge() got cents='lots'" in bad.stderr
    assert world.jobs.status_sync(original.id).replayed_by is None
    assert len(world.jobs.list_runs_sync().runs) == 1

    fixed = offload(
        world, "dlq", "replay", original.id, "--arg", "cents=250", "--app", APP, "--json"
    )
    assert fixed.returncode == 0, fixed.stderr
    replay = json.loads(fixed.stdout)
    assert replay["replay_of"] == original.id
    result = world.jobs.run(replay["id"]).result_sync(timeout=30)
    assert result == {"order_id": 7, "charged": 250}
    assert world.jobs.status_sync(original.id).replayed_by == replay["id"]
    assert world.jobs.get_run_sync(replay["id"]).args == {"order_id": 7, "cents": 250}

    again = offload(world, "dlq", "replay", original.id, "--app", APP)
    assert again.returncode == 1
    assert f"already replayed as {replay['id']}" in again.stderr
    # A replayed dead run leaves the queue's default view; --replayed shows it.
    assert json.loads(offload(world, "dlq", "list", "--json").stdout) == []
    everything = offload(world, "dlq", "list", "--replayed", "--json").stdout
    assert [r["id"] for r in json.loads(everything)] == [original.id]

    discarded = offload(world, "dlq", "discard", original.id)
    assert discarded.returncode == 0, discarded.stderr
    with pytest.raises(RunNotFoundError):
        world.jobs.status_sync(original.id)


def test_bulk_replay_purge_cancel_and_retry_from_the_cli(world: Durable) -> None:
    for order_id in (1, 2, 3):
        dead(world, order_id)
    other = world.task("doomed").defer_sync(reason="not a charge")

    bulk = offload(world, "dlq", "replay", "--task", "charge", "--app", APP)
    assert bulk.returncode == 0, bulk.stderr
    assert "replayed 3 run(s)" in bulk.stdout
    assert "replaying" in bulk.stderr  # the progress bar
    replays = world.jobs.list_runs_sync(RunFilter(task="charge", replayed=False, dead=None))
    replay_ids = {r.id for r in replays.runs if r.replay_of}
    assert len(replay_ids) == 3
    # The replays keep the negative amounts, so they die too, and wait in the queue.
    wait_until(
        lambda: all(world.jobs.status_sync(i).dead for i in replay_ids), 30, "replays to die"
    )
    counts = world.jobs.count_runs_sync(RunFilter(dead=True, replayed=False))
    assert counts.get("charge") == 3
    wait_until(lambda: world.jobs.status_sync(other.id).dead, 30, "the doomed run to die")

    purged = offload(world, "dlq", "purge", "--task", "charge", "--json")
    assert purged.returncode == 0, purged.stderr
    assert json.loads(purged.stdout.splitlines()[-1]) == {"purged": 6}
    assert world.jobs.count_runs_sync(RunFilter(dead=True)) == {"doomed": 1}
    refused = offload(world, "dlq", "purge")
    assert refused.returncode == 2
    assert "--all" in refused.stderr

    # runs cancel / retry: a waiting run is cancelled, then started again as a new run.
    waiting = world.task("add").options(delay=3600).defer_sync(a=2, b=3)
    cancelled = offload(world, "runs", "cancel", waiting.id, "--json")
    assert json.loads(cancelled.stdout)["state"] == "CANCELLED"
    retried = offload(world, "runs", "retry", waiting.id, "--app", APP, "--json")
    assert retried.returncode == 0, retried.stderr
    assert world.jobs.run(json.loads(retried.stdout)["id"]).result_sync(timeout=30) == 5
    success = offload(world, "runs", "retry", json.loads(retried.stdout)["id"], "--app", APP)
    assert success.returncode == 1
    assert "only FAILURE or CANCELLED runs can be replayed" in success.stderr

    # runs purge deletes finished runs only; a waiting run stays whatever the filter says.
    pending = world.task("add").options(delay=3600).defer_sync(a=1, b=1)
    gone = offload(world, "runs", "purge", "--older-than", "0s", "--json")
    assert gone.returncode == 0, gone.stderr
    left = world.jobs.list_runs_sync().runs
    assert [r.id for r in left] == [pending.id]
    assert json.loads(gone.stdout.splitlines()[-1])["purged"] >= 3


def test_a_dead_run_is_fixed_through_the_admin_api(world: Durable) -> None:
    server = Server("tests.apps.contract_api:app", world.data_dir, dict(world.env)).start()
    try:
        with httpx.Client(base_url=f"{server.url}/admin/jobs", timeout=30) as admin:
            fix_through_the_api(world, admin)
    finally:
        server.stop()


def fix_through_the_api(world: Durable, admin: httpx.Client) -> None:
    original = dead(world, order_id=9)

    listed = admin.get("/runs", params={"dead": "true"})
    assert listed.status_code == 200, listed.text
    page = listed.json()
    assert [r["id"] for r in page["runs"]] == [original.id]
    assert admin.get("/runs/counts", params={"dead": "true"}).json() == {"charge": 1}
    detail = admin.get(f"/runs/{original.id}").json()
    assert detail["args"] == {"order_id": 9, "cents": -5}
    assert len(detail["attempt_history"]) == 2

    bad = admin.post(f"/runs/{original.id}/replay", json={"args": {"cents": "lots"}})
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["cents"]
    assert admin.get(f"/runs/{original.id}").json()["replayed_by"] is None

    fixed = admin.post(f"/runs/{original.id}/replay", json={"args": {"cents": 99}})
    assert fixed.status_code == 201, fixed.text
    replay = fixed.json()
    assert replay["replay_of"] == original.id
    done = wait_until(
        lambda: (s := admin.get(f"/runs/{replay['id']}").json())["state"] == "SUCCESS" and s,
        30,
        "the replay to succeed",
    )
    assert done["result"] == {"order_id": 9, "charged": 99}
    assert admin.get(f"/runs/{original.id}").json()["replayed_by"] == replay["id"]

    assert admin.post(f"/runs/{original.id}/replay").status_code == 409
    assert admin.post(f"/runs/{replay['id']}/replay").status_code == 409  # it succeeded
    assert admin.get(f"/runs/{'0' * 32}").status_code == 404
    assert admin.post(f"/runs/{'0' * 32}/replay").status_code == 404
    assert admin.delete(f"/runs/{replay['id']}").status_code == 204
    assert admin.get(f"/runs/{replay['id']}").status_code == 404

    for order_id in (10, 11):
        dead(world, order_id)
    bulk = admin.post("/runs/replay", json={"dead": True, "task": "charge"})
    assert bulk.json() == {"replayed": 2}  # the replayed original is not taken again
    purged = admin.post("/runs/purge", json={"dead": True, "replayed": True})
    assert purged.json() == {"purged": 3}
