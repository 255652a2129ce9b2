"""`python -m offload.worker SPEC --pool=... --concurrency=... --queues=... --hostname=...`.

How the supervisor starts a consumer as a fresh interpreter (when it cannot fork).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from offload.worker.child import run_celery_worker


def _main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m offload.worker")
    parser.add_argument("spec")
    parser.add_argument("--pool", required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--queues", required=True)
    parser.add_argument("--hostname", required=True)
    parser.add_argument("--loglevel", default="WARNING")
    parser.add_argument("--low-priority", action="store_true")
    args = parser.parse_args(argv)
    run_celery_worker(
        args.spec,
        pool=args.pool,
        concurrency=args.concurrency,
        queues=args.queues.split(","),
        hostname=args.hostname,
        loglevel=args.loglevel,
        low_priority=args.low_priority,
    )


if __name__ == "__main__":
    _main(sys.argv[1:])
