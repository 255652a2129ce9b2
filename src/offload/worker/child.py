"""One Celery worker (a consumer) for an app's durable lane, in the calling process.

The supervisor forks this or starts it as `python -m offload.worker SPEC --pool=... ...`.
"""

from __future__ import annotations

import functools
import logging
import warnings
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
    quiet = logging.getLevelName(loglevel.upper()) not in (logging.DEBUG, logging.INFO)
    if quiet:
        _quiet_celery()
    argv = [
        *(["--quiet"] if quiet else []),  # no banner: `offload serve` says what runs where
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


def _quiet_celery() -> None:
    """Leave out what Celery prints for every consumer that a user of offload cannot act on.

    - "worker: Warm shutdown (MainProcess)" on each stop: the supervisor says once that the
      workers stopped.
    - The root `SecurityWarning`: its reason is pickle, which runs code from any message;
      offload accepts JSON only, and `offload serve`/`worker` say once that they run as root.
    """
    from celery.apps import worker
    from celery.exceptions import SecurityWarning

    warnings.filterwarnings("ignore", category=SecurityWarning)
    if hasattr(worker, "install_worker_term_handler"):
        worker.install_worker_term_handler = functools.partial(
            worker.install_worker_term_handler, verbose=False
        )
