"""The `offload` command: a thin layer over the public API.

Exit status: 0 success, 1 failure, 2 usage error. Errors are one line plus a hint; `-v`
shows tracebacks.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import signal
import sys
import textwrap
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

import typer

from offload.core.overview import QueueStatus
from offload.core.run import TERMINAL_STATES, RunDetail, RunFilter, RunState, RunStatus
from offload.core.schedule import ScheduleStatus
from offload.errors import OffloadError

if TYPE_CHECKING:
    from types import FrameType

    from offload.app import Offload

app = typer.Typer(
    help="offload: background work for FastAPI. Run the API with an embedded worker, "
    "run workers, and look at runs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
runs_app = typer.Typer(
    help="Look at runs in the ledger, cancel, retry, purge.", no_args_is_help=True
)
app.add_typer(runs_app, name="runs")
dlq_app = typer.Typer(
    help="The dead-letter queue: runs whose last try failed. List, show, replay, discard, purge.",
    no_args_is_help=True,
)
app.add_typer(dlq_app, name="dlq")
schedules_app = typer.Typer(
    help="Schedules: list them with their next fire and last run; pause, resume, run now.",
    no_args_is_help=True,
)
app.add_typer(schedules_app, name="schedules")
queues_app = typer.Typer(
    help="Queues: list their backlog; pause one (its runs wait) and resume it.",
    no_args_is_help=True,
)
app.add_typer(queues_app, name="queues")

Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log more; show tracebacks.")]


class LogLevel(StrEnum):
    critical = "critical"
    error = "error"
    warning = "warning"
    info = "info"
    debug = "debug"


LogLevelOption = Annotated[
    LogLevel | None,
    typer.Option(
        "--log-level",
        case_sensitive=False,
        help="For offload, uvicorn and the Celery workers (default warning; -v means info). "
        "At info or debug the workers also print Celery's banner.",
    ),
]


def _level(log_level: LogLevel | None, verbose: bool) -> str:
    """The level asked for, as logging and Celery spell it: "WARNING" unless told."""
    if log_level is not None:
        return log_level.value.upper()
    return "INFO" if verbose else "WARNING"


def _setup_logging(verbose: bool, level: str | None = None) -> None:
    logging.basicConfig(
        level=level or ("INFO" if verbose else "WARNING"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _say_if_root(command: str) -> None:
    """Celery warns once per consumer when it runs as root; offload's workers accept JSON
    only, which takes away the reason (pickle runs code), so one line says it instead."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        typer.echo(
            f"offload {command}: running as root; workers accept JSON only, but prefer an "
            "unprivileged user in production"
        )


def _fail(exc: Exception, verbose: bool) -> typer.Exit:
    if verbose:
        raise exc
    typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
    return typer.Exit(1)


@app.command()
def worker(
    spec: Annotated[
        str,
        typer.Argument(
            help="The Offload instance: MODULE:ATTRIBUTE, e.g. "
            "myapp.main:jobs (or MODULE holding exactly one)."
        ),
    ],
    queues: Annotated[
        list[str] | None,
        typer.Option("--queue", "-Q", help="Consume only these queues (repeat the option)."),
    ] = None,
    low_priority: Annotated[
        bool,
        typer.Option(
            help="Yield the CPU to other processes on this machine (nice 19, idle policy)."
        ),
    ] = False,
    shutdown_timeout: Annotated[
        float,
        typer.Option(help="Seconds to let running tasks finish on SIGTERM before killing them."),
    ] = 30.0,
    log_level: LogLevelOption = None,
    verbose: Verbose = False,
) -> None:
    """Run worker processes for the durable lane until SIGTERM or Ctrl-C.

    Starts OFFLOAD_WORKER_PROCESSES thread-pool consumers for I/O tasks and one prefork
    consumer for cpu_bound tasks, and restarts any that die. The broker and ledger come
    from OFFLOAD_BROKER_URL and OFFLOAD_LEDGER_URL (or the Offload(...) arguments).
    """
    from offload.worker import Supervisor, load_offload

    level = _level(log_level, verbose)
    _setup_logging(verbose, level)
    try:
        jobs = load_offload(spec)
        jobs.ledger.ensure_schema()
        supervisor = Supervisor(
            spec,
            jobs,
            queues=queues,
            loglevel=level,
            low_priority=low_priority,
            shutdown_timeout_s=shutdown_timeout,
        )
    except OffloadError as exc:
        raise _fail(exc, verbose) from None
    names = ", ".join(f"{c.name}" for c in supervisor.children)
    typer.echo(
        f"offload worker: {len(supervisor.children)} process(es) [{names}] on "
        f"{jobs.durable.queues(cpu_bound=False) + jobs.durable.queues(cpu_bound=True)}"
    )
    _say_if_root("worker")
    raise typer.Exit(supervisor.run_forever())


