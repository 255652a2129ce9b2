"""Group commit: concurrent `defer()`s of one event loop share one ledger transaction and one
broker batch.

No timer: a defer that finds nothing in flight goes at once, as it would alone. Defers that
arrive while a group is being written wait for that write to end and then go together as the
next group, so a caller waits at most one group's write longer than alone, and the busier the
API, the fewer commits per run. Every caller still gets its run ids only once its rows are
committed and its messages published, and an error reaches only the callers it concerns
(`DurableLane.submit_group`).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from offload.core.task import Call, Task
    from offload.lanes.durable.lane import DurableLane

Submitting = tuple["Task[Any, Any]", Sequence["Call"], "asyncio.Future[list[str]]"]
RunBlocking = Callable[..., Awaitable[Any]]


@dataclass
class _LoopGroup:
    waiting: list[Submitting] = field(default_factory=list)
    writer: asyncio.Task[None] | None = None  # the task writing groups, while there is one


class GroupCommit:
    """Submits a loop's concurrent defers in groups through `lane.submit_group`, each group
    on a thread of `run_blocking` (the ledger and the broker block)."""

    def __init__(self, lane: Callable[[], DurableLane], run_blocking: RunBlocking) -> None:
        self._lane = lane
        self._run_blocking = run_blocking
        self._groups: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopGroup] = (
            weakref.WeakKeyDictionary()
        )

    async def submit(self, task: Task[Any, Any], calls: Sequence[Call]) -> list[str]:
        loop = asyncio.get_running_loop()
        group = self._groups.get(loop)
        if group is None:
            group = self._groups[loop] = _LoopGroup()
        done: asyncio.Future[list[str]] = loop.create_future()
        group.waiting.append((task, calls, done))
        if group.writer is None:
            group.writer = loop.create_task(self._write(group), name="offload-group-commit")
        return await done

    async def _write(self, group: _LoopGroup) -> None:
        taken: list[Submitting] = []
        try:
            while group.waiting:
                taken, group.waiting = group.waiting, []
                outcomes = await self._run_blocking(
                    self._lane().submit_group, [(task, calls) for task, calls, _ in taken]
                )
                for (*_, done), outcome in zip(taken, outcomes, strict=True):
                    if done.done():
                        continue  # its caller gave up (a client that went away); it ran
                    if isinstance(outcome, Exception):
                        done.set_exception(outcome)
                    else:
                        done.set_result(outcome)
        except BaseException as exc:  # the thread pool is gone, or the loop is closing
            for *_, done in (*taken, *group.waiting):
                if done.done():
                    continue
                if isinstance(exc, Exception):
                    done.set_exception(exc)
                else:
                    done.cancel()
            group.waiting = []
            if not isinstance(exc, Exception):
                raise
        finally:
            group.writer = None
