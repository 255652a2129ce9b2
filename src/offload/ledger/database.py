"""The ledger database: engine set-up, schema creation and versioning, transactions.

SQLite: WAL, `synchronous=NORMAL`, a long busy timeout, and `BEGIN IMMEDIATE` for writers so
two writers never deadlock upgrading a read lock; the writers of one process take turns, and
a worker's writes that queue up commit together. PostgreSQL: row locks (`FOR UPDATE`).
Engines are disposed in forked children: a prefork worker never shares its parent's socket.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from offload.core.run import Attempt, RunStatus
from offload.errors import ConfigurationError, LedgerError
from offload.ledger import migrations, queries
from offload.ledger.schema import SCHEMA_VERSION, meta, metadata
from offload.settings import mask_url

T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_S = 30.0
"""How long a SQLite writer waits for another's write lock before `LedgerError`."""


def _engine_url(url: str) -> sa.URL:
    parsed = sa.make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise ConfigurationError(
                "OFFLOAD_LEDGER_URL is PostgreSQL but psycopg is not installed; "
                "run: pip install 'offload[postgres]'"
            ) from None
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _when_free(dbapi_connection: Any, statement: str, timeout_s: float) -> None:
    """`statement` (a `BEGIN ...`, or a pragma that takes the lock), retried with short sleeps
    while another process holds the write lock.

    Straight on the driver's connection: going through SQLAlchemy, and its wrapping of every
    "database is locked", cost more than the statement.
    """
    began = time.monotonic()
    pause = 20e-6
    while True:
        try:
            dbapi_connection.execute(statement)
            return
        except sqlite3.OperationalError as exc:
            waited = time.monotonic() - began
            if "locked" not in str(exc) or waited > timeout_s:
                raise
        time.sleep(pause)
        # Writes hold the lock for well under a millisecond, but a holder that loses its CPU
        # holds it for a scheduler slice: short tries at first, so a waiter does not sleep
        # long past the release; then long ones, so a lock held for seconds costs no CPU.
        pause = min(pause * 2, SHORT_PAUSE_S if waited < SHORT_WAIT_S else LONG_PAUSE_S)


SHORT_PAUSE_S = 200e-6
SHORT_WAIT_S = 0.05
LONG_PAUSE_S = 0.005


class _Write:
    """One caller's write waiting for its turn: `fn`, then its result or its error."""

    __slots__ = ("done", "error", "fn", "result")

    def __init__(self, fn: Callable[[Connection], Any]) -> None:
        self.fn = fn
        self.done = False
        self.result: Any = None
        self.error: Exception | None = None


class _WriteTurns:
    """A process's SQLite writers: whose turn it is, and the grouped writes waiting for one."""

    def __init__(self) -> None:
        self.turn = threading.Lock()
        self.guard = threading.Lock()
        self.pending: list[_Write] = []


