"""A user's activity report as a real multi-page PDF, drawn with fpdf2.

This is the reference service's CPU-heavy durable work (`reference.tasks.render_report`): a
summary page with totals and a bar chart, then pages of tables, with a callback after each page
so the task can report progress. Only fpdf's core fonts are used, so nothing is read from disk.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime

from fpdf import FPDF

ROWS_PER_PAGE = 38  # 6.5 mm rows under a 7 mm header fill an A4 page above the footer
CHART_DAYS = 20  # more bars than this and their date labels overlap
# (header, width in mm, alignment): money right-aligned so the digits line up.
COLUMNS = (("Date", 40, "L"), ("Kind", 70, "L"), ("Amount", 35, "R"), ("Running total", 35, "R"))


@dataclass(frozen=True)
class Activity:
    day: date
    kind: str  # "signup", "report", "order", ...
    amount_cents: int  # 0 when not money


def _latin1(text: str) -> str:
    """The core fonts encode latin-1 only; anything else (an owner's IDN email) becomes '?'."""
    return text.encode("latin-1", "replace").decode("latin-1")


def _dollars(cents: int) -> str:
    # Integer arithmetic: a float would round some large amounts by a cent.
    sign = "-" if cents < 0 else ""
    whole, part = divmod(abs(cents), 100)
    return f"{sign}${whole:,}.{part:02d}"


def _summary(pdf: FPDF, owner: str, activity: Sequence[Activity], generated_at: datetime) -> None:
    pdf.set_font("Helvetica", "B", 18)
    pdf.multi_cell(0, 9, _latin1(f"Activity report: {owner}"), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", size=10)
    stamp = generated_at.isoformat(sep=" ", timespec="seconds")
    pdf.cell(0, 7, f"Generated {stamp}", new_x="LMARGIN", new_y="NEXT")
    counts = Counter(a.kind for a in activity)
    money: defaultdict[str, int] = defaultdict(int)
    for a in activity:
        money[a.kind] += a.amount_cents
    pdf.set_font("Helvetica", "B", 12)
    pdf.cell(0, 9, "Totals per kind", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", size=10)
    for kind in sorted(counts):
        line = f"{kind}: {counts[kind]} event(s), {_dollars(money[kind])}"
        pdf.cell(0, 6, _latin1(line), new_x="LMARGIN", new_y="NEXT")
    total = sum(money.values())
    pdf.cell(0, 6, f"All: {len(activity)} event(s), {_dollars(total)}", new_x="LMARGIN")


def _chart(pdf: FPDF, activity: Sequence[Activity]) -> None:
    """Amount per day for the last CHART_DAYS days with activity: axes, ticks, dated bars."""
    per_day: defaultdict[date, int] = defaultdict(int)
    for a in activity:
        per_day[a.day] += a.amount_cents
    days = sorted(per_day)[-CHART_DAYS:]
    left, bottom, width, height = 30.0, 260.0, 160.0, 110.0
    pdf.set_font("Helvetica", "B", 12)
    pdf.set_xy(left - 20, bottom - height - 15)
    pdf.cell(0, 8, f"Amount per day (last {CHART_DAYS} active days)")
    pdf.set_draw_color(0, 0, 0)
    pdf.line(left, bottom, left + width, bottom)
    pdf.line(left, bottom, left, bottom - height)
    # Refunds can make a day negative; the chart shows money in, so it starts at zero. A scale
    # of at least $1 keeps the ticks readable when there is no money at all.
    tallest = max([per_day[d] for d in days] + [100])
    pdf.set_font("Helvetica", size=7)
    for tick in range(5):
        y = bottom - height * tick / 4
        pdf.line(left - 1.5, y, left, y)
        pdf.set_xy(left - 21, y - 2)
        pdf.cell(19, 4, _dollars(tallest * tick // 4), align="R")
    slot = width / max(len(days), 1)
    pdf.set_fill_color(70, 110, 180)
    for index, day in enumerate(days):
        bar = height * max(per_day[day], 0) / tallest
        x = left + index * slot + slot * 0.15
        if bar > 0:
            pdf.rect(x, bottom - bar, slot * 0.7, bar, style="F")
        pdf.set_xy(x - 2, bottom + 1)
        pdf.cell(slot * 0.7 + 4, 4, f"{day:%m-%d}", align="C")


def _table(pdf: FPDF, rows: Sequence[tuple[Activity, int]], running: int) -> int:
    """One page of rows under a header row; returns the running total after them."""
    pdf.set_font("Helvetica", "B", 10)
    for title, cell_width, align in COLUMNS:
        pdf.cell(cell_width, 7, title, border=1, align=align)
    pdf.ln()
    pdf.set_font("Helvetica", size=9)
    if not rows:
        pdf.cell(sum(w for _, w, _ in COLUMNS), 6.5, "No activity recorded.", border=1)
    for a, period in rows:
        running += a.amount_cents
        kind = a.kind if period == 1 else f"{a.kind} (period {period})"
        cells = (f"{a.day:%Y-%m-%d}", _latin1(kind), _dollars(a.amount_cents), _dollars(running))
        for (_, cell_width, align), text in zip(COLUMNS, cells, strict=True):
            pdf.cell(cell_width, 6.5, text, border=1, align=align)
        pdf.ln()
    return running


def render_pdf(
    owner: str,
    activity: Sequence[Activity],
    *,
    pages: int,
    generated_at: datetime,
    on_page: Callable[[int, int], None] | None = None,
) -> bytes:
    """A report of exactly `pages` pages: a summary with a chart, then tables of `activity`.

    `on_page(i, pages)` is called after page i is laid out, in order. The same arguments give
    the same bytes. With fewer rows than the table pages hold, the rows repeat as further
    periods ("kind (period 2)", ...), so every table page is full.
    """
    if pages < 2:
        raise ValueError(f"pages must be at least 2 (a summary page and a table page), not {pages}")
    pdf = FPDF(format="A4")
    pdf.set_creation_date(generated_at)  # fpdf would stamp the current time: not reproducible
    pdf.set_auto_page_break(False)  # pages are laid out by hand; a break would add pages
    pdf.set_title(_latin1(f"Activity of {owner}"))

    def finish(number: int) -> None:
        pdf.set_xy(10, 285)
        pdf.set_font("Helvetica", size=8)
        pdf.cell(0, 5, f"page {number} of {pages}", align="C")
        if on_page is not None:
            on_page(number, pages)

    pdf.add_page()
    _summary(pdf, owner, activity, generated_at)
    _chart(pdf, activity)
    finish(1)

    capacity = ROWS_PER_PAGE * (pages - 1)
    periods = -(-capacity // len(activity)) if activity else 0  # ceiling division
    rows = [(a, period) for period in range(1, periods + 1) for a in activity][:capacity]
    running = 0
    for number in range(2, pages + 1):
        pdf.add_page()
        start = (number - 2) * ROWS_PER_PAGE
        running = _table(pdf, rows[start : start + ROWS_PER_PAGE], running)
        finish(number)
    return bytes(pdf.output())
