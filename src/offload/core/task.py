"""Tasks: `@jobs.task(...)` turns a function into a `Task[P, R]` with a policy and `defer()`.

Arguments are validated against the function's signature (pydantic) when deferred, so a wrong
argument fails in the request that made it, before anything is written. They travel as JSON.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import random
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, create_model
from pydantic.errors import PydanticSchemaGenerationError, PydanticUserError

from offload.core.context import TaskContext
from offload.core.run import JSONValue, Lane
from offload.errors import TaskArgumentsError, TaskDefinitionError

if TYPE_CHECKING:
    from offload.core.handle import RunHandle
    from offload.core.ports import Dispatch

P = ParamSpec("P")
R = TypeVar("R")

MAX_PRIORITY = 9


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter and a cap, in seconds.

    The delay before retry *n* (n = 1 for the first retry) is drawn uniformly from
    `[0, min(cap, base * factor ** (n - 1))]` when `jitter` is on (the default; spreads a
    thundering herd), else it is exactly that bound.
    """

    base: float = 1.0
    factor: float = 2.0
    cap: float = 300.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.base < 0 or self.cap < 0 or self.factor < 1:
            raise TaskDefinitionError(
                f"Backoff(base={self.base}, factor={self.factor}, cap={self.cap}) is invalid: "
                "base and cap must be >= 0 and factor >= 1"
            )

    def bound(self, retry: int) -> float:
        """The largest delay before retry number `retry` (1-based)."""
        exponent = max(retry - 1, 0)
        # Large exponents overflow float maths long after the cap has been reached.
        if exponent > 64:
            return self.cap
        return float(min(self.cap, self.base * self.factor**exponent))

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """The delay in seconds before retry number `retry` (1-based)."""
        bound = self.bound(retry)
        if not self.jitter:
            return bound
        return (rng or random).uniform(0.0, bound)


@dataclass(frozen=True)
class Timeout:
    """How long one attempt may run, in seconds.

    At `soft` the task gets `TaskTimeoutError` (an exception it can clean up on); if it is
    still running at `hard` its process is killed and the attempt fails. `timeout=120` on a
    task means `Timeout(soft=120)`, whose `hard` is soft + max(1 s, 10 %).
    """

    soft: float
    hard: float | None = None

    def __post_init__(self) -> None:
        if self.soft <= 0:
            raise TaskDefinitionError(f"timeout must be > 0 seconds, got {self.soft}")
        if self.hard is None:
            object.__setattr__(self, "hard", self.soft + max(1.0, self.soft * 0.1))
        elif self.hard < self.soft:
            raise TaskDefinitionError(
                f"Timeout(soft={self.soft}, hard={self.hard}): hard must be >= soft"
            )

    @property
    def hard_s(self) -> float:
        """`hard`, always set after construction."""
        assert self.hard is not None
        return self.hard


@dataclass(frozen=True)
class Policy:
    """What a task promises: retries, backoff, timeout, where and how it runs."""

    lane: Lane = Lane.DURABLE
    retries: int = 0
    backoff: Backoff = field(default_factory=Backoff)
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    timeout: Timeout | None = None
    queue: str | None = None
    priority: int = 0
    cpu_bound: bool = False
    spill: bool = False

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise TaskDefinitionError(f"retries must be >= 0, got {self.retries}")
        if not 0 <= self.priority <= MAX_PRIORITY:
            raise TaskDefinitionError(f"priority must be 0..{MAX_PRIORITY}, got {self.priority}")
        for exc_type in self.retry_on:
            if not (isinstance(exc_type, type) and issubclass(exc_type, BaseException)):
                raise TaskDefinitionError(f"retry_on must hold exception types, got {exc_type!r}")

    @property
    def runs_on_workers(self) -> bool:
        """True when workers run this task: a durable one, or an inline one that may spill."""
        return self.lane is Lane.DURABLE or self.spill


