"""`BlockingCalls`: offload's own small thread pool for ledger and broker work off the loop."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

IO_THREADS = 8


class BlockingCalls:
    """Runs blocking calls for async callers on up to `IO_THREADS` threads, started on first use.

    Not the event loop's default executor: a burst of `defer()` calls must not queue behind
    the application's own `run_in_executor` work, nor it behind them.
    """

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on a pool thread, in the caller's context variables."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="offload-io")
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        return await loop.run_in_executor(self._pool, call)

    def close(self) -> None:
        """Wait for the running calls and stop the threads (the next `run` starts new ones)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
