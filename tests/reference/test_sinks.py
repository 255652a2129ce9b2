"""The reference service's stand-ins for the outside world (reference/sinks.py), driven as their
users drive them: smtplib for the mail sink, plain HTTP for the webhook sink and the payment
provider simulator."""

from __future__ import annotations

import smtplib
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage

import httpx
import pytest
from reference.sinks import MailSink, Outside

CHARGE = {"order_id": "o-1", "amount_cents": 1250, "currency": "eur"}


def key(value: str) -> dict[str, str]:
    return {"Idempotency-Key": value}


def test_mail_sent_with_smtplib_is_kept_with_its_subject_and_body() -> None:
    message = EmailMessage()
    message["From"] = "shop@example.org"
    message["To"] = "ana@example.org"
    message["Cc"] = "ops@example.org"
    message["Subject"] = "Grüße aus Köln: Ihre Bestellung ✓"
    message.set_content("Hallo Ana,\nyour order has shipped.\n")
    assert b"=?utf-8?" in message.as_bytes()  # the subject travels RFC 2047-encoded
    with MailSink() as sink:
        assert sink.port != 0
        assert sink.url == f"smtp://127.0.0.1:{sink.port}"
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=10) as client:
            client.send_message(message)
        [mail] = sink.messages()
    assert mail.sender == "shop@example.org"
    assert mail.to == ("ana@example.org", "ops@example.org")
    assert mail.subject == "Grüße aus Köln: Ihre Bestellung ✓"
    assert mail.body == "Hallo Ana,\nyour order has shipped.\n"
    assert mail.received_at > 0


def test_a_webhook_post_is_answered_like_slack_and_listed() -> None:
    with Outside() as outside, httpx.Client(base_url=outside.url, timeout=10) as client:
        answer = client.post("/hooks/slack", json={"text": "New signup: user 7"})
        assert answer.status_code == 200
        assert answer.json() == {"ok": True}
        assert client.get("/hooks").json() == [{"text": "New signup: user 7"}]
        assert outside.hooks() == [{"text": "New signup: user 7"}]


def test_a_retried_charge_is_replayed_not_charged_again() -> None:
    with Outside() as outside, httpx.Client(base_url=outside.url, timeout=10) as client:
        first = client.post("/v1/charges", json=CHARGE, headers=key("k-1"))
        assert first.status_code == 201
        made = first.json()
        assert made == {**CHARGE, "id": made["id"], "status": "succeeded"}
        assert made["id"].startswith("ch_")
        assert "Idempotent-Replayed" not in first.headers

        again = client.post("/v1/charges", json=CHARGE, headers=key("k-1"))
        assert again.status_code == 200
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.json() == made

        [charge] = outside.charges()
        assert (charge.id, charge.order_id, charge.amount_cents) == (made["id"], "o-1", 1250)
        assert charge.idempotency_key == "k-1"
        [listed] = client.get("/v1/charges", params={"order_id": "o-1"}).json()
        assert listed["id"] == made["id"]
        assert listed["idempotency_key"] == "k-1"
        assert client.get("/v1/charges", params={"order_id": "o-2"}).json() == []


def test_a_charge_needs_a_key_and_a_key_belongs_to_one_body() -> None:
    with Outside() as outside, httpx.Client(base_url=outside.url, timeout=10) as client:
        missing = client.post("/v1/charges", json=CHARGE)
        assert missing.status_code == 400
        assert "Idempotency-Key" in missing.json()["error"]["message"]
        assert client.post("/v1/charges", json=CHARGE, headers=key("k-1")).status_code == 201
        other = {**CHARGE, "amount_cents": 999}
        assert client.post("/v1/charges", json=other, headers=key("k-1")).status_code == 409
        assert [c.amount_cents for c in outside.charges()] == [1250]


def test_failures_are_503_before_charging_or_502_after_and_a_retry_finds_the_charge() -> None:
    with (
        Outside(payment_failure_rate=1.0, seed=7) as outside,
        httpx.Client(base_url=outside.url, timeout=10) as client,
    ):
        bodies = {f"k-{i}": {**CHARGE, "order_id": f"o-{i}"} for i in range(20)}
        status = {k: client.post("/v1/charges", json=b, headers=key(k)).status_code
                  for k, b in bodies.items()}  # fmt: skip
        assert set(status.values()) == {502, 503}
        lost = {k for k, s in status.items() if s == 502}
        charged = {c.idempotency_key: c.id for c in outside.charges()}
        assert set(charged) == lost  # a 502 lost the answer, not the charge

        bad = client.post("/v1/settings", json={"failure_rate": 2, "latency_s": 0})
        assert bad.status_code == 422
        settings = {"failure_rate": 0.0, "latency_s": 0.0}
        assert client.post("/v1/settings", json=settings).json() == settings
        assert outside.payment_failure_rate == 0.0

        k = min(lost)
        retry = client.post("/v1/charges", json=bodies[k], headers=key(k))
        assert retry.status_code == 200
        assert retry.headers["Idempotent-Replayed"] == "true"
        assert retry.json()["id"] == charged[k]
        assert len(outside.charges()) == len(lost)

        k = min(set(bodies) - lost)  # a 503 charged nothing: its retry is the first charge
        assert client.post("/v1/charges", json=bodies[k], headers=key(k)).status_code == 201
        assert len(outside.charges()) == len(lost) + 1


def test_concurrent_calls_with_one_key_record_one_charge() -> None:
    calls = 20
    together = threading.Barrier(calls)

    # The latency keeps every call in flight at once, past the point where the key is checked.
    with Outside(payment_latency_s=0.05) as outside:

        def charge(_: int) -> httpx.Response:
            together.wait(timeout=10)
            return httpx.post(
                f"{outside.url}/v1/charges", json=CHARGE, headers=key("same"), timeout=10
            )

        with ThreadPoolExecutor(calls) as pool:
            answers = list(pool.map(charge, range(calls)))
        charges = outside.charges()
    assert sorted(a.status_code for a in answers) == [200] * (calls - 1) + [201]
    assert len(charges) == 1
    assert {a.json()["id"] for a in answers} == {charges[0].id}


@pytest.mark.parametrize("kind", [MailSink, Outside])
def test_start_is_idempotent_and_stop_frees_the_port(kind: type[MailSink | Outside]) -> None:
    def bind(port: int) -> None:
        with socket.socket() as other:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
            other.bind(("127.0.0.1", port))
            other.listen()

    sink = kind()
    with sink:
        port = sink.port
        sink.start()
        assert sink.port == port
        if isinstance(sink, Outside):  # a whole exchange: a bare connect may outlive stop()
            assert httpx.get(f"{sink.url}/hooks", timeout=10).json() == []
        else:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                assert client.noop()[0] == 250
        with pytest.raises(OSError, match="in use"):
            bind(port)
    sink.stop()
    bind(port)
