"""The public surface changes only on purpose."""

import offload


def test_all_is_pinned() -> None:
    assert sorted(offload.__all__) == sorted(
        [
            "TERMINAL_STATES",
            "Attempt",
            "Backoff",
            "BasicAuth",
            "BearerAuth",
            "BrokerUnavailableError",
            "ConfigurationError",
            "IdempotencyConflictError",
            "LaneFullError",
            "Lane",
            "LedgerError",
            "Offload",
            "OffloadError",
            "Progress",
            "QueueNotFoundError",
            "QueueStatus",
            "ResultTimeoutError",
            "Retry",
            "RunFailedError",
            "RunDetail",
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
    )
    for name in offload.__all__:
        assert getattr(offload, name) is not None


def test_every_error_is_an_offload_error() -> None:
    for name in offload.__all__:
        value = getattr(offload, name)
        if isinstance(value, type) and name.endswith("Error"):
            assert issubclass(value, offload.OffloadError), name