@dataclass(frozen=True)
class DeferOptions:
    """Per-call options set with `task.options(...)`; never mixed with the task's arguments."""

    delay: float | None = None
    eta: datetime | None = None
    queue: str | None = None
    priority: int | None = None
    idempotency_key: str | None = None

    def __post_init__(self) -> None:
        if self.delay is not None and self.eta is not None:
            raise TaskArgumentsError("options(): give delay= or eta=, not both")
        if self.delay is not None and self.delay < 0:
            raise TaskArgumentsError(f"options(): delay must be >= 0 seconds, got {self.delay}")
        if self.eta is not None and self.eta.tzinfo is None:
            raise TaskArgumentsError(
                f"options(): eta={self.eta.isoformat()} has no timezone; use an aware datetime "
                "such as datetime.now(UTC) + timedelta(minutes=5)"
            )
        if self.priority is not None and not 0 <= self.priority <= MAX_PRIORITY:
            raise TaskArgumentsError(
                f"options(): priority must be 0..{MAX_PRIORITY}, got {self.priority}"
            )
        if self.idempotency_key is not None and not 0 < len(self.idempotency_key) <= 200:
            raise TaskArgumentsError("options(): idempotency_key must be 1..200 characters")


@dataclass(slots=True)
class Call:
    """One validated call of a task, ready to be recorded and published.

    Not frozen: a frozen dataclass sets each field through `object.__setattr__`, and one is
    built on every `defer()`.
    """

    task: str
    kwargs: dict[str, JSONValue]
    queue: str
    priority: int
    countdown_s: float | None
    idempotency_key: str | None


# JSON has no infinity or NaN. Arguments and results carry them as the strings "Infinity",
# "-Infinity" and "NaN" (pydantic's "strings" mode), which a `float` parameter or return type
# reads back as floats; pydantic's default would turn them into null, and Python's json module
# writes tokens that PostgreSQL's json type refuses. A pydantic model keeps its own config.
_VALUES_CONFIG = ConfigDict(ser_json_inf_nan="strings")
_ARGUMENTS_CONFIG = ConfigDict(extra="forbid", ser_json_inf_nan="strings")


def _result_adapter(returns: Any) -> TypeAdapter[Any]:
    try:
        return TypeAdapter(returns, config=_VALUES_CONFIG)
    except PydanticUserError as exc:
        if exc.code != "type-adapter-config-unused":
            raise
        return TypeAdapter(returns)  # a model, dataclass or TypedDict: its own config rules


