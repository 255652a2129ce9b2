"""Prometheus collectors of this process, all named `offload_*`.

Label values come from bounded sets (task names, lanes, states); a run id is never a label.
These are the series of this process: the inline lane's and the event-loop guard's. The durable
lane's are counted in the ledger by the writes that end its attempts (`ledger/queries.py`) and
joined to these at scrape time by `jobs.metrics_app()` (`web/metrics.py`).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.samples import Sample

DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
"""Upper bounds (seconds) of `offload_run_duration_seconds`, on both lanes."""
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)
"""Upper bounds (seconds) of `offload_queue_wait_seconds`: a backlog can last an hour."""


def bucket_of(bounds: tuple[float, ...], seconds: float) -> int:
    """The index of the first bound >= `seconds` (`len(bounds)` for +Inf)."""
    return bisect.bisect_left(bounds, seconds)


RUNS = Counter(
    "offload_runs",
    "Runs that reached a terminal state, by task, lane and state.",
    ["task", "lane", "state"],
)
RUN_DURATION = Histogram(
    "offload_run_duration_seconds",
    "Wall time of one attempt, from its start to its end.",
    ["task", "lane"],
    buckets=DURATION_BUCKETS,
)
INLINE_RETRIES = Counter(
    "offload_inline_retries", "Inline attempts that failed and were tried again.", ["task"]
)
INLINE_SPILLED = Counter(
    "offload_inline_spilled",
    "Inline runs handed to the durable lane (reason: full or shutdown).",
    ["task", "reason"],
)
INLINE_REJECTED = Counter(
    "offload_inline_rejected",
    "defer() calls refused with LaneFullError (backlog full or lane stopping).",
    ["task"],
)
INLINE_DROPPED = Counter(
    "offload_inline_dropped",
    "Inline runs ended unfinished at shutdown (logged by name).",
    ["task"],
)
INLINE_RUNNING = Gauge("offload_inline_running", "Inline runs running now.")
INLINE_WAITING = Gauge("offload_inline_waiting", "Inline runs waiting for a slot now.")
LOOP_BLOCKED = Counter(
    "offload_event_loop_blocked",
    "Times the event loop was blocked longer than the guard's threshold.",
)
LOOP_BLOCKED_SECONDS = Histogram(
    "offload_event_loop_blocked_seconds",
    "How long each blocking episode of the event loop lasted.",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
LOOP_LAG = Gauge("offload_event_loop_lag_seconds", "The event loop's latest measured lag.")


class RunMetrics:
    """Label children cached per (task, lane, state): a label lookup takes a lock each time."""

    def __init__(self) -> None:
        self._runs: dict[tuple[str, str, str], Any] = {}
        self._durations: dict[tuple[str, str], Any] = {}

    def finished(self, task: str, lane: str, state: str, duration_s: float | None) -> None:
        """Count one run that reached `state`; observe its attempt's duration if it ran."""
        key = (task, lane, state)
        child = self._runs.get(key)
        if child is None:
            child = self._runs[key] = RUNS.labels(task, lane, state)
        child.inc()
        if duration_s is not None:
            timing = self._durations.get((task, lane))
            if timing is None:
                timing = self._durations[(task, lane)] = RUN_DURATION.labels(task, lane)
            timing.observe(duration_s)


@dataclass(frozen=True)
class InlineCounts:
    """This process's inline-lane counters, as the dashboard's overview shows them."""

    finished: dict[str, int]  #: runs that reached each terminal state
    running: int
    waiting: int
    retries: int
    spilled: int
    rejected: int
    dropped: int


def _samples(metric: Any, name: str) -> Iterator[Sample]:
    for family in metric.collect():
        yield from (sample for sample in family.samples if sample.name == name)


def _sum(metric: Any, name: str) -> int:
    return int(sum(sample.value for sample in _samples(metric, name)))


def inline_counts() -> InlineCounts:
    """Read the inline lane's counters of this process."""
    finished: dict[str, int] = {}
    for sample in _samples(RUNS, "offload_runs_total"):
        if sample.labels.get("lane") == "inline":
            state = sample.labels["state"]
            finished[state] = finished.get(state, 0) + int(sample.value)
    return InlineCounts(
        finished=finished,
        running=_sum(INLINE_RUNNING, "offload_inline_running"),
        waiting=_sum(INLINE_WAITING, "offload_inline_waiting"),
        retries=_sum(INLINE_RETRIES, "offload_inline_retries_total"),
        spilled=_sum(INLINE_SPILLED, "offload_inline_spilled_total"),
        rejected=_sum(INLINE_REJECTED, "offload_inline_rejected_total"),
        dropped=_sum(INLINE_DROPPED, "offload_inline_dropped_total"),
    )
