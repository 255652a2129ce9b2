"""The `offload` command: a thin layer over the public API.

Exit status: 0 success, 1 failure, 2 usage error. Errors are one line plus a hint; `-v`
shows tracebacks.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

import typer

from offload.core.run import RunState, RunStatus
from offload.errors import OffloadError

if TYPE_CHECKING:
    from offload.app import Offload

app = typer.Typer(
    help="offload: background work for FastAPI. Run the API with an embedded worker, "
    "run workers, and look at runs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
runs_app = typer.Typer(help="Look at runs in the ledger.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")

Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log more; show tracebacks.")]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
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
    verbose: Verbose = False,
) -> None:
    """Run worker processes for the durable lane until SIGTERM or Ctrl-C.

    Starts OFFLOAD_WORKER_PROCESSES thread-pool consumers for I/O tasks and one prefork
    consumer for cpu_bound tasks, and restarts any that die. The broker and ledger come
    from OFFLOAD_BROKER_URL and OFFLOAD_LEDGER_URL (or the Offload(...) arguments).
    """
    from offload.worker import Supervisor, load_offload

    _setup_logging(verbose)
    try:
        jobs = load_offload(spec)
        jobs.ledger.ensure_schema()
        supervisor = Supervisor(
            spec,
            jobs,
            queues=queues,
            loglevel="INFO" if verbose else "WARNING",
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
    verbose: Verbose = False,
) -> None:
    """Run the API with uvicorn plus an embedded worker: one command, no services needed.

    With no OFFLOAD_BROKER_URL the durable lane uses SQLite files in OFFLOAD_DATA_DIR
    (./offload-data). Several `offload serve` processes on one data directory start one
    embedded worker between them.
    """
    import uvicorn

    from offload.worker import Supervisor, embedded_worker_lock, load_offload

    _setup_logging(verbose)
    module = spec.partition(":")[0]
    worker_spec = jobs_spec or module
    try:
        jobs = load_offload(worker_spec)
        jobs.ledger.ensure_schema()
    except OffloadError as exc:
        raise _fail(exc, verbose) from None
    with embedded_worker_lock(jobs.settings.data_dir) as owner:
        supervisor = None
        if embedded_worker and owner:
            supervisor = Supervisor(worker_spec, jobs, low_priority=True)
            supervisor.start()
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
        try:
            uvicorn.run(spec, host=host, port=port, log_level="info" if verbose else "warning")
        finally:
            if supervisor is not None:
                stop.set()
                supervisor.stop()


def _settings_offload(ledger_url: str | None) -> Offload:
    """An `Offload` with no tasks over an existing ledger, for commands that only read it."""
    from offload.app import Offload

    jobs = Offload(ledger_url=ledger_url)
    jobs.check_ledger()
    return jobs


LedgerUrl = Annotated[
    str | None,
    typer.Option(
        "--ledger-url",
        help="Ledger database URL (default: OFFLOAD_LEDGER_URL or the SQLite file "
        "in OFFLOAD_DATA_DIR).",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _utc(moment: datetime | None) -> datetime | None:
    """A time from the command line; one without a zone is UTC, as the tables print."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def _row(status: RunStatus) -> str:
    progress = f"{status.progress.fraction:.0%}" if status.progress else ""
    dead = " dead" if status.dead else ""
    return (
        f"{status.id}  {status.task:<24} {status.state.value:<9}{dead:<5} "
        f"{status.attempts:>3}  {progress:>4}  {status.created_at:%Y-%m-%d %H:%M:%S}  "
        f"{status.error or ''}"
    )


@runs_app.command("list")
def runs_list(
    state: Annotated[list[RunState] | None, typer.Option(help="Only runs in these states.")] = None,
    task: Annotated[str | None, typer.Option(help="Only runs of this task.")] = None,
    queue: Annotated[str | None, typer.Option(help="Only runs of this queue.")] = None,
    dead: Annotated[bool, typer.Option("--dead", help="Only dead runs.")] = False,
    since: Annotated[
        datetime | None, typer.Option(help="Only runs deferred at or after this time (UTC).")
    ] = None,
    until: Annotated[
        datetime | None, typer.Option(help="Only runs deferred before this time (UTC).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many, newest first.")] = 20,
    ledger_url: LedgerUrl = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """List runs, newest first."""
    try:
        jobs = _settings_offload(ledger_url)
        page = jobs.list_runs_sync(
            states=state or (),
            task=task,
            queue=queue,
            dead=dead or None,
            created_after=_utc(since),
            created_before=_utc(until),
            limit=limit,
        )
    except OffloadError as exc:
        raise _fail(exc, verbose) from None
    if as_json:
        typer.echo(json.dumps([r.model_dump(mode="json") for r in page.runs], indent=2))
        return
    typer.echo(f"{'id':<32}  {'task':<24} {'state':<14} try  prog  created              error")
    for status in page.runs:
        typer.echo(_row(status))


@runs_app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(help="The run id.")],
    ledger_url: LedgerUrl = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """Show one run with every attempt."""
    try:
        run = _settings_offload(ledger_url).get_run_sync(run_id)
    except OffloadError as exc:
        raise _fail(exc, verbose) from None
    if as_json:
        typer.echo(json.dumps(run.model_dump(mode="json"), indent=2))
        return
    typer.echo(_row(run))
    for attempt in run.attempt_history:
        typer.echo(
            f"  attempt {attempt.number}: {attempt.outcome or 'running'} on "
            f"{attempt.worker} at {attempt.started_at:%H:%M:%S}  {attempt.error or ''}"
        )


@app.command()
def workers(
    ledger_url: LedgerUrl = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """List the worker processes that reported to the ledger lately (any broker)."""
    try:
        found = _settings_offload(ledger_url).workers_sync()
    except OffloadError as exc:
        raise _fail(exc, verbose) from None
    if as_json:
        typer.echo(json.dumps([w.model_dump(mode="json") for w in found], indent=2))
        return
    if not found:
        typer.echo(
            "no worker reported in the last hour; start one with: offload worker MODULE:jobs"
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
