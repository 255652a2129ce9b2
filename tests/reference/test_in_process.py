"""The reference service tested as its authors would test their own app: in the test process,
with `offload.testing` (an embedded ledger per test, durable runs run as they are deferred,
inline runs drained after the request) and the real stand-ins for the outside world.

The end-to-end twin, over `offload serve` and real workers, is test_reference_service.py.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import reference.main
import reference.tasks
import sqlalchemy as sa
from fastapi.testclient import TestClient
from pypdf import PdfReader
from reference.config import Config
from reference.sinks import MailSink, Outside

from offload.testing import Harness, isolated
from reference import store


@dataclasses.dataclass
class Service:
    client: TestClient
    offload: Harness
    config: Config
    mail: MailSink
    outside: Outside

    def sign_up(self, email: str) -> dict[str, str]:
        answer = self.client.post("/signup", json={"email": email, "password": "hunter22!"})
        assert answer.status_code == 201, answer.text
        return {"Authorization": f"Bearer {answer.json()['token']}"}

    def rows(self, table: sa.Table) -> list[Any]:
        with store.db(self.config).connect() as conn:
            return list(conn.execute(sa.select(table)).all())


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    monkeypatch.setenv("REFERENCE_JWT_SECRET", "in-process-tests-" + "x" * 32)  # HS256 wants 32+
    # A seeded provider failing half its calls: the same outcomes on every run of the test.
    with MailSink() as mail, Outside(payment_failure_rate=0.5, seed=7) as outside:
        config = dataclasses.replace(
            Config.from_env(),
            database_url=f"sqlite:///{tmp_path}/reference.sqlite",
            reports_dir=tmp_path / "reports",
            smtp_host=mail.host,
            smtp_port=mail.port,
            webhook_url=f"{outside.url}/hooks/slack",
            payment_url=outside.url,
            start_sinks=False,  # the test holds them, to read what they were sent
        )
        # The service reads its settings once, at import; this test's are its own.
        monkeypatch.setattr(reference.tasks, "config", config)
        monkeypatch.setattr(reference.main, "config", config)
        with (
            isolated(reference.tasks.jobs, tmp_path / "offload") as harness,
            harness.client(reference.main.app) as client,
        ):
            yield Service(client, harness, config, mail, outside)


def test_signup_answers_and_its_four_inline_tasks_do_their_work(service: Service) -> None:
    answer = service.client.post(
        "/signup", json={"email": "ada@example.org", "password": "hunter22!"}
    ).json()
    service.offload.drain_inline()

    [mail] = service.mail.messages()
    assert mail.to == ("ada@example.org",)
    assert "your first workspace" in mail.body
    assert [hook["text"] for hook in service.outside.hooks()] == [
        f"New signup: user {answer['user_id']}"
    ]
    assert [row.kind for row in service.rows(store.events)] == ["signup"]
    assert [row.name for row in service.rows(store.workspaces)] == ["ada's"]
    assert service.offload.attempts == 0  # nothing durable in a signup


def test_reports_are_built_as_requested_and_only_their_owner_sees_them(service: Service) -> None:
    ada = service.sign_up("ada@example.org")
    bob = service.sign_up("bob@example.org")

    answer = service.client.post("/reports", json={"count": 2, "pages": 3}, headers=ada)
    assert answer.status_code == 202
    links = answer.json()
    assert len(links) == 2
    for link in links:
        status = service.client.get(link["status_url"], headers=ada).json()
        assert (status["state"], status["result"]["pages"]) == ("SUCCESS", 3)
        assert status["progress"]["message"] == "rendered page 3 of 3"
        pdf = service.client.get(link["download_url"], headers=ada)
        assert pdf.headers["content-type"] == "application/pdf"
        assert len(PdfReader(io.BytesIO(pdf.content)).pages) == 3
        for url in (link["status_url"], link["download_url"]):
            assert service.client.get(url, headers=bob).status_code == 404
    assert service.offload.attempts == 2


def test_orders_through_a_flaky_provider_are_charged_exactly_once(service: Service) -> None:
    ada = service.sign_up("ada@example.org")

    orders = [
        service.client.post("/orders", json={"amount_cents": 100 + n}, headers=ada).json()
        for n in range(10)
    ]
    service.offload.drain_inline()

    charges: dict[str, int] = {}
    for charge in service.outside.charges():
        charges[charge.order_id] = charges.get(charge.order_id, 0) + 1
    assert set(charges.values()) <= {1}  # never twice
    for order in orders:
        final = service.client.get(f"/orders/{order['id']}", headers=ada).json()
        if final["status"] == "paid":
            assert charges[str(order["id"])] == 1
        else:  # out of tries: dead, and the order says so
            assert final["status"] == "payment_failed"
            assert service.offload.jobs.status_sync(final["run_id"]).dead
    # Half the calls fail: the payments took retries, whose backoff the clock skipped.
    assert service.offload.attempts > len(orders)
    assert service.offload.clock.skipped > 0
    assert len(service.outside.hooks()) == len(orders) + 1  # each order's notice, the signup's
