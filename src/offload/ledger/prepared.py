"""Hot-path statements, compiled once, run on the sqlite3 cursor directly on SQLite.

Building a Core statement per call cost ~150 µs; SQLAlchemy's per-execution work on a prepared
statement ~100 µs of ~130 µs. On a worker's hot path (start an attempt, finish it) that was most
of the ledger's cost per run, so on SQLite these statements skip it. PostgreSQL goes through
SQLAlchemy as usual: the network round trip dominates there.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection

from offload.ledger.schema import attempts, runs

_SQLITE = sqlite_dialect.dialect()
_JSON_COLUMNS = frozenset(
    c.name for t in (runs, attempts) for c in t.c if isinstance(c.type, sa.JSON)
)


class Prepared:
    """A hot-path statement, compiled once: through SQLAlchemy on PostgreSQL, and on SQLite
    straight on the sqlite3 cursor of the same connection (so inside the same transaction).

    Rows come back as named tuples; JSON columns are encoded and decoded here, as SQLAlchemy's
    JSON type would. Statements must use plain binds (no `IN` lists: write `one_of`).
    """

    def __init__(self, statement: Any) -> None:
        self.statement = statement
        compiled = statement.compile(dialect=_SQLITE)
        self._sql = compiled.string
        self._names = list(compiled.positiontup or ())
        self._defaults = dict(compiled.params)
        self._row_types: dict[tuple[str, ...], Any] = {}

    def _values(self, params: Mapping[str, Any]) -> tuple[Any, ...]:
        values = {**self._defaults, **params}
        return tuple(
            json.dumps(values[name]) if name in _JSON_COLUMNS else values[name]
            for name in self._names
        )

    def _rows(self, cursor: Any) -> list[Any]:
        if cursor.description is None:
            return []
        names = tuple(d[0] for d in cursor.description)
        row_type = self._row_types.get(names)
        if row_type is None:
            row_type = self._row_types[names] = collections.namedtuple("Row", names)
        decode = [name in _JSON_COLUMNS for name in names]
        # JSON columns hold text (schema.Json); NULL comes back as None.
        return [
            row_type(
                *(
                    json.loads(v) if d and isinstance(v, str) else v
                    for v, d in zip(row, decode, strict=True)
                )
            )
            for row in cursor.fetchall()
        ]

    def all(self, conn: Connection, params: Mapping[str, Any]) -> list[Any]:
        """Execute with one set of parameters; every returned row."""
        if conn.dialect.name != "sqlite":
            result = conn.execute(self.statement, params)
            return list(result) if result.returns_rows else []
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(self._sql, self._values(params))
            return self._rows(cursor)
        finally:
            cursor.close()

    def first(self, conn: Connection, params: Mapping[str, Any]) -> Any:
        """Execute; the first returned row, or None."""
        rows = self.all(conn, params)
        return rows[0] if rows else None

    def many(self, conn: Connection, params: Sequence[Mapping[str, Any]]) -> None:
        """Execute once per set of parameters (an INSERT of many rows)."""
        if conn.dialect.name != "sqlite":
            conn.execute(self.statement, list(params))
            return
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.executemany(self._sql, [self._values(p) for p in params])
        finally:
            cursor.close()


def one_of(column: Any, values: Sequence[str]) -> Any:
    """`column IN (values)` as plain binds, which a `Prepared` statement can hold."""
    return sa.or_(*(column == value for value in values))
