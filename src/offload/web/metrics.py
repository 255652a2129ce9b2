"""`/metrics` for an app: this process's series and the durable lane's, in one exposition.

The inline lane and the event-loop guard count in this process (`offload.metrics`); the
durable lane counts in the ledger, from every worker on every machine (`ledger/stats.py`).
At each scrape the ledger's counts join this process's families under the same names
(`offload_runs_total{lane="durable"}` beside `{lane="inline"}`), and the ledger's gauges are
read: queue depth, dead runs, live workers. The read runs off the event loop.

If the ledger cannot be read, the scrape still answers with this process's series and
`offload_ledger_up 0`, so that an alert can say why the durable series stopped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Sample

from offload.core.run import DEAD_RUNS, Lane
from offload.errors import LedgerError
from offload.ledger import queries, stats
from offload.ledger.database import Ledger
from offload.metrics import DURATION_BUCKETS, WAIT_BUCKETS

logger = logging.getLogger("offload.metrics")

DURABLE = Lane.DURABLE.value


@dataclass(frozen=True)
class Snapshot:
    """What `/metrics` shows of the durable lane, read in one transaction."""

    counts: stats.Counts
    depths: dict[str, int]  # queue -> runs due and not started
    dead: dict[str, int]  # task -> dead runs kept
    workers: int  # worker processes that reported within the stale bound


def _buckets(
    name: str, labels: dict[str, str], bounds: tuple[float, ...], found: stats.Histogram
) -> Iterator[Sample]:
    """A histogram's samples, cumulative as Prometheus reads them."""
    total = 0
    for bound, count in zip((*bounds, float("inf")), found.counts, strict=True):
        total += count
        le = "+Inf" if bound == float("inf") else repr(float(bound))  # as prometheus_client
        yield Sample(f"{name}_bucket", {**labels, "le": le}, total)
    yield Sample(f"{name}_count", labels, total)
    yield Sample(f"{name}_sum", labels, found.sum)


def _gauge(name: str, documentation: str, label: str, values: Mapping[str, int]) -> Metric:
    gauge = GaugeMetricFamily(name, documentation, labels=[label])
    for value, count in sorted(values.items()):
        gauge.add_metric([value], count)
    return gauge


class LedgerCollector:
    """This process's families, with the ledger's durable-lane series joined in."""

    def __init__(self, ledger: Callable[[], Ledger], stale_after_s: float) -> None:
        self.ledger = ledger  # asked on every scrape: offload.testing swaps an app's ledger
        self.stale_after_s = stale_after_s

    def _read(self, conn: Any) -> Snapshot:
        now = self.ledger().clock()
        return Snapshot(
            counts=stats.read(conn),
            depths={q.name: q.due for q in queries.queue_statuses(conn, now) if q.due},
            dead=queries.count_by_task(conn, DEAD_RUNS),
            workers=queries.count_live_workers(conn, now, self.stale_after_s),
        )

    def _snapshot(self) -> Snapshot | None:
        try:
            return self.ledger().read(self._read)
        except LedgerError:
            logger.warning("/metrics: the ledger cannot be read", exc_info=True)
            return None

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        for family in REGISTRY.collect():
            if snap is not None and family.name == "offload_runs":
                family.samples.extend(
                    Sample("offload_runs_total", {"task": t, "lane": DURABLE, "state": s}, n)
                    for (t, s), n in sorted(snap.counts.runs.items())
                )
            elif snap is not None and family.name == "offload_run_duration_seconds":
                for task, found in sorted(snap.counts.durations.items()):
                    labels = {"task": task, "lane": DURABLE}
                    family.samples.extend(_buckets(family.name, labels, DURATION_BUCKETS, found))
            yield family
        up = GaugeMetricFamily("offload_ledger_up", "1 if /metrics could read the ledger.")
        up.add_metric([], 0 if snap is None else 1)
        yield up
        if snap is None:
            return
        wait = HistogramMetricFamily(
            "offload_queue_wait_seconds",
            "Time a durable attempt waited in its queue, from when it was due to its start.",
            labels=["task"],
        )
        for task, found in sorted(snap.counts.waits.items()):
            wait.samples.extend(_buckets(wait.name, {"task": task}, WAIT_BUCKETS, found))
        yield wait
        yield _gauge(
            "offload_queue_depth",
            "Durable runs due and not started, by the queue they wait in.",
            "queue",
            snap.depths,
        )
        yield _gauge(
            "offload_dead_runs",
            "Dead runs kept in the ledger (the dead-letter queue), by task.",
            "task",
            snap.dead,
        )
        yield GaugeMetricFamily(
            "offload_workers",
            "Worker processes that reported to the ledger within the stale bound.",
            value=snap.workers,
        )


def build_metrics_app(ledger: Callable[[], Ledger], stale_after_s: float) -> Callable[..., Any]:
    """An ASGI app answering every request with the exposition (mount it anywhere)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LedgerCollector(ledger, stale_after_s))

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await asyncio.to_thread(generate_latest, registry)
        headers = [(b"content-type", CONTENT_TYPE_LATEST.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app
