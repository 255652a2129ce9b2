"""The seams between the core and what builds on it: protocols the facade implements.

A `RunHandle` asks a `RunSource`; a `Task` starts its runs through a `Dispatch`. `Offload` is
the one implementation of each in the library (tests and other hosts may bring their own), so
nothing in the core, the lanes or the web glue needs to import it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from offload.core.handle import RunHandle
    from offload.core.run import RunStatus
    from offload.core.task import Call, Task


class RunSource(Protocol):
    """What a `RunHandle` asks about its run: the inline lane's memory, then the ledger."""

    @property
    def tasks(self) -> Mapping[str, Task[Any, Any]]:
        """The declared tasks by name, to type a run's result by its task's return type."""
        ...

    def status_sync(self, run_id: str) -> RunStatus: ...

    async def status(self, run_id: str) -> RunStatus: ...

    def cancel_sync(self, run_id: str) -> RunStatus: ...

    async def cancel(self, run_id: str) -> RunStatus: ...

    def traceback_sync(self, run_id: str) -> str | None: ...

    async def traceback(self, run_id: str) -> str | None: ...


class Dispatch(Protocol):
    """Where a `Task` sends its validated calls: the lane its policy names."""

    @property
    def default_queue(self) -> str:
        """The queue of tasks that name none."""
        ...

    def now(self) -> float:
        """Seconds since the epoch, from the app's clock (an `eta` becomes a delay with it)."""
        ...

    def submit(self, task: Task[Any, Any], calls: Sequence[Call]) -> list[RunHandle[Any]]: ...

    async def submit_async(
        self, task: Task[Any, Any], calls: Sequence[Call]
    ) -> list[RunHandle[Any]]: ...