class Ledger:
    """The SQL store of every durable run. Thread-safe; one per process is enough."""

    def __init__(
        self,
        url: str,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = SQLITE_BUSY_TIMEOUT_S,
    ) -> None:
        self.url = url
        self.clock = clock
        self.busy_timeout_s = busy_timeout_s
        self._engine: Engine | None = None
        self._engine_pid = 0
        self._sqlite_writers = _WriteTurns()
        self._schema_ready = False

    def __repr__(self) -> str:
        return f"Ledger({mask_url(self.url)!r})"

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")

    @property
    def engine(self) -> Engine:
        """The engine for this process, created on first use (and again after a fork)."""
        if self._engine is None or self._engine_pid != os.getpid():
            if self._engine is not None:
                # A forked child must not touch the parent's connections.
                self._engine.dispose(close=False)
            self._engine = self._create_engine()
            self._engine_pid = os.getpid()
            self._sqlite_writers = _WriteTurns()
        return self._engine

    def _create_engine(self) -> Engine:
        url = _engine_url(self.url)
        if url.get_backend_name() != "sqlite":
            return sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        # SQLite's own busy handler sleeps 1, 2, 5, 10 ms... between tries: with the API and
        # several workers writing short transactions, that turned every collision into a
        # millisecond stall. Writers take the lock at BEGIN IMMEDIATE and retry it here with
        # sleeps from 20 µs, until busy_timeout_s.
        engine = sa.create_engine(url, connect_args={"timeout": 0})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy's BEGIN below decide transactions, not pysqlite's guesses.
            dbapi_connection.isolation_level = None
            # Switching to WAL takes the lock too: processes opening a new ledger together
            # (API and workers at first start) would see "database is locked" at once.
            _when_free(dbapi_connection, "PRAGMA journal_mode=WAL", self.busy_timeout_s)
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
            _when_free(conn.connection.driver_connection, f"BEGIN {mode}", self.busy_timeout_s)

        return engine

    def ensure_schema(self) -> None:
        """Create the tables, or migrate them, once per process. Safe to race."""
        if self._schema_ready:
            return
        with self._transaction(write=True) as conn:
            if conn.dialect.name == "postgresql":
                # Serialise concurrent creators (API and worker starting together).
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7470501)"))
            inspector = sa.inspect(conn)
            if not inspector.has_table(meta.name):
                metadata.create_all(conn)
                conn.execute(meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
            else:
                found = int(
                    conn.execute(
                        sa.select(meta.c.value).where(meta.c.key == "schema_version")
                    ).scalar_one()
                )
                if found > SCHEMA_VERSION:
                    raise LedgerError(
                        f"The ledger at {mask_url(self.url)} has schema version {found}, newer "
                        f"than this offload ({SCHEMA_VERSION}); upgrade offload"
                    )
                if found < SCHEMA_VERSION:
                    migrations.upgrade(conn, found, SCHEMA_VERSION)
                    conn.execute(
                        meta.update()
                        .where(meta.c.key == "schema_version")
                        .values(value=str(SCHEMA_VERSION))
                    )
        self._schema_ready = True

    def require_existing(self) -> None:
        """Raise `LedgerError`, naming the URL, unless the ledger's tables exist. Creates nothing
        (not even a SQLite file): read-only commands must not leave an empty ledger behind."""
        url = _engine_url(self.url)
        missing = (
            f"No ledger at {mask_url(self.url)}: nothing has run with these settings; run the "
            "command where the app runs (same OFFLOAD_DATA_DIR), or pass --ledger-url"
        )
        is_file = url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")
        if is_file and not Path(str(url.database)).is_file():
            raise LedgerError(missing)
        with self._transaction(write=False) as conn:
            if not sa.inspect(conn).has_table(meta.name):
                raise LedgerError(missing)

    @contextlib.contextmanager
    def _transaction(self, *, write: bool, holding_turn: bool = False) -> Iterator[Connection]:
        engine = self.engine
        # SQLite has one writer at a time: this process's writers take turns on a lock that
        # hands over at once, and only one of them polls the file lock against other processes.
        # Several threads polling it cost a worker more CPU than its ledger writes did.
        take_turn = write and self.is_sqlite and not holding_turn
        turn = self._sqlite_writers.turn if take_turn else contextlib.nullcontext()
        try:
            with turn:
                conn = engine.connect()
                if not write:
                    conn = conn.execution_options(sqlite_begin="DEFERRED")
                with conn, conn.begin():
                    yield conn
        except (SQLAlchemyError, sqlite3.Error) as exc:
            # The driver's own words, without SQLAlchemy's statement dump and help link.
            cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
            detail = f"{type(cause).__name__}: {str(cause).strip()}"
            if "disk is full" in detail:
                detail += "; free space on the disk that holds it"
            raise LedgerError(f"ledger {mask_url(self.url)}: {detail}") from exc

    def write(self, fn: Callable[[Connection], T]) -> T:
        """Run `fn` in one write transaction; driver errors become `LedgerError`."""
        self.ensure_schema()
        with self._transaction(write=True) as conn:
            return fn(conn)

    def write_grouped(self, fn: Callable[[Connection], T]) -> T:
        """`write()`, but on SQLite it may share one transaction with other threads' writes.

        The writes that queue up while another commits go in together: one lock, one
        commit. If one of them fails, each runs again alone, so only its caller sees the
        error. For writes no interrupt can land in (a task's own thread may get a timeout
        mid-write: use `write()` there), and whose `fn` only touches the database.
        """
        if not self.is_sqlite:
            return self.write(fn)
        self.ensure_schema()
        writers = self._sqlite_writers
        mine = _Write(fn)
        with writers.guard:
            writers.pending.append(mine)
        with writers.turn:
            if not mine.done:
                with writers.guard:
                    batch, writers.pending = writers.pending, []
                try:
                    self._commit_group(batch)
                finally:
                    # Interrupted (KeyboardInterrupt): the others' writes wait for the next turn.
                    with writers.guard:
                        writers.pending[:0] = [w for w in batch if not w.done and w is not mine]
        if mine.error is not None:
            raise mine.error
        return mine.result  # type: ignore[no-any-return]

    def _commit_group(self, batch: list[_Write]) -> None:
        if len(batch) > 1:
            with contextlib.suppress(Exception):
                with self._transaction(write=True, holding_turn=True) as conn:
                    results = [w.fn(conn) for w in batch]
                for write, result in zip(batch, results, strict=True):
                    write.result, write.done = result, True
                return
        for write in batch:
            try:
                with self._transaction(write=True, holding_turn=True) as conn:
                    write.result = write.fn(conn)
            except Exception as exc:  # noqa: BLE001 - raised again in the writer's own thread
                write.error = exc
            write.done = True

    def read(self, fn: Callable[[Connection], T]) -> T:
        """Run `fn` in one read transaction (never blocks writers on SQLite WAL)."""
        self.ensure_schema()
        with self._transaction(write=False) as conn:
            return fn(conn)

    def dispose(self) -> None:
        """Close every pooled connection."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    # --- the reads a RunHandle needs ---------------------------------------------------------

    def status(self, run_id: str) -> RunStatus:
        """The status of one run; `RunNotFoundError` if it does not exist."""
        return self.read(lambda conn: queries.get_status(conn, run_id))

    def attempts(self, run_id: str) -> list[Attempt]:
        """Every attempt of a run, oldest first."""
        return self.read(lambda conn: queries.get_attempts(conn, run_id))

    def last_attempt(self, run_id: str) -> Attempt | None:
        """The latest attempt of a run, or None before the first one."""
        found = self.attempts(run_id)
        return found[-1] if found else None
