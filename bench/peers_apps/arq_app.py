"""arq: `arq bench.peers_apps.arq_app.WorkerSettings`, twice (one process per core).

Tuned: the worker polls its queue every 10 ms (`poll_delay`, default 0.5 s).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from arq.connections import RedisSettings

from bench.peers_apps.common import notify

REDIS = RedisSettings.from_dsn(os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/10"))
POLL_DELAY_S = 0.01


async def noop(ctx: dict[str, Any], tag: str) -> str:
    return notify(tag)


class WorkerSettings:
    functions: ClassVar[list[Any]] = [noop]
    redis_settings = REDIS
    poll_delay = POLL_DELAY_S
