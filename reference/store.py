"""The reference service's own tables (SQLAlchemy Core), on the same URL scheme as offload's
ledger: a SQLite file by default, PostgreSQL by `REFERENCE_DATABASE_URL`.

Calls here are blocking: the API runs them in its threadpool, tasks call them directly.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

from reference.config import Config

metadata = sa.MetaData()

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("email", sa.String(320), nullable=False, unique=True),
    sa.Column("password_hash", sa.String(200), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)
workspaces = sa.Table(
    "workspaces",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("user_id", sa.ForeignKey("users.id"), nullable=False, index=True),
    sa.Column("name", sa.String(200), nullable=False),
)
# What users did, for the analytics and for their reports; amounts in cents.
events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("user_id", sa.ForeignKey("users.id"), nullable=False, index=True),
    sa.Column("kind", sa.String(50), nullable=False),
    sa.Column("amount_cents", sa.Integer, nullable=False, default=0),
    sa.Column("at", sa.Float, nullable=False),
)
# A report is its durable run: the run id is the report id, the row says whose it is.
reports = sa.Table(
    "reports",
    metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.ForeignKey("users.id"), nullable=False, index=True),
    sa.Column("pages", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expired", sa.Boolean, nullable=False, default=False),
)
# An order is paid once its charge is recorded here; its payment run (and the replays of a
# dead one) are in offload's ledger.
orders = sa.Table(
    "orders",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("user_id", sa.ForeignKey("users.id"), nullable=False, index=True),
    sa.Column("amount_cents", sa.Integer, nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("run_id", sa.String(64)),
    sa.Column("charge_id", sa.String(100)),
    sa.Column("paid_at", sa.Float),
    sa.Column("created_at", sa.Float, nullable=False),
)


@functools.cache
def engine(url: str) -> Engine:
    """One engine per URL and process, with the tables created."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        made = sa.create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(made, "connect")
        def _wal(connection: Any, _record: Any) -> None:
            # Workers and the API write at once: WAL lets readers go on beside the writer.
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA foreign_keys=ON")
    else:
        parsed = sa.make_url(url)
        if parsed.drivername in ("postgresql", "postgres"):  # as offload reads its own URLs
            parsed = parsed.set(drivername="postgresql+psycopg")
        made = sa.create_engine(parsed, pool_pre_ping=True)
    try:
        metadata.create_all(made)
    except (sa.exc.OperationalError, sa.exc.ProgrammingError, sa.exc.IntegrityError):
        metadata.create_all(made)  # another process created them between look and create
    return made


def db(config: Config) -> Engine:
    return engine(config.database_url)


def now() -> float:
    return time.time()
