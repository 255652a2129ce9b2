"""Retention deletes only finished runs, and on SQLite each batch reads the finished index and
the primary key: a plan through the state index sorted every finished run per batch, which
held the write lock for 5 ms and more (bench/retention.py).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from offload.core.run import RunFilter
from offload.ledger import retention
from offload.ledger.database import Ledger
from offload.ledger.schema import attempts, runs

NOW = 1_790_000_000.0


def _run(index: int, state: str, finished: bool) -> dict[str, Any]:
    return {
        "id": f"run-{index:03d}",
        "task": "report",
        "lane": "durable",
        "queue": "default",
        "state": state,
        "args": {"n": index},
        "attempts": 1,
        "created_at": NOW - 1000 + index,
        "finished_at": NOW - 900 + index if finished else None,
        "updated_at": NOW,
    }


def test_retention_batches_delete_finished_runs_by_the_finished_index(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/ledger.sqlite", clock=lambda: NOW)
    ledger.ensure_schema()
    finished = [_run(i, ("SUCCESS", "FAILURE", "CANCELLED")[i % 3], True) for i in range(7)]
    waiting = [_run(100 + i, state, False) for i, state in enumerate(["PENDING", "RUNNING"])]

    def fill(conn: sa.Connection) -> None:
        conn.execute(runs.insert(), [*finished, *waiting])
        conn.execute(
            attempts.insert(),
            [{"run_id": row["id"], "number": 1, "started_at": NOW - 950} for row in finished],
        )

    ledger.write(fill)
    statements: list[tuple[str, Any]] = []

    @event.listens_for(ledger.engine, "before_cursor_execute")
    def _seen(_conn: Any, _cursor: Any, sql: str, params: Any, *_: Any) -> None:
        if sql.lstrip().upper().startswith(("SELECT", "DELETE")):
            statements.append((sql, params))

    everything_old = RunFilter(finished_before=datetime.fromtimestamp(NOW, UTC))
    assert retention.purge(ledger, everything_old, batch=3) == 7
    event.remove(ledger.engine, "before_cursor_execute", _seen)

    with ledger.engine.connect() as conn:
        left = {row.id: row.state for row in conn.execute(sa.select(runs.c.id, runs.c.state))}
        assert left == {"run-100": "PENDING", "run-101": "RUNNING"}
        assert conn.execute(sa.select(sa.func.count()).select_from(attempts)).scalar_one() == 0
        plans = [
            " / ".join(row[3] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params))
            for sql, params in statements
        ]
    assert len(plans) == 3 + 3  # a select and a delete per batch: 3 + 3 + 1 runs
    for plan in plans:
        assert "ix_offload_runs_state" not in plan, plan
        assert "TEMP B-TREE" not in plan, plan
