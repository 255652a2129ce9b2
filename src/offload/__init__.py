"""offload: background work for FastAPI, in two lanes behind one API.

```python
from offload import Offload, TaskContext

jobs = Offload()

@jobs.task(retries=3)
def send_welcome(ctx: TaskContext, user_id: int) -> None: ...

run = await send_welcome.defer(user_id=7)
```
"""

from offload.app import Offload as Offload
from offload.core.context import TaskContext as TaskContext
from offload.core.credentials import BasicAuth as BasicAuth
from offload.core.credentials import BearerAuth as BearerAuth
from offload.core.handle import RunHandle as RunHandle
from offload.core.overview import QueueStatus as QueueStatus
from offload.core.run import TERMINAL_STATES as TERMINAL_STATES
from offload.core.run import Attempt as Attempt
from offload.core.run import Lane as Lane
from offload.core.run import Progress as Progress
from offload.core.run import RunDetail as RunDetail
from offload.core.run import RunFilter as RunFilter
from offload.core.run import RunPage as RunPage
from offload.core.run import RunState as RunState
from offload.core.run import RunStatus as RunStatus
from offload.core.run import WorkerStatus as WorkerStatus
from offload.core.schedule import Schedule as Schedule
from offload.core.schedule import SchedulerLease as SchedulerLease
from offload.core.schedule import ScheduleStatus as ScheduleStatus
from offload.core.task import Backoff as Backoff
from offload.core.task import Task as Task
from offload.core.task import Timeout as Timeout
from offload.errors import BrokerUnavailableError as BrokerUnavailableError
from offload.errors import ConfigurationError as ConfigurationError
from offload.errors import IdempotencyConflictError as IdempotencyConflictError
from offload.errors import LaneFullError as LaneFullError
from offload.errors import LedgerError as LedgerError
from offload.errors import OffloadError as OffloadError
from offload.errors import QueueNotFoundError as QueueNotFoundError
from offload.errors import ResultTimeoutError as ResultTimeoutError
from offload.errors import Retry as Retry
from offload.errors import RunFailedError as RunFailedError
from offload.errors import RunNotFoundError as RunNotFoundError
from offload.errors import RunStateError as RunStateError
from offload.errors import ScheduleNotFoundError as ScheduleNotFoundError
from offload.errors import TaskArgumentsError as TaskArgumentsError
from offload.errors import TaskCancelledError as TaskCancelledError
from offload.errors import TaskDefinitionError as TaskDefinitionError
from offload.errors import TaskTimeoutError as TaskTimeoutError
from offload.settings import Settings as Settings

__all__ = [
    "TERMINAL_STATES",
    "Attempt",
    "Backoff",
    "BasicAuth",
    "BearerAuth",
    "BrokerUnavailableError",
    "ConfigurationError",
    "IdempotencyConflictError",
    "Lane",
    "LaneFullError",
    "LedgerError",
    "Offload",
    "OffloadError",
    "Progress",
    "QueueNotFoundError",
    "QueueStatus",
    "ResultTimeoutError",
    "Retry",
    "RunDetail",
    "RunFailedError",
    "RunFilter",
    "RunHandle",
    "RunNotFoundError",
    "RunPage",
    "RunState",
    "RunStateError",
    "RunStatus",
    "Schedule",
    "ScheduleNotFoundError",
    "ScheduleStatus",
    "SchedulerLease",
    "Settings",
    "Task",
    "TaskArgumentsError",
    "TaskCancelledError",
    "TaskContext",
    "TaskDefinitionError",
    "TaskTimeoutError",
    "Timeout",
    "WorkerStatus",
]
__version__ = "0.1.0"
