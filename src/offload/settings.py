"""Settings: arguments, then `OFFLOAD_*` environment variables, then defaults.

Built once, validated when built, passed down; nothing else reads the environment.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from offload.errors import ConfigurationError

ENV_PREFIX = "OFFLOAD_"

_URL_EXAMPLES = {
    "broker_url": "redis://localhost:6379/0",
    "ledger_url": "postgresql://user@localhost/offload",
}


class Settings(BaseModel):
    """Everything offload can be told. Each field is also `OFFLOAD_<FIELD>` in the environment.

    | field | default | meaning |
    |---|---|---|
    | `broker_url` | the ledger's file if SQLite, else `<data_dir>/broker.sqlite` | the queue |
    | `broker_options` | `{}` | kombu transport options, JSON in the environment |
    | `ledger_url` | `sqlite:///<data_dir>/ledger.sqlite` | the store of every run |
    | `data_dir` | `./offload-data` | directory for the embedded SQLite files and locks |
    | `default_queue` | `default` | queue of tasks that do not name one |
    | `publish_timeout_s` | 5 | `defer()` raises `BrokerUnavailableError` after this long |
    | `heartbeat_interval_s` | 5 | how often a worker marks its running runs alive in the ledger |
    | `stale_after_s` | 20 | a running run not marked alive for this long counts as lost |
    | `max_lost_attempts` | 3 | attempts lost to dying workers before a run is declared dead |
    | `progress_interval_s` | 0.5 | `ctx.progress()` writes at most this often |
    | `cancel_grace_s` | 10 | a running task that ignores `cancel()` this long is stopped |
    | `ledger_outage_s` | 300 | a worker waits this long for an unreachable ledger |
    | `ledger_busy_timeout_s` | 30 | a SQLite ledger writer waits this long for the write lock |
    | `orphan_after_s` | 300 | a due run with no delivery for this long is published again |
    | `visibility_timeout_s` | 30 | broker lease / visibility window (extended while held) |
    | `retention_s` | 604800 (7 days) | workers delete finished runs this old (0: keep forever) |
    | `dead_retention_s` | 2592000 (30 days) | ... and dead runs this old (0: keep forever) |
    | `retention_interval_s` | 60 | how often a worker looks for runs to delete |
    | `scheduler_lease_s` | 10 | a scheduler that stops renewing its lease loses it this late |
    | `worker_processes` | 2 | consumer processes for I/O tasks (threads inside each) |
    | `worker_threads` | 4 | threads per I/O consumer process |
    | `worker_cpu_processes` | number of cores | prefork processes for `cpu_bound` tasks |
    | `task_events` | false | workers send Celery task events (Flower, celery-exporter) |
    | `inline_max_concurrency` | 100 | inline runs running at once in the API process |
    | `inline_max_backlog` | 1000 | inline runs waiting for a slot; then `defer()` spills or fails |
    | `inline_threads` | 8 | threads for sync inline tasks (not the endpoints' pool) |
    | `inline_cpu_processes` | number of cores | low-priority processes, `cpu_bound` inline |
    | `inline_history` | 1000 | finished inline runs kept in memory for the status API |
    | `inline_drain_s` | 10 | on shutdown, how long running inline runs may finish |
    | `loop_block_threshold_s` | 0.1 | the event-loop guard warns when the loop is blocked longer |
    | `dashboard_username` | `admin` | the dashboard's HTTP Basic user name |
    | `dashboard_password` | none | the dashboard's HTTP Basic password |
    | `dashboard_token` | none | a bearer token the dashboard accepts |
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    broker_url: str | None = None
    broker_options: dict[str, Any] = Field(default_factory=dict)
    ledger_url: str | None = None
    data_dir: Path = Path("offload-data")
    default_queue: str = Field(default="default", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    publish_timeout_s: float = Field(default=5.0, gt=0)
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    stale_after_s: float = Field(default=20.0, gt=0)
    max_lost_attempts: int = Field(default=3, ge=1)
    progress_interval_s: float = Field(default=0.5, ge=0)
    cancel_grace_s: float = Field(default=10.0, ge=0)
    ledger_outage_s: float = Field(default=300.0, ge=0)
    ledger_busy_timeout_s: float = Field(default=30.0, gt=0)
    orphan_after_s: float = Field(default=300.0, gt=0)
    visibility_timeout_s: float = Field(default=30.0, gt=0)
    retention_s: float = Field(default=7 * 86400.0, ge=0)
    dead_retention_s: float = Field(default=30 * 86400.0, ge=0)
    retention_interval_s: float = Field(default=60.0, gt=0)
    scheduler_lease_s: float = Field(default=10.0, ge=2)
    worker_processes: int = Field(default=2, ge=1)
    worker_threads: int = Field(default=4, ge=1)
    worker_cpu_processes: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    task_events: bool = False
    inline_max_concurrency: int = Field(default=100, ge=1)
    inline_max_backlog: int = Field(default=1000, ge=0)
    inline_threads: int = Field(default=8, ge=1)
    inline_cpu_processes: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    inline_history: int = Field(default=1000, ge=0)
    inline_drain_s: float = Field(default=10.0, ge=0)
    loop_block_threshold_s: float = Field(default=0.1, gt=0)
    dashboard_username: str = Field(default="admin", min_length=1, pattern=r"^[^:]+$")
    dashboard_password: SecretStr | None = None
    dashboard_token: SecretStr | None = None

    @field_validator("broker_url", "ledger_url")
    @classmethod
    def _is_url(cls, value: str | None, info: Any) -> str | None:
        if value is not None and "://" not in value:
            example = _URL_EXAMPLES[info.field_name]
            raise ValueError(f"{value!r} is not a URL (missing '://'); example: {example}")
        return value

    @field_validator("dashboard_password", "dashboard_token")
    @classmethod
    def _is_secret(cls, value: SecretStr | None, info: Any) -> SecretStr | None:
        shortest = 16 if info.field_name == "dashboard_token" else 8
        if value is not None and len(value.get_secret_value()) < shortest:
            raise ValueError(
                f"must be at least {shortest} characters; make one with "
                "python -c 'import secrets; print(secrets.token_urlsafe())'"
            )
        return value

    @classmethod
    def build(cls, env: Mapping[str, str] | None = None, **arguments: Any) -> Settings:
        """Build settings from `arguments`, then `env` (default `os.environ`), then defaults.

        Raises `ConfigurationError` naming the setting when a value is invalid.
        """
        environ = os.environ if env is None else env
        unknown = set(arguments) - set(cls.model_fields)
        if unknown:
            raise ConfigurationError(
                f"Unknown setting(s) {sorted(unknown)}; known: {sorted(cls.model_fields)}"
            )
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            if arguments.get(name) is not None:
                values[name] = arguments[name]
            elif (ENV_PREFIX + name.upper()) in environ:
                values[name] = environ[ENV_PREFIX + name.upper()]
                if name in _JSON_FIELDS:
                    values[name] = _parse_json(ENV_PREFIX + name.upper(), values[name])
        try:
            settings = cls(**values)
        except ValidationError as exc:
            error = exc.errors()[0]
            name = str(error["loc"][0])
            source = "argument" if name in arguments else "environment variable"
            key = name if name in arguments else ENV_PREFIX + name.upper()
            shown = values.get(name)
            if name.endswith("_url"):
                shown = mask_url(str(shown))
            elif name in _SECRET_FIELDS:
                shown = "***"
            message = str(error["msg"]).removeprefix("Value error, ")
            raise ConfigurationError(f"{source} {key}={shown!r} is invalid: {message}") from None
        if settings.task_events and settings.broker_scheme == "sqlite":
            raise ConfigurationError(
                "task_events needs a broker that broadcasts (Redis or RabbitMQ): Celery sends "
                "its events to every listener, which the embedded SQLite broker cannot"
            )
        return settings

    @property
    def resolved_broker_url(self) -> str:
        """The broker URL, defaulting to the embedded SQLite broker: in the ledger's own file
        when that is a SQLite file (a defer is then one commit), else in `data_dir`."""
        if self.broker_url:
            return self.broker_url
        ledger = self.resolved_ledger_url
        if ledger.startswith("sqlite:///") and "?" not in ledger and ledger != "sqlite:///:memory:":
            return ledger
        return f"sqlite:///{(self.data_dir / 'broker.sqlite').resolve()}"

    @property
    def resolved_ledger_url(self) -> str:
        """The ledger URL, defaulting to a SQLite file in `data_dir`."""
        return self.ledger_url or f"sqlite:///{(self.data_dir / 'ledger.sqlite').resolve()}"

    @property
    def broker_scheme(self) -> str:
        """`sqlite`, `redis`, `rediss` or `amqp`-like scheme of the broker URL."""
        return self.resolved_broker_url.split("://", 1)[0].lower()

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            if name is not None and name.endswith("_url") and isinstance(value, str):
                yield name, mask_url(value)
            else:
                yield name, value

    def as_env(self) -> dict[str, str]:
        """The settings as `OFFLOAD_*` variables, to hand to a worker subprocess."""
        env: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name in _JSON_FIELDS:
                env[ENV_PREFIX + name.upper()] = json.dumps(value)
            elif isinstance(value, SecretStr):
                env[ENV_PREFIX + name.upper()] = value.get_secret_value()
            elif value is not None:
                env[ENV_PREFIX + name.upper()] = str(value)
        return env


_JSON_FIELDS = frozenset({"broker_options"})
_SECRET_FIELDS = frozenset({"dashboard_password", "dashboard_token"})


def _parse_json(key: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigurationError(
            f"environment variable {key}={text!r} is not JSON ({exc}); "
            'example: {"global_keyprefix": "myapp:"}'
        ) from None


def mask_url(url: str) -> str:
    """`redis://user:secret@host/0` -> `redis://user:***@host/0`; secrets never reach a log."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
