"""One Celery worker (a consumer) for an app's durable lane, in the calling process.

The supervisor forks this or starts it as `python -m offload.worker SPEC --pool=... ...`.
"""

from __future__ import annotations

from collections.abc import Sequence

from offload.core.process import die_with_parent, lower_priority
from offload.worker.loading import load_offload


def run_celery_worker(
    spec: str,
    *,
    pool: str,
    concurrency: int,
    queues: Sequence[str],
    hostname: str,
    loglevel: str = "WARNING",
    low_priority: bool = False,
) -> None:
    """Run one Celery worker for the Offload at `spec` in this process (blocks)."""
    die_with_parent()
    if low_priority:
        lower_priority()
    jobs = load_offload(spec)
    argv = [
        "worker",
        f"--pool={pool}",
        f"--concurrency={concurrency}",
        f"--queues={','.join(queues)}",
        f"--hostname={hostname}",
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
    ]
    if not jobs.settings.task_events:
        argv.append("--without-heartbeat")  # worker-heartbeat events: Flower's "online"
    jobs.celery.worker_main(argv)
