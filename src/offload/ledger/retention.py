"""Deleting finished runs: by hand (`offload runs purge`) and by the workers' retention.

Deletes go in small batches, one transaction each, so that a SQLite ledger's write lock is
never held for long: deferring and finishing runs go on between two batches.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from offload.core.run import RunFilter
from offload.ledger import queries
from offload.ledger.database import Ledger
from offload.settings import Settings

PURGE_BATCH = 200
"""Runs one transaction deletes (with their attempts)."""


def purge(
    ledger: Ledger,
    where: RunFilter,
    *,
    batch: int = PURGE_BATCH,
    pause_s: float = 0.0,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Delete every finished run `where` takes, `batch` at a time; how many were deleted.

    `pause_s` between batches lets other writers in first.
    """
    total = 0
    while True:
        deleted = ledger.write(lambda conn: queries.delete_finished(conn, where, batch))
        total += deleted
        if on_progress is not None and deleted:
            on_progress(total)
        if deleted < batch:
            return total
        if pause_s:
            time.sleep(pause_s)


def expired(settings: Settings, now: float) -> list[RunFilter]:
    """What retention deletes at `now`: finished runs past `retention_s`, dead runs past
    `dead_retention_s` (a zero keeps them forever)."""
    filters = []
    if settings.retention_s:
        cutoff = datetime.fromtimestamp(now - settings.retention_s, UTC)
        filters.append(RunFilter(dead=False, finished_before=cutoff))
    if settings.dead_retention_s:
        cutoff = datetime.fromtimestamp(now - settings.dead_retention_s, UTC)
        filters.append(RunFilter(dead=True, finished_before=cutoff))
    return filters
