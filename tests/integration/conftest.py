"""A real uvicorn server per test, on a free loopback port, stopped by its pid."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.support import ROOT, free_port, kill_and_reap, wait_until


@dataclass
class Server:
    """`uvicorn APP` as a subprocess; `url` is its base URL."""

    app: str
    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    _children: list[psutil.Process] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    def start(self) -> Server:
        self.port = free_port()
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OFFLOAD_DATA_DIR": str(self.data_dir),
            **self.env,
        }
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                self.app,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._log = log
        wait_until(self._ready, 30, f"uvicorn {self.app} to answer on {self.url}")
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"uvicorn exited with {self.process.returncode}:\n{self.log()}")
        try:
            httpx.get(f"{self.url}/", timeout=1)  # any answer: uvicorn listens after start-up
        except httpx.TransportError:
            return False
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def descendants(self) -> list[psutil.Process]:
        assert self.process is not None
        with contextlib.suppress(psutil.NoSuchProcess):
            return psutil.Process(self.process.pid).children(recursive=True)
        return []

    def terminate(self) -> None:
        """Send SIGTERM (a graceful shutdown), remembering the children to reap later."""
        assert self.process is not None
        self._children = self.descendants()
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, wait, then SIGKILL the server and whatever it started, each by pid."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout)
        kill_and_reap(self.process, [*self._children, *self.descendants()])
        self._log.close()


ServerFactory = Callable[..., Server]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start `tests.apps.inline_app:app` (or another app) with extra `OFFLOAD_*` settings."""
    started: list[Server] = []

    def start(app: str = "tests.apps.inline_app:app", **env: Any) -> Server:
        data_dir = tmp_path / f"server{len(started)}"
        data_dir.mkdir()
        server = Server(app, data_dir, {k: str(v) for k, v in env.items()})
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