class _Signature:
    """The pydantic view of a task function's parameters and return type."""

    def __init__(self, fn: Callable[..., Any], name: str) -> None:
        self.name = name
        try:
            hints = typing.get_type_hints(fn, include_extras=True)
        except (NameError, TypeError) as exc:
            raise TaskDefinitionError(
                f"Task {name!r}: cannot resolve its type annotations ({exc}); "
                "import the annotated types at module level"
            ) from exc
        parameters = list(inspect.signature(fn).parameters.values())
        self.takes_context = bool(parameters) and hints.get(parameters[0].name) is TaskContext
        if self.takes_context:
            parameters = parameters[1:]
        fields: dict[str, Any] = {}
        for parameter in parameters:
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                raise TaskDefinitionError(
                    f"Task {name!r}: parameter {parameter} cannot be validated; "
                    "give every argument a name"
                )
            if hints.get(parameter.name) is TaskContext:
                raise TaskDefinitionError(f"Task {name!r}: a TaskContext parameter must come first")
            default = ... if parameter.default is parameter.empty else parameter.default
            fields[parameter.name] = (hints.get(parameter.name, Any), default)
        self.parameter_names = [p.name for p in parameters]
        self.positional_names = [p.name for p in parameters if p.kind is not p.KEYWORD_ONLY]
        self.positional_only = {p.name for p in parameters if p.kind is p.POSITIONAL_ONLY}
        try:
            self.model: type[BaseModel] = create_model(
                f"{name}_arguments", __config__=_ARGUMENTS_CONFIG, **fields
            )
            self.model.model_json_schema()
            self._validator = self.model.__pydantic_validator__
            self._serializer = self.model.__pydantic_serializer__
            returns = hints.get("return", Any)
            self.result_adapter = _result_adapter(returns)
            self.result_adapter.json_schema()
        except (PydanticSchemaGenerationError, PydanticUserError) as exc:
            raise TaskDefinitionError(
                f"Task {name!r}: its parameter or return types cannot travel as JSON: {exc}"
            ) from exc

    def bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Map positional and keyword arguments onto parameter names, like a call would."""
        if len(args) > len(self.positional_names):
            raise TaskArgumentsError(
                f"{self.name}() takes {len(self.positional_names)} positional argument(s) "
                f"but {len(args)} were given",
                [{"loc": [], "msg": "too many positional arguments", "type": "too_many"}],
            )
        bound = dict(zip(self.positional_names, args, strict=False))
        for key, value in kwargs.items():
            if key in bound or key in self.positional_only:
                raise TaskArgumentsError(
                    f"{self.name}() got multiple values for argument {key!r}",
                    [{"loc": [key], "msg": "given twice", "type": "multiple_values"}],
                )
            bound[key] = value
        return bound

    def validate(self, arguments: Mapping[str, Any]) -> BaseModel:
        """Validate bound arguments; raise `TaskArgumentsError` naming each bad argument."""
        try:
            # The model's own validator and serializer (below): `model_validate` and
            # `model_dump` add a Python call each, which doubles the cost on `defer()`'s path.
            return self._validator.validate_python(arguments)  # type: ignore[no-any-return]
        except ValidationError as exc:
            errors = [
                {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()
            ]
            lines = [self._describe(e, arguments) for e in exc.errors()]
            raise TaskArgumentsError("; ".join(lines), errors) from None

    def _describe(self, error: Any, arguments: Mapping[str, Any]) -> str:
        location = ".".join(str(part) for part in error["loc"])
        if error["type"] == "missing":
            return f"{self.name}() is missing argument {location!r}"
        if error["type"] == "extra_forbidden":
            return f"{self.name}() got an unexpected argument {location!r}"
        return f"{self.name}() got {location}={error['input']!r}: {error['msg']}"

    def to_json(self, model: BaseModel) -> dict[str, JSONValue]:
        """The validated arguments as JSON-ready values (dates as ISO strings, models as dicts)."""
        try:
            dumped: dict[str, JSONValue] = json.loads(self._serializer.to_json(model))
        except Exception as exc:
            raise TaskArgumentsError(
                f"{self.name}(): arguments cannot travel as JSON: {exc}"
            ) from exc
        return dumped

    def to_json_arguments(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> dict[str, JSONValue]:
        """Bind, validate and dump one call's arguments: what `defer()` records."""
        if not args and not kwargs and not self.parameter_names:
            return {}  # nothing to check: a task without parameters skips pydantic
        return self.to_json(self.validate(self.bind(args, kwargs)))

    def from_json(self, kwargs: Mapping[str, JSONValue]) -> dict[str, Any]:
        """Rebuild Python arguments from their JSON form (in the worker)."""
        if not kwargs and not self.parameter_names:
            return {}
        model = self.validate(kwargs)
        return {name: getattr(model, name) for name in self.parameter_names}


