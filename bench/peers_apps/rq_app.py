"""RQ: 2 x `rq worker --worker-class rq.worker.SimpleWorker`; the job is this module's `noop`."""

from __future__ import annotations

from bench.peers_apps.common import notify


def noop(tag: str) -> str:
    return notify(tag)
