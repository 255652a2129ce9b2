"""Dramatiq on Redis with the Results middleware (results stored in `BENCH_RESULT_URL`).

`dramatiq bench.peers_apps.dramatiq_app --processes 2` (default 8 threads each).
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

from bench.peers_apps.common import notify

BROKER_URL = os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/10")
RESULT_URL = os.environ.get("BENCH_RESULT_URL", "redis://127.0.0.1:6379/11")
# Dramatiq's constructors are not annotated.
broker = RedisBroker(url=BROKER_URL)  # type: ignore[no-untyped-call]
backend = RedisBackend(url=RESULT_URL)  # type: ignore[no-untyped-call]
broker.add_middleware(Results(backend=backend))  # type: ignore[no-untyped-call]
dramatiq.set_broker(broker)


@dramatiq.actor(store_results=True)
def noop(tag: str) -> str:
    return notify(tag)