class Task(Generic[P, R]):
    """A function declared with `@jobs.task(...)`.

    `await task.defer(...)` validates the arguments and starts a run, returning a
    `RunHandle`; `task.defer_sync(...)` is its blocking twin; `task.options(delay=60)` sets
    per-call options; calling `task(...)` runs the plain function, for unit tests.
    """

    def __init__(
        self,
        host: Dispatch,
        fn: Callable[..., Any],
        name: str,
        policy: Policy,
        options: DeferOptions | None = None,
        signature: _Signature | None = None,
    ) -> None:
        if signature is None:
            _check_declaration(fn, name, policy)
            signature = _Signature(fn, name)
        self._host = host
        self.fn = fn
        self.name = name
        self.policy = policy
        self.queue = policy.queue or host.default_queue
        """The queue this task's runs go to, unless an option overrides it."""
        self.is_async = inspect.iscoroutinefunction(fn)
        self.signature = signature
        self._options = options or DeferOptions()
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<Task {self.name} lane={self.policy.lane}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the plain function in this process, without offload (for unit tests)."""
        return self.fn(*args, **kwargs)

    def decode_result(self, value: JSONValue) -> Any:
        """A stored JSON result as the task's declared return type."""
        return self.signature.result_adapter.validate_python(value)

    def encode_result(self, value: Any) -> JSONValue:
        """A returned value as the JSON the ledger and the status API hold."""
        return json.loads(self.signature.result_adapter.dump_json(value))

    def options(
        self,
        *,
        delay: float | timedelta | None = None,
        eta: datetime | None = None,
        queue: str | None = None,
        priority: int | None = None,
        idempotency_key: str | None = None,
    ) -> Task[P, R]:
        """A copy of this task whose `defer()` uses these options.

        - `delay`: seconds (or timedelta) to wait before the run may start.
        - `eta`: an aware datetime before which the run does not start.
        - `queue`, `priority` (0..9, higher first): override the task's policy.
        - `idempotency_key`: deferring again with the same key returns the existing run.
        """
        if isinstance(delay, timedelta):
            delay = delay.total_seconds()
        changes: dict[str, Any] = {
            key: value
            for key, value in {
                "delay": delay,
                "eta": eta,
                "queue": queue,
                "priority": priority,
                "idempotency_key": idempotency_key,
            }.items()
            if value is not None
        }
        options = dataclasses.replace(self._options, **changes)
        return Task(self._host, self.fn, self.name, self.policy, options, self.signature)

    def prepare(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Call:
        """Validate one call and resolve its options. Raises `TaskArgumentsError`."""
        arguments = self.signature.to_json_arguments(args, kwargs)
        options = self._options
        countdown = options.delay
        if options.eta is not None:
            countdown = max(0.0, options.eta.timestamp() - self._host.now())
        return Call(
            task=self.name,
            kwargs=arguments,
            queue=options.queue or self.queue,
            priority=self.policy.priority if options.priority is None else options.priority,
            countdown_s=countdown or None,
            idempotency_key=options.idempotency_key,
        )

    def defer_sync(self, *args: P.args, **kwargs: P.kwargs) -> RunHandle[R]:
        """Validate the arguments and start a run; returns its handle at once.

        Raises `TaskArgumentsError` (nothing written), `BrokerUnavailableError`, `LedgerError`.
        """
        return self._host.submit(self, [self.prepare(args, kwargs)])[0]

    async def defer(self, *args: P.args, **kwargs: P.kwargs) -> RunHandle[R]:
        """Async twin of `defer_sync()`: validates here, writes and publishes off the loop."""
        call = self.prepare(args, kwargs)
        handles = await self._host.submit_async(self, [call])
        return handles[0]

    def defer_many_sync(self, calls: Iterable[Mapping[str, Any]]) -> list[RunHandle[R]]:
        """Start one run per mapping of keyword arguments, in one transaction and one batch.

        Every call is validated first: if any is wrong, `TaskArgumentsError` names its index
        and nothing is written.
        """
        return self._host.submit(self, self._prepare_many(calls))

    async def defer_many(self, calls: Iterable[Mapping[str, Any]]) -> list[RunHandle[R]]:
        """Async twin of `defer_many_sync()`."""
        return await self._host.submit_async(self, self._prepare_many(calls))

    def _prepare_many(self, calls: Iterable[Mapping[str, Any]]) -> list[Call]:
        prepared = []
        for index, kwargs in enumerate(calls):
            try:
                prepared.append(self.prepare((), kwargs))
            except TaskArgumentsError as exc:
                raise TaskArgumentsError(
                    f"call #{index}: {exc}",
                    [{**e, "loc": [index, *e["loc"]]} for e in exc.errors],
                ) from None
        return prepared


def _check_declaration(fn: Callable[..., Any], name: str, policy: Policy) -> None:
    """What a declaration gets wrong beyond its policy's own values."""
    if not callable(fn):
        raise TaskDefinitionError(f"@task needs a function, got {fn!r}")
    if policy.spill and policy.lane is not Lane.INLINE:
        raise TaskDefinitionError(
            f"Task {name!r}: spill=True sends inline overflow to the durable lane; "
            "it needs lane='inline'"
        )
    if policy.lane is Lane.INLINE and policy.cpu_bound and "<locals>" in fn.__qualname__:
        raise TaskDefinitionError(
            f"Task {name!r}: a cpu_bound inline task runs in another process, which "
            "imports it by name; declare it at module level"
        )
