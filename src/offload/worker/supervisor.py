"""Worker processes: the supervisor behind `offload worker` and `offload serve`.

The supervisor starts Celery workers as child processes and starts them again when they die
(a hard timeout ends its process on purpose): `worker_processes` consumers with a thread pool
for I/O tasks, and one prefork consumer for `cpu_bound` tasks. Several single-threaded
consumers drain more runs per second than one prefork parent, which does every broker round
trip itself (~650 runs/s for one consumer, ~1,300/s for two; `docs/architecture.md`).

`low_priority` makes the workers yield the CPU to the API process on the same machine:
their own scheduling group (session autogroup, nice 19) and the idle scheduling policy.

A supervisor with no thread of its own forks its consumers: they start with the app already
imported (no second of imports per consumer, and per restart after a hard timeout) and share
its pages. A supervisor that runs threads (`offload serve` once uvicorn runs) starts them as
fresh interpreters instead, because a fork copies locks that other threads hold.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

from offload.errors import ConfigurationError
from offload.worker.child import run_celery_worker

if TYPE_CHECKING:
    from offload.app import Offload

logger = logging.getLogger("offload.worker")


@dataclass
class _Child:
    name: str
    pool: str
    concurrency: int
    queues: list[str]
    hostname: str
    process: subprocess.Popen[bytes] | _Forked | None = None
    restarts: int = 0


class _Forked:
    """A consumer forked from the supervisor: the part of `Popen` the supervisor uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: gone all the same
                self.returncode = -1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"consumer pid {self.pid}", timeout or 0.0)
            time.sleep(0.05)
        return code

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)


class Supervisor:
    """Starts the worker processes for one Offload and keeps them running until stopped."""

    def __init__(
        self,
        spec: str,
        jobs: Offload,
        *,
        queues: Sequence[str] | None = None,
        loglevel: str = "WARNING",
        low_priority: bool = False,
        shutdown_timeout_s: float = 30.0,
        stdout: IO[bytes] | None = None,
    ) -> None:
        self.spec = spec
        self.jobs = jobs
        self.shutdown_timeout_s = shutdown_timeout_s
        self.stdout = stdout
        self._stopping = False
        settings = jobs.settings
        io_queues = jobs.durable.queues(cpu_bound=False)
        cpu_queues = jobs.durable.queues(cpu_bound=True)
        if queues:
            wanted = set(queues)
            io_queues = [q for q in io_queues if q in wanted]
            cpu_queues = [q for q in cpu_queues if q.removesuffix(".cpu") in wanted or q in wanted]
        self.loglevel = loglevel
        self.low_priority = low_priority
        self.children: list[_Child] = []
        for index in range(settings.worker_processes if io_queues else 0):
            name = f"io{index}"
            self.children.append(
                _Child(name, "threads", settings.worker_threads, io_queues, self._hostname(name))
            )
        if cpu_queues:
            self.children.append(
                _Child(
                    "cpu",
                    "prefork",
                    settings.worker_cpu_processes,
                    cpu_queues,
                    self._hostname("cpu"),
                )
            )
        if not self.children:
            raise ConfigurationError(f"{spec}: no queue to consume (queues={list(queues or [])})")

    @staticmethod
    def _hostname(name: str) -> str:
        return f"{name}-{os.getpid()}@%h"

    def start(self) -> None:
        """Start every worker process."""
        earlier = self.jobs.durable.earlier_broker_file()
        if earlier is not None:
            logger.warning(
                "%s holds %d message(s) of an earlier offload, which kept the broker apart "
                "from the ledger; their runs are in the ledger, and workers publish them again "
                "within OFFLOAD_ORPHAN_AFTER_S (%gs); delete the file after that",
                *earlier,
                self.jobs.settings.orphan_after_s,
            )
        for child in self.children:
            self._spawn(child)

    def _spawn(self, child: _Child) -> None:
        if threading.active_count() == 1:
            child.process = self._fork(child)
        else:
            child.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "offload.worker",
                    self.spec,
                    f"--pool={child.pool}",
                    f"--concurrency={child.concurrency}",
                    f"--queues={','.join(child.queues)}",
                    f"--hostname={child.hostname}",
                    f"--loglevel={self.loglevel}",
                    *(["--low-priority"] if self.low_priority else []),
                ],
                env={**os.environ, **self.jobs.settings.as_env()},
                start_new_session=True,
                stdout=self.stdout,
                stderr=self.stdout,
            )
        logger.info("worker %s started (pid %d)", child.name, child.process.pid)

    def _fork(self, child: _Child) -> _Forked:
        """Fork `child`'s consumer from this (single-threaded) process, in its own session."""
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # or the child writes the parent's buffered lines again
        pid = os.fork()
        if pid:
            return _Forked(pid)
        code = 1
        try:
            os.setsid()
            if self.stdout is not None:
                os.dup2(self.stdout.fileno(), 1)
                os.dup2(self.stdout.fileno(), 2)
            os.environ.update(self.jobs.settings.as_env())
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, signal.SIG_DFL)
            # Celery sets up the consumer's logging, as it does in a fresh process.
            logging.root.handlers.clear()
            run_celery_worker(
                self.spec,
                pool=child.pool,
                concurrency=child.concurrency,
                queues=child.queues,
                hostname=child.hostname,
                loglevel=self.loglevel,
                low_priority=self.low_priority,
            )
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except BaseException:  # noqa: BLE001 - printed, then the child exits 1
            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(code)

    def poll(self) -> None:
        """Start again every worker process that exited while we are not stopping."""
        for child in self.children:
            process = child.process
            if self._stopping or process is None or process.poll() is None:
                continue
            child.restarts += 1
            logger.warning(
                "worker %s (pid %d) exited with %s; starting it again",
                child.name,
                process.pid,
                process.returncode,
            )
            self._spawn(child)

    def stop(self) -> None:
        """Warm shutdown: SIGTERM, wait up to `shutdown_timeout_s`, then SIGKILL."""
        self._stopping = True
        running = [c.process for c in self.children if c.process and c.process.poll() is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.shutdown_timeout_s
        for process in running:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning(
                    "worker pid %d did not stop in %.0fs; killing it (its runs will "
                    "be delivered again)",
                    process.pid,
                    self.shutdown_timeout_s,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def run_forever(self) -> int:
        """Start, keep alive until SIGTERM or SIGINT, then stop. Returns an exit status."""
        received: list[int] = []

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            received.append(signum)

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not received:
                time.sleep(0.2)
                self.poll()
        finally:
            self.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return 0


@contextlib.contextmanager
def embedded_worker_lock(data_dir: Path) -> Any:
    """Hold `data_dir/embedded-worker.lock`; yields False if another process holds it.

    Several `offload serve` processes (or uvicorn reloads) on one data directory then start
    one embedded worker between them, not one each.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "embedded-worker.lock", "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
