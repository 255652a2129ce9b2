"""The README's run command, `offload serve reference.main:app`, on the embedded default: a
user signs up, builds PDF reports, pays orders through a provider that fails half its calls,
and cannot see another user's reports. One server for the module; real processes throughout.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import sqlalchemy as sa
from pypdf import PdfReader

from tests.support import ROOT, free_port, kill_and_reap, offload_cli, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@dataclass
class Service:
    base: str
    outside: str
    data: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def sign_up(self, email: str) -> dict[str, str]:
        answer = httpx.post(f"{self.base}/signup", json={"email": email, "password": "hunter22!"})
        assert answer.status_code == 201, answer.text
        body: dict[str, Any] = answer.json()
        return {"Authorization": f"Bearer {body['token']}"}

    def wait_orders(
        self, headers: dict[str, str], ids: list[int], ended: set[str], timeout: float, what: str
    ) -> list[dict[str, Any]]:
        """The orders `ids` once every one's status is in `ended`."""

        def all_ended() -> list[dict[str, Any]] | None:
            found = [httpx.get(f"{self.base}/orders/{o}", headers=headers).json() for o in ids]
            return found if all(f["status"] in ended for f in found) else None

        result: list[dict[str, Any]] = wait_until(all_ended, timeout, what)
        return result


