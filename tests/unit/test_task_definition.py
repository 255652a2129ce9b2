"""Declaring tasks: policies, names and types are checked when the module is imported."""

from __future__ import annotations

import random
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import pytest

from offload import (
    Backoff,
    Offload,
    Retry,
    TaskArgumentsError,
    TaskContext,
    TaskDefinitionError,
    Timeout,
)
from offload.core import attempt
from offload.core.task import Policy


def test_annotations_that_cannot_be_resolved_say_so(jobs: Offload) -> None:
    class Local:
        pass

    with pytest.raises(TaskDefinitionError, match="name 'Local' is not defined"):

        @jobs.task
        def bad(thing: Local) -> None: ...


@pytest.fixture
def jobs(tmp_path: Path) -> Offload:
    return Offload(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/15")


def test_backoff_full_jitter_stays_within_the_exponential_bound() -> None:
    backoff = Backoff(base=2, factor=3, cap=100)
    rng = random.Random(7)
    assert [backoff.bound(n) for n in range(1, 6)] == [2, 6, 18, 54, 100]
    for retry in range(1, 8):
        delays = [backoff.delay(retry, rng) for _ in range(200)]
        assert all(0 <= d <= backoff.bound(retry) for d in delays)
        assert max(delays) > 0.5 * backoff.bound(retry)  # it spreads, it is not stuck at 0


def test_backoff_without_jitter_is_exact_and_never_overflows() -> None:
    backoff = Backoff(base=1, cap=300, jitter=False)
    assert [backoff.delay(n) for n in (1, 2, 3)] == [1, 2, 4]
    assert backoff.delay(10_000) == 300


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base": -1}, "base and cap must be >= 0"),
        ({"factor": 0.5}, "factor >= 1"),
    ],
)
def test_bad_backoff_is_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(TaskDefinitionError, match=message):
        Backoff(**kwargs)


def test_timeout_gets_a_hard_limit_after_the_soft_one() -> None:
    assert Timeout(soft=120).hard == 132
    assert Timeout(soft=2).hard == 3
    with pytest.raises(TaskDefinitionError, match="hard must be >= soft"):
        Timeout(soft=10, hard=5)


def test_policy_retries_only_listed_errors_while_tries_remain() -> None:
    policy = Policy(retries=2, retry_on=(ConnectionError,), backoff=Backoff(base=1, cap=1))
    refused = attempt.describe(ConnectionError("refused"), policy)
    assert refused.error == "ConnectionError: refused"
    assert attempt.retry_in(policy, refused, failures=2) is not None
    assert attempt.retry_in(policy, refused, failures=3) is None
    assert attempt.retry_in(policy, attempt.describe(ValueError(), policy), failures=1) is None


def test_a_retry_request_waits_its_own_delay_even_for_errors_not_listed() -> None:
    policy = Policy(retries=1, retry_on=(ConnectionError,))
    asked = attempt.describe(Retry(delay=7), policy)
    assert attempt.retry_in(policy, asked, failures=1) == 7
    assert attempt.retry_in(policy, asked, failures=2) is None


def test_duplicate_task_name_says_where_the_first_one_is(jobs: Offload) -> None:
    @jobs.task
    def send_email(to: str) -> None: ...

    with pytest.raises(
        TaskDefinitionError, match=r"'send_email' is already registered \(.*py:\d+\)"
    ):

        @jobs.task(name="send_email")
        def other(to: str) -> None: ...


class Socketish:
    pass


def test_parameters_that_cannot_travel_as_json_are_refused_at_declaration(jobs: Offload) -> None:
    with pytest.raises(TaskDefinitionError, match="cannot travel as JSON"):

        @jobs.task
        def bad(conn: Socketish) -> None: ...


def test_star_args_are_refused(jobs: Offload) -> None:
    with pytest.raises(TaskDefinitionError, match="give every argument a name"):

        @jobs.task
        def bad(*items: int) -> None: ...


def test_context_must_come_first(jobs: Offload) -> None:
    with pytest.raises(TaskDefinitionError, match="TaskContext parameter must come first"):

        @jobs.task
        def bad(user_id: int, ctx: TaskContext) -> None: ...


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"retries": -1}, "retries must be >= 0"),
        ({"priority": 10}, "priority must be 0..9"),
        ({"retry_on": "ValueError"}, "retry_on must hold exception types"),
        ({"timeout": 0}, "timeout must be > 0"),
    ],
)
def test_bad_policy_is_refused(jobs: Offload, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(TaskDefinitionError, match=message):
        jobs.task(**kwargs)  # type: ignore[call-overload]


def test_arguments_are_validated_and_converted_to_json(jobs: Offload) -> None:
    @jobs.task
    def report(ctx: TaskContext, user_id: int, kind: Literal["pdf", "csv"], at: datetime) -> str:
        return ""

    call = report.prepare((7,), {"kind": "csv", "at": "2026-11-25T10:00:00+00:00"})
    assert call.kwargs == {"user_id": 7, "kind": "csv", "at": "2026-11-25T10:00:00Z"}
    assert call.queue == "default"
    with pytest.raises(TaskArgumentsError) as wrong:
        report.prepare((), {"user_id": "seven", "kind": "docx", "at": "now"})
    assert [e["loc"] for e in wrong.value.errors] == [["user_id"], ["kind"], ["at"]]
    assert str(wrong.value).startswith("report() got user_id='seven': ")
    with pytest.raises(TaskArgumentsError, match="takes 3 positional argument"):
        report.prepare((1, "pdf", "x", 4), {})
    with pytest.raises(TaskArgumentsError, match="multiple values for argument 'user_id'"):
        report.prepare((1,), {"user_id": 2, "kind": "pdf", "at": "x"})


def test_options_are_checked_and_never_mixed_with_arguments(jobs: Offload) -> None:
    @jobs.task
    def ping(delay: int) -> int:  # an argument may be called "delay"
        return delay

    assert ping.options(delay=5).prepare((), {"delay": 1}).countdown_s == 5
    assert ping.options(delay=5).prepare((), {"delay": 1}).kwargs == {"delay": 1}
    with pytest.raises(TaskArgumentsError, match="no timezone"):
        ping.options(eta=datetime(2030, 1, 1))  # noqa: DTZ001 - the mistake under test
    with pytest.raises(TaskArgumentsError, match=r"priority must be 0\.\.9"):
        ping.options(priority=11)


def test_calling_the_task_runs_the_plain_function(jobs: Offload) -> None:
    @jobs.task
    def double(x: int) -> int:
        return 2 * x

    assert double(21) == 42
