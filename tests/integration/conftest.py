"""A real uvicorn server per test, on a free loopback port, stopped by its pid."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import Server

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