@contextlib.contextmanager
def serving(data: Path, *options: str) -> Iterator[Service]:
    """`offload serve reference.main:app OPTIONS` on SQLite files in `data`, stopped at exit."""
    port, smtp, sinks = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "OFFLOAD_DATA_DIR": str(data),
        "PYTHONPATH": str(ROOT),
        "REFERENCE_SMTP_PORT": str(smtp),
        "REFERENCE_SINKS_PORT": str(sinks),
        "REFERENCE_PAYMENT_FAILURE_RATE": "0.5",
        "REFERENCE_PAYMENT_LATENCY_S": "0.01",
    }
    for name in ("OFFLOAD_BROKER_URL", "OFFLOAD_LEDGER_URL", "REFERENCE_DATABASE_URL"):
        env.pop(name, None)  # the embedded default: nothing but SQLite files
    log_path = data.parent / "serve.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    command = ["-m", "offload", "serve", "reference.main:app", "--port", str(port), *options]
    process = subprocess.Popen(
        [sys.executable, *command],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    found = Service(
        f"http://127.0.0.1:{port}", f"http://127.0.0.1:{sinks}", data, process, log_path
    )

    def up() -> bool:
        if process.poll() is not None:
            pytest.fail(f"offload serve exited with {process.returncode}:\n{found.log()}")
        try:
            return httpx.get(f"{found.base}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(up, 60, "the reference service to answer")
        yield found
    finally:
        if process.poll() is None:  # the last test stops it; this is for a failed one
            children = psutil.Process(process.pid).children(recursive=True)
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            finally:
                kill_and_reap(process, children)
        log.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with serving(tmp_path_factory.mktemp("reference") / "data") as found:
        yield found


def test_schemathesis_finds_no_server_error_in_the_openapi_schema(tmp_path: Path) -> None:
    # No worker: the fuzzed reports and payments would keep one busy for minutes, and only
    # the answers are judged here. So no run ever ends, and a run's event stream (SSE) stays
    # open until it does: that operation is left out.
    with serving(tmp_path / "data", "--no-embedded-worker") as fuzzed:
        headers = fuzzed.sign_up("fuzz@example.org")
        run = subprocess.run(
            [
                str(Path(sys.executable).with_name("schemathesis")),
                "run",
                f"{fuzzed.base}/openapi.json",
                "--checks",
                "not_a_server_error",
                "--max-examples",
                "30",
                "--generation-deterministic",
                "--exclude-path-regex",
                "/events$",
                "--header",
                f"Authorization: {headers['Authorization']}",
            ],
            cwd=tmp_path,  # schemathesis keeps a .schemathesis/ cache where it runs
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
    assert run.returncode == 0, run.stdout[-4000:]  # non-zero on any 5xx it provoked


def test_signup_answers_at_once_and_its_four_inline_tasks_all_happen(service: Service) -> None:
    headers = service.sign_up("ada@example.org")
    assert httpx.get(f"{service.base}/reports", headers=headers).json() == []
    again = httpx.post(
        f"{service.base}/signup", json={"email": "ADA@example.org", "password": "another one"}
    )
    assert again.status_code == 409
    assert "POST /login" in again.json()["detail"]
    bad = httpx.post(f"{service.base}/signup", json={"email": "not-an-email", "password": "x"})
    assert bad.status_code == 422
    assert {e["loc"][-1] for e in bad.json()["detail"]} == {"email", "password"}
    login = httpx.post(
        f"{service.base}/login", json={"email": "ada@example.org", "password": "hunter22!"}
    )
    assert login.status_code == 200
    wrong = httpx.post(
        f"{service.base}/login", json={"email": "ada@example.org", "password": "hunter23!"}
    )
    assert wrong.status_code == 401

    def mailed() -> bool:
        return "ada@example.org" in httpx.get(f"{service.base}/dev/mail").text

    wait_until(mailed, 30, "the welcome email to reach the SMTP sink")
    user_id = login.json()["user_id"]

    def hooked() -> bool:
        hooks = httpx.get(f"{service.outside}/hooks").json()
        return {"text": f"New signup: user {user_id}"} in hooks

    wait_until(hooked, 30, "the Slack notice to reach the webhook sink")
    database = sa.create_engine(f"sqlite:///{service.data}/reference.sqlite")
    try:

        def rows() -> tuple[int, int]:
            with database.connect() as conn:
                events = conn.execute(
                    sa.text("SELECT count(*) FROM events WHERE user_id = :u AND kind = 'signup'"),
                    {"u": user_id},
                ).scalar_one()
                spaces = conn.execute(
                    sa.text("SELECT count(*) FROM workspaces WHERE user_id = :u"), {"u": user_id}
                ).scalar_one()
            return int(events), int(spaces)

        wait_until(lambda: rows() == (1, 1), 30, "the analytics event and the workspace")
    finally:
        database.dispose()


def _events(service: Service, url: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    """Every status event of a run, until it ends."""
    seen = []
    with httpx.stream("GET", f"{service.base}{url}", headers=headers, timeout=120) as stream:
        assert stream.status_code == 200
        for line in stream.iter_lines():
            if line.startswith("data: "):
                seen.append(json.loads(line.removeprefix("data: ")))
    return seen


def test_reports_build_real_pdfs_with_progress_and_only_their_owner_sees_them(
    service: Service,
) -> None:
    owner = service.sign_up("grace@example.org")
    other = service.sign_up("mallory@example.org")
    accepted = httpx.post(
        f"{service.base}/reports", json={"count": 20, "pages": 4}, headers=owner, timeout=30
    )
    assert accepted.status_code == 202, accepted.text
    links = accepted.json()
    assert len(links) == 20
    first = links[0]
    updates = _events(service, first["events_url"], owner)
    assert updates[-1]["state"] == "SUCCESS"
    fractions = [u["progress"]["fraction"] for u in updates if u["progress"]]
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0
    assert updates[-1]["progress"]["message"] == "rendered page 4 of 4"
    for link in links:

        def done(url: str = link["status_url"]) -> bool:
            return bool(
                httpx.get(f"{service.base}{url}", headers=owner).json()["state"] == "SUCCESS"
            )

        wait_until(done, 120, "every report to finish")
        pdf = httpx.get(f"{service.base}{link['download_url']}", headers=owner)
        assert pdf.status_code == 200
        assert pdf.headers["content-type"] == "application/pdf"
        reader = PdfReader(io.BytesIO(pdf.content))
        assert len(reader.pages) == 4
        assert "grace@example.org" in reader.pages[0].extract_text()
    listed = httpx.get(f"{service.base}/reports", headers=owner).json()
    assert {link["id"] for link in listed} == {link["id"] for link in links}
    # Another user, or nobody: the same answers as for a report that does not exist.
    for url in (first["status_url"], first["events_url"], first["download_url"]):
        assert httpx.get(f"{service.base}{url}", headers=other).status_code == 404, url
        assert httpx.get(f"{service.base}{url}").status_code == 401, url
    assert httpx.get(f"{service.base}/reports", headers=other).json() == []
    too_many = httpx.post(f"{service.base}/reports", json={"count": 21}, headers=owner)
    assert too_many.status_code == 422
    assert too_many.json()["detail"][0]["loc"] == ["body", "count"]


def test_orders_through_a_provider_failing_half_its_calls_are_charged_at_most_once(
    service: Service,
) -> None:
    buyer = service.sign_up("linus@example.org")
    placed = [
        httpx.post(
            f"{service.base}/orders", json={"amount_cents": 1000 + n}, headers=buyer, timeout=30
        )
        for n in range(12)
    ]
    assert all(answer.status_code == 202 for answer in placed), [a.text for a in placed]
    orders = [answer.json()["id"] for answer in placed]

    final = service.wait_orders(
        buyer, orders, {"paid", "payment_failed"}, 120, "every order to be paid or to fail"
    )
    charges = httpx.get(f"{service.outside}/v1/charges").json()
    per_order: dict[str, int] = {}
    for charge in charges:
        per_order[charge["order_id"]] = per_order.get(charge["order_id"], 0) + 1
    for order in final:
        expected = 1 if order["status"] == "paid" else 0
        assert per_order.get(str(order["id"]), 0) <= 1, order
        if order["status"] == "paid":
            assert per_order.get(str(order["id"])) == expected, order
    assert any(order["status"] == "paid" for order in final)
    other = service.sign_up("eve@example.org")
    assert httpx.get(f"{service.base}/orders/{orders[0]}", headers=other).status_code == 404


def test_payments_in_flight_when_the_workers_are_killed_are_charged_once(
    service: Service,
) -> None:
    buyer = service.sign_up("ken@example.org")
    slow = {"failure_rate": 0.0, "latency_s": 1.0}
    assert httpx.post(f"{service.outside}/v1/settings", json=slow).status_code == 200
    try:
        placed = [
            httpx.post(f"{service.base}/orders", json={"amount_cents": 700 + n}, headers=buyer)
            for n in range(4)
        ]
        orders = [answer.json()["id"] for answer in placed]
        serve = psutil.Process(service.process.pid)
        consumers = [c for c in serve.children() if c.cmdline() == serve.cmdline()]
        assert consumers, "serve forked no worker"

        def in_flight() -> bool:
            charges = httpx.get(f"{service.outside}/v1/charges").json()
            return any(c["order_id"] in map(str, orders) for c in charges)

        # The simulator records a charge before its second of latency ends: kill then.
        wait_until(in_flight, 30, "a payment to reach the provider")
        for consumer in consumers:
            consumer.send_signal(signal.SIGKILL)
    finally:
        quick = {"failure_rate": 0.0, "latency_s": 0.0}
        assert httpx.post(f"{service.outside}/v1/settings", json=quick).status_code == 200

    paid = service.wait_orders(
        buyer, orders, {"paid"}, 120, "every order to be paid after the workers came back"
    )
    for order in paid:
        charges = httpx.get(
            f"{service.outside}/v1/charges", params={"order_id": order["id"]}
        ).json()
        assert [c["id"] for c in charges] == [order["charge_id"]], order


def test_a_declined_payment_fails_at_once_without_retrying(service: Service) -> None:
    buyer = service.sign_up("hedy@example.org")
    order = httpx.post(
        f"{service.base}/orders", json={"amount_cents": 2_000_000}, headers=buyer
    ).json()

    [dead] = service.wait_orders(
        buyer, [order["id"]], {"payment_failed"}, 60, "the declined payment to fail"
    )
    shown = offload_cli(
        "runs", "show", dead["run_id"], "--json", env={"OFFLOAD_DATA_DIR": str(service.data)}
    )
    run = json.loads(shown.stdout)
    assert (run["attempts"], run["dead"]) == (1, True)
    assert "PaymentDeclined" in run["error"]
    assert "card_declined" in run["error"]
    charges = httpx.get(f"{service.outside}/v1/charges", params={"order_id": order["id"]})
    assert charges.json() == []


def test_a_payment_dead_lettered_after_its_last_try_is_replayed_and_charged_once(
    service: Service,
) -> None:
    buyer = service.sign_up("margaret@example.org")
    down = {"failure_rate": 1.0, "latency_s": 0.0}
    assert httpx.post(f"{service.outside}/v1/settings", json=down).status_code == 200
    try:
        placed = httpx.post(f"{service.base}/orders", json={"amount_cents": 4200}, headers=buyer)
        order = placed.json()

        [dead] = service.wait_orders(
            buyer, [order["id"]], {"payment_failed"}, 120, "the payment to use its last try"
        )
    finally:
        up = {"failure_rate": 0.0, "latency_s": 0.0}
        assert httpx.post(f"{service.outside}/v1/settings", json=up).status_code == 200
    # Half the failures charged and lost the answer: the order may already be charged once.
    before = httpx.get(f"{service.outside}/v1/charges", params={"order_id": order["id"]}).json()
    assert len(before) <= 1
    replay = offload_cli(
        "dlq",
        "replay",
        dead["run_id"],
        "--app",
        "reference.main:jobs",
        "--json",
        env={"OFFLOAD_DATA_DIR": str(service.data)},
    )
    assert replay.returncode == 0, replay.stderr

    [settled] = service.wait_orders(
        buyer, [order["id"]], {"paid"}, 60, "the replayed payment to succeed"
    )
    charges = httpx.get(f"{service.outside}/v1/charges", params={"order_id": order["id"]}).json()
    assert [c["id"] for c in charges] == [settled["charge_id"]]
    if before:
        assert before[0]["id"] == settled["charge_id"]


def _fire(service: Service, schedule: str) -> Any:
    """`offload schedules run-now SCHEDULE`, then the run's result once it succeeded."""
    fired = offload_cli(
        *("schedules", "run-now", schedule, "--app", "reference.main:jobs", "--json"),
        env={"OFFLOAD_DATA_DIR": str(service.data)},
    )
    assert fired.returncode == 0, fired.stderr
    run_id = json.loads(fired.stdout)["id"]

    def done() -> Any:
        shown = offload_cli(
            "runs", "show", run_id, "--json", env={"OFFLOAD_DATA_DIR": str(service.data)}
        )
        status = json.loads(shown.stdout)
        assert status["state"] in ("PENDING", "STARTED", "PROGRESS", "SUCCESS"), status
        return status if status["state"] == "SUCCESS" else None

    return wait_until(done, 60, f"the {schedule} run to succeed")["result"]


def test_periodic_cleanup_expires_old_report_files_and_the_digest_mails_yesterdays_users(
    service: Service,
) -> None:
    owner = service.sign_up("barbara@example.org")
    link = httpx.post(
        f"{service.base}/reports", json={"count": 1, "pages": 2}, headers=owner
    ).json()[0]
    wait_until(
        lambda: (
            httpx.get(f"{service.base}{link['status_url']}", headers=owner).json()["state"]
            == "SUCCESS"
        ),
        60,
        "the report",
    )
    assert httpx.get(f"{service.base}{link['download_url']}", headers=owner).status_code == 200
    database = sa.create_engine(f"sqlite:///{service.data}/reference.sqlite")
    try:
        with database.begin() as conn:
            # The report was asked for two days ago; the user did two things yesterday.
            conn.execute(
                sa.text("UPDATE reports SET created_at = created_at - 172800 WHERE run_id = :r"),
                {"r": link["id"]},
            )
            user = conn.execute(
                sa.text("SELECT id FROM users WHERE email = 'barbara@example.org'")
            ).scalar_one()
            for kind in ("order", "report"):
                conn.execute(
                    sa.text(
                        "INSERT INTO events (user_id, kind, amount_cents, at) "
                        "VALUES (:u, :k, 0, :at)"
                    ),
                    {"u": user, "k": kind, "at": time.time() - 86400},
                )
    finally:
        database.dispose()
    assert _fire(service, "hourly-report-cleanup") >= 1
    gone = httpx.get(f"{service.base}{link['download_url']}", headers=owner)
    assert gone.status_code == 410
    assert "expired" in gone.json()["detail"]
    assert not (service.data / "reports" / f"{link['id']}.pdf").exists()
    assert _fire(service, "nightly-digest") >= 1

    def digest() -> bool:
        page = httpx.get(f"{service.base}/dev/mail").text
        return "<b>Your day in the reference service</b> to barbara@example.org" in page

    wait_until(digest, 30, "the digest email")


def test_garbage_and_oversized_bodies_are_refused_without_a_server_error(
    service: Service,
) -> None:
    buyer = service.sign_up("bob@example.org")
    huge = httpx.post(
        f"{service.base}/signup",
        content=b'{"email": "' + b"a" * 200_000 + b'"}',
        headers={"content-type": "application/json"},
    )
    assert huge.status_code == 413
    infinite = httpx.post(
        f"{service.base}/orders",
        content=b'{"amount_cents": 1e400}',
        headers={**buyer, "content-type": "application/json"},
    )
    assert infinite.status_code == 422
    assert infinite.json()["detail"][0]["input"] == "inf"
    broken = httpx.post(
        f"{service.base}/orders",
        content=b'{"amount_cents": ',
        headers={**buyer, "content-type": "application/json"},
    )
    assert broken.status_code == 422


def test_the_dashboard_is_mounted_and_sigterm_stops_everything_it_started(
    service: Service,
) -> None:
    board = httpx.get(f"{service.base}/offload/", timeout=10)
    assert board.status_code == 200
    log = service.log()
    for line in (
        "offload serve: dashboard at ",
        "reference: SMTP sink at smtp://127.0.0.1:",
        "reference: payment provider simulator at http://127.0.0.1:",
    ):
        assert line in log, log
    children = psutil.Process(service.process.pid).children(recursive=True)
    assert children, "serve started no embedded worker"
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(timeout=60) == 0
    # serve waited for every process it started: none is left when it exits.
    assert not [p.pid for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert "offload serve: workers stopped" in service.log()
    # The embedded default: ledger and broker are one file in the data directory.
    assert (service.data / "ledger.sqlite").exists()
    assert not (service.data / "broker.sqlite").exists()