@app.command()
def serve(
    spec: Annotated[
        str, typer.Argument(help="The FastAPI app: MODULE:ATTRIBUTE, e.g. reference.main:app.")
    ],
    host: Annotated[str, typer.Option(help="Interface to bind (loopback by default).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    jobs_spec: Annotated[
        str | None,
        typer.Option(
            "--jobs", help="The Offload instance, if not the only one in the app's module."
        ),
    ] = None,
    embedded_worker: Annotated[
        bool,
        typer.Option(help="Start a low-priority worker beside the API (one per data directory)."),
    ] = True,
    scheduler: Annotated[
        bool,
        typer.Option(help="Fire the app's schedules (several processes may: one fires)."),
    ] = True,
    log_level: LogLevelOption = None,
    verbose: Verbose = False,
) -> None:
    """Run the API with uvicorn plus an embedded worker and the scheduler: one command, no
    services needed.

    With no OFFLOAD_BROKER_URL the durable lane uses SQLite files in OFFLOAD_DATA_DIR
    (./offload-data). Several `offload serve` processes on one data directory start one
    embedded worker between them.
    """
    import uvicorn
    from uvicorn.importer import ImportFromStringError, import_from_string

    from offload.web.dashboard import mounted_dashboards
    from offload.worker import Supervisor, embedded_worker_lock, load_offload

    level = _level(log_level, verbose)
    _setup_logging(verbose, level)
    module = spec.partition(":")[0]
    worker_spec = jobs_spec or module
    try:
        jobs = load_offload(worker_spec)
        jobs.ledger.ensure_schema()
    except OffloadError as exc:
        raise _fail(exc, verbose) from None
    try:
        dashboards = mounted_dashboards(import_from_string(spec))
    except ImportFromStringError as exc:
        typer.echo(f"offload serve: {exc}", err=True)
        raise typer.Exit(2) from None
    open_to_all = [path for path, board in dashboards if board.access.needs_loopback]
    if open_to_all and not _is_loopback_host(host):
        typer.echo(
            f"offload serve: the dashboard at {open_to_all[0]} has no credentials and may not "
            f"be served on {host}: set OFFLOAD_DASHBOARD_PASSWORD (or OFFLOAD_DASHBOARD_TOKEN), "
            "pass jobs.dashboard(auth=...), or bind to 127.0.0.1",
            err=True,
        )
        raise typer.Exit(2)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    typer.echo(f"offload serve: API at http://{shown}:{port}/ (bound to {host})")
    for path, _ in dashboards:
        typer.echo(f"offload serve: dashboard at http://{shown}:{port}{path.rstrip('/')}/")
    with embedded_worker_lock(jobs.settings.data_dir) as owner:
        supervisor = None
        if embedded_worker and owner:
            supervisor = Supervisor(worker_spec, jobs, loglevel=level, low_priority=True)
            supervisor.start()
            names = ", ".join(child.name for child in supervisor.children)
            typer.echo(
                f"offload serve: embedded worker for {jobs.settings.data_dir} "
                f"({len(supervisor.children)} low-priority process(es): {names})"
            )
            _say_if_root("serve")
            stop = threading.Event()

            def keep_alive() -> None:
                while not stop.wait(0.5):
                    supervisor.poll()

            threading.Thread(target=keep_alive, name="offload-supervisor", daemon=True).start()
        elif embedded_worker:
            typer.echo(
                "offload serve: another process runs the embedded worker for "
                f"{jobs.settings.data_dir}; not starting a second one"
            )
        runner = jobs.scheduler() if scheduler and jobs.schedules else None
        if runner is not None:
            runner.start()
            typer.echo(f"offload serve: scheduler for {len(jobs.schedules)} schedule(s)")
        # uvicorn shuts down on SIGTERM/SIGINT, restores the handlers it found, then raises
        # the signal again: with Python's default SIGTERM handler that ended this process on
        # the spot, before the workers were stopped (they lingered orphaned). The handlers
        # found here turn it into an exit that runs the `finally` below.
        previous = {signum: signal.signal(signum, _exit_served) for signum in _STOP_SIGNALS}
        try:
            uvicorn.run(spec, host=host, port=port, log_level=level.lower())
        finally:
            if runner is not None:
                runner.stop()
            if supervisor is not None:
                stop.set()
                supervisor.stop()
                typer.echo("offload serve: workers stopped")
            for signum, handler in previous.items():
                signal.signal(signum, handler)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _exit_served(_signum: int, _frame: FrameType | None) -> None:
    """A stop signal uvicorn has already acted on: leave serve normally (exit status 0)."""
    raise SystemExit(0)


def _is_loopback_host(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command()
def beat(
    spec: Annotated[
        str,
        typer.Argument(help="The Offload instance: MODULE:ATTRIBUTE, e.g. myapp.main:jobs."),
    ],
    verbose: Verbose = False,
) -> None:
    """Run the scheduler: fire the app's schedules as durable runs until SIGTERM or Ctrl-C.

    Run one wherever convenient, or several for failover: the one holding the ledger's lease
    fires, the others stand by and take over within OFFLOAD_SCHEDULER_LEASE_S (10 s) + 1 s
    of it dying (at once if it ran on the same machine).
    """
    from offload.worker import load_offload

    _setup_logging(verbose)
    logging.getLogger("offload.scheduler").setLevel(logging.INFO)
    try:
        jobs = load_offload(spec)
        jobs.ledger.ensure_schema()
    except OffloadError as exc:
        raise _fail(exc, verbose) from None
    if not jobs.schedules:
        typer.secho(
            f"error: {spec} declares no schedules; add @jobs.periodic(cron=...) to a task",
            err=True,
            fg=typer.colors.RED,
        )
        raise typer.Exit(1)
    runner = jobs.scheduler()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    names = ", ".join(sorted(jobs.schedules))
    typer.echo(f"offload beat {runner.identity}: {len(jobs.schedules)} schedule(s) [{names}]")
    runner.run_forever(stop)


LedgerUrl = Annotated[
    str | None,
    typer.Option(
        "--ledger-url",
        help="Ledger database URL (default: OFFLOAD_LEDGER_URL or the SQLite file "
        "in OFFLOAD_DATA_DIR).",
    ),
]
AppSpec = Annotated[
    str | None,
    typer.Option(
        "--app",
        envvar="OFFLOAD_APP",
        help="The Offload instance, MODULE:ATTRIBUTE (e.g. myapp.main:jobs): needed to replay, "
        "which publishes runs of its tasks. Its settings name the ledger and broker.",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Since = Annotated[
    datetime | None, typer.Option(help="Only runs deferred at or after this time (UTC).")
]
Until = Annotated[datetime | None, typer.Option(help="Only runs deferred before this time (UTC).")]
TaskName = Annotated[str | None, typer.Option(help="Only runs of this task.")]
ErrorText = Annotated[str | None, typer.Option(help="Only runs whose error contains this text.")]
ErrorType = Annotated[
    str | None, typer.Option(help="Only runs that failed with this exception type.")
]
Edits = Annotated[
    list[str] | None,
    typer.Option(
        "--arg",
        help="NAME=VALUE: replay with this argument changed (VALUE is JSON, else a string); "
        "repeat for more.",
    ),
]


def _offload(ledger_url: str | None, app_spec: str | None = None) -> Offload:
    """The app's `Offload` (`--app`), or one with no tasks over the ledger, which must exist."""
    if app_spec:
        from offload.worker import load_offload

        jobs = load_offload(app_spec)
    else:
        from offload.app import Offload

        jobs = Offload(ledger_url=ledger_url)
    jobs.check_ledger()
    return jobs


def _utc(moment: datetime | None) -> datetime | None:
    """A time from the command line; one without a zone is UTC, as the tables print."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _duration(text: str) -> timedelta:
    """`90s`, `30m`, `12h`, `7d`, `2w`, or plain seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if match is None:
        raise typer.BadParameter(f"{text!r} is not a duration like 90s, 30m, 12h, 7d or 2w")
    return timedelta(seconds=float(match[1]) * _UNITS[match[2] or "s"])


def _edits(pairs: list[str] | None) -> dict[str, Any]:
    edits: dict[str, Any] = {}
    for pair in pairs or ():
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise typer.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint="--arg")
        try:
            edits[name] = json.loads(text)
        except ValueError:
            edits[name] = text
    return edits


def _row(status: RunStatus) -> str:
    progress = f"{status.progress.fraction:.0%}" if status.progress else ""
    dead = " dead" if status.dead else ""
    return (
        f"{status.id}  {status.task:<24} {status.state.value:<9}{dead:<5} "
        f"{status.attempts:>3}  {progress:>4}  {status.created_at:%Y-%m-%d %H:%M:%S}  "
        f"{status.error or ''}"
    )


def _print_runs(runs: list[RunStatus], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps([r.model_dump(mode="json") for r in runs], indent=2))
        return
    typer.echo(f"{'id':<32}  {'task':<24} {'state':<14} try  prog  created              error")
    for status in runs:
        typer.echo(_row(status))


def _print_detail(run: RunDetail, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(run.model_dump(mode="json"), indent=2))
        return
    typer.echo(_row(run))
    typer.echo(f"  arguments: {json.dumps(run.args)}")
    if run.replay_of:
        typer.echo(f"  replays {run.replay_of}")
    if run.replayed_by:
        typer.echo(f"  replayed by {run.replayed_by}")
    for attempt in run.attempt_history:
        took = ""
        if attempt.finished_at is not None:
            took = f" in {(attempt.finished_at - attempt.started_at).total_seconds():.2f}s"
        typer.echo(
            f"  attempt {attempt.number}: {attempt.outcome or 'running'} on "
            f"{attempt.worker} at {attempt.started_at:%Y-%m-%d %H:%M:%S}{took}  "
            f"{attempt.error or ''}"
        )
        if attempt.traceback:
            typer.echo(textwrap.indent(attempt.traceback.rstrip(), "    "))


def _with_progress(
    what: str, total: int, work: Callable[[Callable[[int], None]], int], as_json: bool
) -> int:
    """Run a bulk operation, showing `done/total` on stderr as its batches complete."""
    if as_json or total == 0:
        return work(lambda _done: None)
    with typer.progressbar(length=total, label=what, file=sys.stderr, show_pos=True) as bar:
        shown = 0

        def advance(done: int) -> None:
            nonlocal shown
            bar.update(min(done, total) - shown)
            shown = min(done, total)

        return work(advance)


def _replay_one(jobs: Offload, run_id: str, edits: list[str] | None, as_json: bool) -> None:
    handle = jobs.replay_sync(run_id, _edits(edits) or None)
    if as_json:
        typer.echo(jobs.status_sync(handle.id).model_dump_json(indent=2))
    else:
        typer.echo(f"replayed {run_id} as {handle.id}")


@runs_app.command("list")
def runs_list(
    state: Annotated[list[RunState] | None, typer.Option(help="Only runs in these states.")] = None,
    task: TaskName = None,
    queue: Annotated[str | None, typer.Option(help="Only runs of this queue.")] = None,
    dead: Annotated[bool, typer.Option("--dead", help="Only dead runs.")] = False,
    error: ErrorText = None,
    schedule: Annotated[str | None, typer.Option(help="Only fires of this schedule.")] = None,
    since: Since = None,
    until: Until = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many, newest first.")] = 20,
    ledger_url: LedgerUrl = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """List runs, newest first."""
    where = RunFilter(
        states=tuple(state or ()),
        task=task,
        queue=queue,
        dead=dead or None,
        error=error,
        schedule=schedule,
        created_after=_utc(since),
        created_before=_utc(until),
    )
    try:
        page = _offload(ledger_url).list_runs_sync(where, limit=limit)
    except OffloadError as exc:
        raise _fail(exc, verbose) from None
    _print_runs(page.runs, as_json)


@runs_app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(help="The run id.")],
    ledger_url: LedgerUrl = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """Show one run: its arguments and every attempt, with errors and tracebacks."""
    try:
        run = _offload(ledger_url).get_run_sync(run_id)
    except OffloadError as exc:
        raise _fail(exc, verbose) from None
    _print_detail(run, as_json)


@runs_app.command("cancel")
def runs_cancel(
    run_id: Annotated[str, typer.Argument(help="The run id.")],
    ledger_url: LedgerUrl = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """Cancel a waiting run; ask a running one to stop (it sees ctx.cancelled)."""
    try:
        status = _offload(ledger_url).cancel_sync(run_id)
    except OffloadError as exc:
        raise _fail(exc, verbose) from None
    if as_json:
        typer.echo(status.model_dump_json(indent=2))
    elif status.state is RunState.CANCELLED:
        typer.echo(f"cancelled {run_id}")
    elif status.is_terminal:
        typer.echo(f"{run_id} had already finished: {status.state.value}")
    else:
        typer.echo(f"asked {run_id} to stop; it is {status.state.value} until its task notices")


@runs_app.command("retry")
def runs_retry(
    run_id: Annotated[str, typer.Argument(help="A FAILURE or CANCELLED run.")],
    edits: Edits = None,
    app_spec: AppSpec = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """Start a failed or cancelled run again, as a new run that links to it."""
    try:
        _replay_one(_offload(None, app_spec or _need_app()), run_id, edits, as_json)
    except OffloadError as exc:
        raise _fail(exc, verbose) from None


@runs_app.command("purge")
def runs_purge(
    older_than: Annotated[
        str, typer.Option(help="Delete runs that finished longer ago than this: 12h, 7d, 2w.")
    ],
    state: Annotated[
        list[RunState] | None, typer.Option(help="Only finished runs in these states.")
    ] = None,
    task: TaskName = None,
    dead: Annotated[
        bool | None, typer.Option("--dead/--not-dead", help="Only dead runs, or only others.")
    ] = None,
    ledger_url: LedgerUrl = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """Delete finished runs (never waiting or running ones), a small batch at a time."""
    cutoff = datetime.now(UTC) - _duration(older_than)
    where = RunFilter(states=tuple(state or ()), task=task, dead=dead, finished_before=cutoff)
    _purge(where, ledger_url, as_json, verbose)


def _purge(where: RunFilter, ledger_url: str | None, as_json: bool, verbose: bool) -> None:
    try:
        jobs = _offload(ledger_url)
        finished = where.within(TERMINAL_STATES)
        total = sum(jobs.count_runs_sync(finished).values()) if finished else 0
        purged = _with_progress(
            "purging", total, lambda progress: jobs.purge_sync(where, on_progress=progress), as_json
        )
    except OffloadError as exc:
        raise _fail(exc, verbose) from None
    typer.echo(json.dumps({"purged": purged}) if as_json else f"purged {purged} finished run(s)")


def _need_app() -> str:
    raise typer.BadParameter(
        "replaying publishes runs of your tasks: pass --app MODULE:ATTRIBUTE "
        "(e.g. --app myapp.main:jobs) or set OFFLOAD_APP",
        param_hint="--app",
    )


# --- dead letters ------------------------------------------------------------------------------


@dlq_app.command("list")
def dlq_list(
    task: TaskName = None,
    error: ErrorText = None,
    error_type: ErrorType = None,
    since: Since = None,
    until: Until = None,
    replayed: Annotated[
        bool, typer.Option("--replayed", help="Also the dead runs that were replayed.")
    ] = False,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many, newest first.")] = 20,
    ledger_url: LedgerUrl = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """List dead runs (their last try failed), newest first, with counts per task."""
    where = _dead(task, error, error_type, since, until, replayed)
    try:
        jobs = _offload(ledger_url)
        page = jobs.list_runs_sync(where, limit=limit)
        counts = jobs.count_runs_sync(where)
    except OffloadError as exc:
        raise _fail(exc, verbose) from None
    if as_json:
        _print_runs(page.runs, as_json)
        return
    if not counts:
        typer.echo(
            "no dead runs" + ("" if where == RunFilter(dead=True, replayed=False) else " match")
        )
        return
    per_task = ", ".join(f"{name}: {n}" for name, n in sorted(counts.items()))
    typer.echo(f"{sum(counts.values())} dead run(s) ({per_task})")
    _print_runs(page.runs, as_json)


def _dead(
    task: str | None,
    error: str | None,
    error_type: str | None,
    since: datetime | None,
    until: datetime | None,
    replayed: bool = False,
) -> RunFilter:
    return RunFilter(
        dead=True,
        task=task,
        error=error,
        error_type=error_type,
        created_after=_utc(since),
        created_before=_utc(until),
        replayed=None if replayed else False,
    )


@dlq_app.command("show")
def dlq_show(
    run_id: Annotated[str, typer.Argument(help="The dead run's id.")],
    ledger_url: LedgerUrl = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """Show a dead run: its arguments, and every attempt's error, traceback and timing."""
    runs_show(run_id, ledger_url, as_json, verbose)


@dlq_app.command("replay")
def dlq_replay(
    run_id: Annotated[
        str | None, typer.Argument(help="The dead run to replay; omit it to replay by filter.")
    ] = None,
    edits: Edits = None,
    every: Annotated[
        bool, typer.Option("--all", help="Replay every dead run the filters take.")
    ] = False,
    task: TaskName = None,
    error: ErrorText = None,
    error_type: ErrorType = None,
    since: Since = None,
    until: Until = None,
    app_spec: AppSpec = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """Replay a dead run (optionally with edited arguments), or all that the filters take.

    A replay is a new run that links to its dead original; a run is replayed once.
    """
    filtered = any(v is not None for v in (task, error, error_type, since, until))
    if run_id is None and not (every or filtered):
        raise typer.BadParameter("name a run id, or pass --all or a filter (--task ...)")
    if run_id is not None and (every or filtered):
        raise typer.BadParameter("a run id replays that run; filters and --all replay many")
    if run_id is None and edits:
        raise typer.BadParameter("--arg edits one run: name its id", param_hint="--arg")
    try:
        jobs = _offload(None, app_spec or _need_app())
        if run_id is not None:
            _replay_one(jobs, run_id, edits, as_json)
            return
        where = _dead(task, error, error_type, since, until)
        total = sum(jobs.count_runs_sync(where).values())
        replayed = _with_progress(
            "replaying",
            total,
            lambda progress: jobs.replay_all_sync(where, on_progress=progress),
            as_json,
        )
    except OffloadError as exc:
        raise _fail(exc, verbose) from None
    typer.echo(json.dumps({"replayed": replayed}) if as_json else f"replayed {replayed} run(s)")


@dlq_app.command("discard")
def dlq_discard(
    run_id: Annotated[str, typer.Argument(help="The dead run to delete.")],
    ledger_url: LedgerUrl = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """Delete a dead run and its attempts for good."""
    try:
        _offload(ledger_url).discard_sync(run_id)
    except OffloadError as exc:
        raise _fail(exc, verbose) from None
    typer.echo(json.dumps({"discarded": run_id}) if as_json else f"discarded {run_id}")


@dlq_app.command("purge")
def dlq_purge(
    every: Annotated[bool, typer.Option("--all", help="Delete every dead run.")] = False,
    task: TaskName = None,
    error: ErrorText = None,
    error_type: ErrorType = None,
    since: Since = None,
    until: Until = None,
    replayed: Annotated[
        bool, typer.Option("--replayed", help="Only the dead runs that were replayed.")
    ] = False,
    ledger_url: LedgerUrl = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """Delete the dead runs the filters take (or --all of them)."""
    filtered = replayed or any(v is not None for v in (task, error, error_type, since, until))
    if not (every or filtered):
        raise typer.BadParameter("pass a filter (--task, --error, --replayed, ...) or --all")
    where = _dead(task, error, error_type, since, until).model_copy(
        update={"replayed": True if replayed else None}
    )
    _purge(where, ledger_url, as_json, verbose)


# --- schedules ---------------------------------------------------------------------------------

ScheduleName = Annotated[str, typer.Argument(help="The schedule's name (offload schedules list).")]


def _print_schedules(found: list[ScheduleStatus], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps([s.model_dump(mode="json") for s in found], indent=2))
        return
    typer.echo(f"{'name':<24} {'when':<32} {'next fire (UTC)':<19}  {'last fire':<19}  last run")
    for status in found:
        upcoming = "paused" if status.paused else f"{status.next_fire_at:%Y-%m-%d %H:%M:%S}"
        last = f"{status.last_fire_at:%Y-%m-%d %H:%M:%S}" if status.last_fire_at else "never"
        state = status.last_run_state.value if status.last_run_state else ""
        run = f"{status.last_run_id or ''} {state}".strip()
        typer.echo(f"{status.name:<24} {status.spec:<32} {upcoming:<19}  {last:<19}  {run}")


@schedules_app.command("list")
def schedules_list(
    ledger_url: LedgerUrl = None,
    app_spec: AppSpec = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """List schedules: when each fires next, its last fire and that run's state; and which
    scheduler holds the lease."""
    try:
        jobs = _offload(ledger_url, app_spec)
        found = jobs.list_schedules_sync()
        lease = jobs.scheduler_lease_sync()
    except OffloadError as exc:
        raise _fail(exc, verbose) from None
    _print_schedules(found, as_json)
    if as_json:
        return
    if not found:
        typer.echo("no schedules; declare one with @jobs.periodic(cron=...) and pass --app")
    if lease is None or lease.expires_at.timestamp() < jobs.clock():
        typer.echo("no scheduler is running: start offload serve or offload beat MODULE:jobs")
    else:
        typer.echo(f"fired by scheduler {lease.holder} (lease until {lease.expires_at:%H:%M:%S})")


def _set_paused(
    name: str,
    paused: bool,
    ledger_url: str | None,
    app_spec: str | None,
    as_json: bool,
    verbose: bool,
) -> None:
    try:
        jobs = _offload(ledger_url, app_spec)
        status = jobs.pause_schedule_sync(name) if paused else jobs.resume_schedule_sync(name)
    except OffloadError as exc:
        raise _fail(exc, verbose) from None
    _print_schedules([status], as_json)


@schedules_app.command("pause")
def schedules_pause(
    name: ScheduleName,
    ledger_url: LedgerUrl = None,
    app_spec: AppSpec = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """Stop a schedule firing until it is resumed (survives restarts and deploys)."""
    _set_paused(name, True, ledger_url, app_spec, as_json, verbose)


@schedules_app.command("resume")
def schedules_resume(
    name: ScheduleName,
    ledger_url: LedgerUrl = None,
    app_spec: AppSpec = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """Let a paused schedule fire again from its next fire time (missed fires do not run)."""
    _set_paused(name, False, ledger_url, app_spec, as_json, verbose)


@schedules_app.command("run-now")
def schedules_run_now(
    name: ScheduleName,
    app_spec: AppSpec = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """Fire a schedule now, besides its timing: a run like its other fires."""
    if app_spec is None:
        raise typer.BadParameter(
            "running a schedule publishes a run of its task: pass --app MODULE:ATTRIBUTE "
            "(e.g. --app myapp.main:jobs) or set OFFLOAD_APP",
            param_hint="--app",
        )
    try:
        jobs = _offload(None, app_spec)
        handle = jobs.run_schedule_now_sync(name)
        status = jobs.status_sync(handle.id)
    except OffloadError as exc:
        raise _fail(exc, verbose) from None
    if as_json:
        typer.echo(status.model_dump_json(indent=2))
    else:
        typer.echo(f"schedule {name} fired now as run {handle.id}")


# --- queues ------------------------------------------------------------------------------------

QueueName = Annotated[str, typer.Argument(help="The queue's name (offload queues list).")]


def _print_queues(found: list[QueueStatus], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps([q.model_dump(mode="json") for q in found], indent=2))
        return
    typer.echo(f"{'queue':<24} {'state':<7} {'due':>7} {'held':>7}  oldest waiting")
    for queue in found:
        state = "paused" if queue.paused else "active"
        oldest = "" if queue.oldest_wait_s is None else f"{queue.oldest_wait_s:.1f}s"
        typer.echo(f"{queue.name:<24} {state:<7} {queue.due:>7} {queue.held:>7}  {oldest}")


@queues_app.command("list")
def queues_list(
    ledger_url: LedgerUrl = None,
    app_spec: AppSpec = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """List queues: runs due in each, runs held while it is paused, the oldest one's wait."""
    try:
        jobs = _offload(ledger_url, app_spec)
        jobs.check_ledger()
        found = jobs.list_queues_sync()
    except OffloadError as exc:
        raise _fail(exc, verbose) from None
    _print_queues(found, as_json)


@queues_app.command("pause")
def queues_pause(
    name: QueueName,
    ledger_url: LedgerUrl = None,
    app_spec: AppSpec = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """Pause a queue: workers start none of its runs (they wait in the ledger) until resumed."""
    try:
        status = _offload(ledger_url, app_spec).pause_queue_sync(name)
    except OffloadError as exc:
        raise _fail(exc, verbose) from None
    _print_queues([status], as_json)


@queues_app.command("resume")
def queues_resume(
    name: QueueName,
    ledger_url: LedgerUrl = None,
    app_spec: AppSpec = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """Resume a paused queue; the runs held meanwhile are published again."""
    try:
        status = _offload(ledger_url, app_spec).resume_queue_sync(name)
    except OffloadError as exc:
        raise _fail(exc, verbose) from None
    _print_queues([status], as_json)


@app.command()
def workers(
    ledger_url: LedgerUrl = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """List the worker processes that reported to the ledger lately (any broker)."""
    try:
        found = _offload(ledger_url).workers_sync()
    except OffloadError as exc:
        raise _fail(exc, verbose) from None
    if as_json:
        typer.echo(json.dumps([w.model_dump(mode="json") for w in found], indent=2))
        return
    if not found:
        typer.echo(
            "no worker is running (a worker that stops cleanly signs off; one that died shows "
            "as gone for an hour); start one with: offload worker MODULE:jobs"
        )
        return
    typer.echo(f"{'name':<28} {'state':<6} {'pool':<8} {'busy':>7}  {'last seen':<19}  queues")
    for w in found:
        state = "alive" if w.alive else "gone"
        busy = f"{w.running}/{w.concurrency}"
        typer.echo(
            f"{w.name:<28} {state:<6} {w.pool:<8} {busy:>7}  "
            f"{w.heartbeat_at:%Y-%m-%d %H:%M:%S}  {','.join(w.queues)}"
        )


def main() -> None:
    """Entry point of the `offload` script."""
    app()


if __name__ == "__main__":
    main()
