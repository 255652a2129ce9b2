"""The reference service's settings, from `REFERENCE_*` environment variables.

The API process and the workers read the same variables (workers inherit them from
`offload serve`), so both know where the database, the report files and the outside world are.
By default everything is local: a SQLite file beside offload's own, and the development
stand-ins of `reference/sinks.py` on fixed loopback ports, started by the API.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
from dataclasses import dataclass
from pathlib import Path


def _data_dir() -> Path:
    return Path(os.environ.get("OFFLOAD_DATA_DIR", "offload-data"))


@dataclass(frozen=True)
class Config:
    database_url: str
    reports_dir: Path
    smtp_host: str
    smtp_port: int
    webhook_url: str
    payment_url: str
    start_sinks: bool
    sinks_port: int
    payment_failure_rate: float
    payment_latency_s: float
    report_ttl_s: float
    max_body_bytes: int

    @classmethod
    def from_env(cls) -> Config:
        env = os.environ.get
        data = _data_dir()
        sinks_port = int(env("REFERENCE_SINKS_PORT", "8026"))
        outside = f"http://127.0.0.1:{sinks_port}"
        return cls(
            database_url=env("REFERENCE_DATABASE_URL", f"sqlite:///{data}/reference.sqlite"),
            reports_dir=Path(env("REFERENCE_REPORTS_DIR", str(data / "reports"))),
            smtp_host=env("REFERENCE_SMTP_HOST", "127.0.0.1"),
            smtp_port=int(env("REFERENCE_SMTP_PORT", "8025")),
            webhook_url=env("REFERENCE_WEBHOOK_URL", f"{outside}/hooks/slack"),
            payment_url=env("REFERENCE_PAYMENT_URL", outside),
            start_sinks=env("REFERENCE_START_SINKS", "1") == "1",
            sinks_port=sinks_port,
            payment_failure_rate=float(env("REFERENCE_PAYMENT_FAILURE_RATE", "0.2")),
            payment_latency_s=float(env("REFERENCE_PAYMENT_LATENCY_S", "0.2")),
            report_ttl_s=float(env("REFERENCE_REPORT_TTL_S", str(24 * 3600))),
            max_body_bytes=int(env("REFERENCE_MAX_BODY_BYTES", str(64 * 1024))),
        )


@functools.cache
def jwt_secret() -> bytes:
    """`REFERENCE_JWT_SECRET`, or one made once per data directory and kept there, so that
    tokens outlive a restart and no default secret ships in the code."""
    given = os.environ.get("REFERENCE_JWT_SECRET")
    if given:
        return given.encode()
    path = _data_dir() / "reference-jwt-secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f"{path.name}.{os.getpid()}")
        draft.write_text(secrets.token_urlsafe(48), encoding="ascii")
        # A link never replaces: of processes starting together, the first one's secret wins,
        # and nobody reads a file half-written.
        with contextlib.suppress(FileExistsError):
            os.link(draft, path)
        draft.unlink()
    return path.read_bytes().strip()
