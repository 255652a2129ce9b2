"""The ledger: the SQL store of every durable run (SQLite file by default, PostgreSQL)."""

from offload.ledger.database import Ledger as Ledger
