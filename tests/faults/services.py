"""Private instances of Redis, RabbitMQ and PostgreSQL that a fault test may stop and start.

They use the machine's own binaries (the commands the machine uses) on ports of their own,
with their data in the test's temporary directory, so stopping one disturbs nothing else.
Each is stopped by the test that started it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import free_port, reachable


def _wait_port(port: int, up: bool, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while reachable("127.0.0.1", port) != up:
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not {'start' if up else 'stop'} within {timeout}s")
        time.sleep(0.1)


def _need(binary: str) -> str:
    path = shutil.which(binary) or (binary if os.path.exists(binary) else None)
    if path is None:
        message = f"{binary} is not installed (scripts/services installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


class PrivateRedis:
    """redis-server on its own port; `appendonly` decides whether queued messages survive."""

    def __init__(self, directory: Path, appendonly: bool = True) -> None:
        self.binary = _need("redis-server")
        self.port = free_port()
        self.directory = directory
        self.appendonly = appendonly
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.appendonly else "no",
                "--appendfsync",
                "always",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_port(self.port, True, 20, "Redis")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)
        _wait_port(self.port, False, 20, "Redis")

    def remove(self) -> None:
        """Its files live in the test's tmp_path, which pytest removes."""


def _service_directory(owner: str) -> Path:
    """A directory the service's own user can reach (pytest's tmp dirs are private to root)."""
    directory = Path(tempfile.mkdtemp(prefix=f"offload-{owner}-"))
    directory.chmod(0o755)
    shutil.chown(directory, owner)
    return directory


class PrivateRabbitMQ:
    """A RabbitMQ node of its own (`rabbitmq-server -detached` with its own name and ports)."""

    def __init__(self) -> None:
        self.binary = _need("rabbitmq-server")
        self.port = free_port()
        self.node = f"offload-{self.port}@localhost"
        self.directory = directory = _service_directory("rabbitmq")  # the server's user
        (directory / "plugins").write_text("[].\n")
        shutil.chown(directory / "plugins", "rabbitmq")
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(directory / "log"),
            "RABBITMQ_PID_FILE": str(directory / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "plugins"),
            "RABBITMQ_CONFIG_FILE": str(directory / "no-config"),
        }

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self) -> None:
        subprocess.run([self.binary, "-detached"], env=self.env, check=True, timeout=60)
        _wait_port(self.port, True, 90, "RabbitMQ")

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(
                ["rabbitmqctl", "-q", "-n", self.node, "stop"],
                env=self.env,
                check=True,
                capture_output=True,
                timeout=60,
            )
        _wait_port(self.port, False, 30, "RabbitMQ")

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class PrivatePostgres:
    """A PostgreSQL cluster of its own (initdb + pg_ctl, as the postgres user)."""

    def __init__(self) -> None:
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        if not versions:
            _need("/usr/lib/postgresql/*/bin/pg_ctl")
        self.bin = versions[-1].parent
        self.port = free_port()
        self.directory = directory = _service_directory("postgres")
        self._as_postgres(
            self.bin / "initdb", "-D", str(directory / "data"), "-A", "trust", "-U", "postgres"
        )

    def _as_postgres(self, *command: str | Path) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *map(str, command)],
            check=True,
            capture_output=True,
            timeout=60,
        )

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1"
        self._as_postgres(
            self.bin / "pg_ctl",
            "-D",
            self.directory / "data",
            "-o",
            options,
            "-l",
            self.directory / "log",
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._as_postgres(
            self.bin / "pg_ctl", "-D", self.directory / "data", "-m", "fast", "-w", "stop"
        )

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def running(service: PrivateRedis | PrivateRabbitMQ | PrivatePostgres) -> Iterator[None]:
    """Start the service; whatever happens in the test, stop and remove it at the end."""
    try:
        service.start()
        yield
    finally:
        with contextlib.suppress(Exception):  # it may be stopped already, or never started
            service.stop()
        service.remove()
