"""Huey: `huey_consumer bench.peers_apps.huey_app.huey -w 2 -k process`.

`BENCH_HUEY=sqlite` (SqliteHuey in `BENCH_HUEY_FILE`) or `redis` (RedisHuey on `BENCH_BROKER_URL`,
`notify_result=True` so `result.get(blocking=True)` waits on BLPOP instead of polling).
"""

from __future__ import annotations

import os

from huey import RedisHuey, SqliteHuey  # type: ignore[import-untyped]

from bench.peers_apps.common import notify

if os.environ.get("BENCH_HUEY", "sqlite") == "redis":
    huey = RedisHuey(
        "bench",
        url=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/10"),
        notify_result=True,
    )
else:
    huey = SqliteHuey("bench", filename=os.environ.get("BENCH_HUEY_FILE", "huey.sqlite"))


@huey.task()  # type: ignore[untyped-decorator]
def noop(tag: str) -> str:
    return notify(tag)
