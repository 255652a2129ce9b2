"""Small helpers for talking to a test server over real HTTP."""

from __future__ import annotations

import time
from collections.abc import Collection
from datetime import datetime
from typing import Any

import httpx
import pytest

from tests.support import Scrape


def defer(
    client: httpx.Client, task: str, headers: dict[str, str] | None = None, **kwargs: Any
) -> str:
    response = client.post(f"/defer/{task}", json=kwargs, headers=headers)
    assert response.status_code == 202, response.text
    run_id: str = response.json()["id"]
    return run_id


def wait_status(
    client: httpx.Client,
    run_id: str,
    states: str | Collection[str],
    timeout: float = 10.0,
    prefix: str = "/tasks",
) -> dict[str, Any]:
    """Poll `GET {prefix}/{id}` until the run is in one of `states`; fail after `timeout`."""
    wanted = {states} if isinstance(states, str) else set(states)
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = client.get(f"{prefix}/{run_id}")
        assert response.status_code == 200, response.text
        body = response.json()
        if body["state"] in wanted:
            return body
        if body["state"] in {"SUCCESS", "FAILURE", "CANCELLED"}:
            pytest.fail(f"run {run_id} ended {body['state']}, not {wanted}: {body}")
        time.sleep(0.02)
    pytest.fail(f"run {run_id} is {body.get('state')}, not {wanted}, after {timeout}s")


def at(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    """The samples named `name` on `/metrics` whose labels include `labels`, summed (0 when
    absent)."""
    return Scrape(client.get("/metrics/").text).value(name, **labels)
