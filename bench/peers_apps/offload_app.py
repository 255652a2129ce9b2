"""offload: `offload worker bench.peers_apps.offload_app:jobs`, configured by `OFFLOAD_*` env."""

from __future__ import annotations

from bench.peers_apps.common import notify
from offload import Offload

jobs = Offload()


@jobs.task
def noop(tag: str) -> str:
    return notify(tag)
