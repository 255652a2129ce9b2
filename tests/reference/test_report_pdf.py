"""The reference service's PDF report, read back as a user's PDF reader would (pypdf): its page
count, the summary's owner and totals, each table page's footer and dates, the progress
callback, reproducible bytes, non-latin-1 owners, and the refusal of a one-page report."""

from __future__ import annotations

import io
import re
from datetime import UTC, date, datetime

import pytest
from pypdf import PdfReader
from reference.pdf import Activity, render_pdf

GENERATED_AT = datetime(2025, 3, 14, 9, 30, tzinfo=UTC)
ACTIVITY = [
    Activity(date(2025, 3, 1), "signup", 0),
    Activity(date(2025, 3, 2), "report", 0),
    Activity(date(2025, 3, 2), "order", 1999),
    Activity(date(2025, 3, 5), "order", 250000),
    Activity(date(2025, 3, 9), "report", 0),
    Activity(date(2025, 3, 11), "order", 1),
]
DATES = {f"{a.day:%Y-%m-%d}" for a in ACTIVITY}


def _pages(pdf: bytes) -> list[str]:
    return [page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages]


def test_a_six_page_report_has_a_summary_and_five_full_tables() -> None:
    calls: list[tuple[int, int]] = []
    pdf = render_pdf(
        "grace@example.org",
        ACTIVITY,
        pages=6,
        generated_at=GENERATED_AT,
        on_page=lambda i, n: calls.append((i, n)),
    )
    texts = _pages(pdf)
    assert len(texts) == 6
    summary = texts[0]
    assert "grace@example.org" in summary
    assert "order: 3 event(s), $2,520.00" in summary
    assert "report: 2 event(s), $0.00" in summary
    assert "signup: 1 event(s), $0.00" in summary
    assert "page 1 of 6" in summary
    for number, text in enumerate(texts[1:], start=2):
        assert f"page {number} of 6" in text
        assert "Date" in text
        assert "Kind" in text
        assert "Amount" in text
        shown = set(re.findall(r"\d{4}-\d{2}-\d{2}", text))
        assert shown, f"page {number} has no dates"
        assert shown <= DATES, f"page {number} shows dates not in the activity"
    # Six rows cannot fill five pages: they repeat as further periods.
    assert "(period 2)" in texts[1]
    assert calls == [(i, 6) for i in range(1, 7)]


def test_the_same_input_gives_the_same_bytes() -> None:
    first = render_pdf("grace@example.org", ACTIVITY, pages=3, generated_at=GENERATED_AT)
    second = render_pdf("grace@example.org", ACTIVITY, pages=3, generated_at=GENERATED_AT)
    assert first == second


def test_an_owner_outside_latin1_renders_with_question_marks() -> None:
    pdf = render_pdf("zoë@例え.jp", ACTIVITY, pages=2, generated_at=GENERATED_AT)
    texts = _pages(pdf)
    assert len(texts) == 2
    assert "zoë@??.jp" in texts[0]


def test_no_activity_still_gives_every_page() -> None:
    texts = _pages(render_pdf("new@example.org", [], pages=3, generated_at=GENERATED_AT))
    assert len(texts) == 3
    assert "No activity recorded." in texts[2]


def test_a_report_needs_at_least_two_pages() -> None:
    with pytest.raises(ValueError, match="pages"):
        render_pdf("grace@example.org", ACTIVITY, pages=1, generated_at=GENERATED_AT)
