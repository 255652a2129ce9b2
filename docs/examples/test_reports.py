"""Testing an app that uses offload: `docs/examples/reports.py`, as its own tests would.

Each test gets its own embedded ledger and broker; durable runs run in the test process as
they are deferred, through the path a worker takes; inline runs are drained after the request.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from docs.examples.reports import REQUESTED, app, jobs, render_report
from offload import RunState
from offload.testing import Harness, RecordingContext, isolated


@pytest.fixture
def offload(tmp_path: Path) -> Iterator[Harness]:
    with isolated(jobs, tmp_path) as harness:
        yield harness


@pytest.fixture
def client(offload: Harness) -> Iterator[TestClient]:
    with offload.client(app) as client:  # runs the lifespan: the inline lane starts
        yield client


def test_a_report_request_renders_the_report_and_counts_it(
    client: TestClient, offload: Harness
) -> None:
    before = REQUESTED.get("csv", 0)
    response = client.post("/reports", json={"user_id": 7, "kind": "csv"})
    assert response.status_code == 202
    offload.drain_inline()

    status = client.get(response.json()["status_url"]).json()
    assert status["state"] == "SUCCESS"
    assert status["result"] == "reports/7.csv"
    assert status["progress"] == {"fraction": 0.6, "message": "rendering"}
    assert offload.jobs.run(status["id"]).result_sync() == "reports/7.csv"
    assert REQUESTED["csv"] == before + 1


def test_a_wrong_kind_is_refused_and_starts_nothing(client: TestClient, offload: Harness) -> None:
    response = client.post("/reports", json={"user_id": 7, "kind": "docx"})
    assert response.status_code == 422
    assert offload.jobs.list_runs_sync().runs == []
    assert offload.attempts == 0


def test_a_delayed_report_runs_on_the_tests_clock(offload: Harness) -> None:
    run = render_report.options(delay=3600).defer_sync(user_id=7, kind="pdf")
    assert run.status_sync().state is RunState.SUCCESS  # no hour-long wait
    assert offload.clock.skipped == pytest.approx(3600, abs=1)
    assert offload.attempts == 1


def test_the_task_function_alone() -> None:
    ctx = RecordingContext("render_report")
    assert render_report(ctx, 7, "pdf") == "reports/7.pdf"
    assert ctx.reports == [(0.6, "rendering")]
