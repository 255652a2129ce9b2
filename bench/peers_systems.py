"""The systems `bench/peers.py` compares: how to start, feed, ask and count each one.

Every system is driven the same way from the benchmark process: `connect()` builds its producer
client, `worker_commands()` are started in their own sessions, `send(tag)` enqueues one no-op
run and returns the system's own handle, `result(handle)` waits for it with the system's own
result API, and `stored()` counts the results stored so far (cheap: a Redis `DBSIZE`/`ZCARD`/
`HLEN` or one SQL count). The task bodies live in `bench/peers_apps/`.

Services: Redis databases 10-13 on 127.0.0.1:6379 (flushed before and after each system's
session; never the whole server) and a RabbitMQ vhost of this run's own, deleted and created
again around each session that uses it. One benchmark at a time: `bench/peers.py` holds a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import importlib.util
import math
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import IO, Any, ClassVar

import psutil
import redis

ROOT = Path(__file__).resolve().parent.parent
REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
REDIS_DBS = (10, 11, 12, 13)
BROKER_DB, RESULT_DB = 10, 11
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{BROKER_DB}"
RESULT_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{RESULT_DB}"
RABBIT_VHOST = f"offload-bench-peers-{os.getpid()}"  # this run's own; deleted at its end
AMQP_URL = f"amqp://guest:guest@127.0.0.1:5672/{RABBIT_VHOST}"


# --- services ------------------------------------------------------------------------------


def redis_reachable() -> bool:
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=2)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def rabbitmq_reachable() -> bool:
    if shutil.which("rabbitmqctl") is None:
        return False
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=2):
            return True
    except OSError:
        return False


def flush_redis() -> None:
    """Empty this benchmark's Redis databases (10-13), and only those."""
    for db in REDIS_DBS:
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
        try:
            client.flushdb()
        finally:
            client.close()


def _rabbitmqctl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, timeout=60, check=False
    )


def reset_vhost() -> None:
    """Delete and create again the benchmark's RabbitMQ vhost: no queue survives a session."""
    delete_vhost()
    for args in (
        ("add_vhost", RABBIT_VHOST),
        ("set_permissions", "-p", RABBIT_VHOST, "guest", ".*", ".*", ".*"),
    ):
        done = _rabbitmqctl(*args)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.decode().strip()}")


def delete_vhost() -> None:
    _rabbitmqctl("delete_vhost", RABBIT_VHOST)  # fails harmlessly when it does not exist


# --- measuring instruments -----------------------------------------------------------------


class Collector:
    """A datagram socket the tasks report their start time to (`peers_apps.common.notify`)."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "collector.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)

    def receive(self, timeout: float) -> tuple[str, float] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(256)
        except TimeoutError:
            return None
        tag, stamp = data.decode().split()
        return tag, float(stamp)

    def started(self, tag: str, timeout: float) -> float:
        """When the run tagged `tag` started its body (epoch seconds); skips other tags."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            got = self.receive(left)
            if got is not None and got[0] == tag:
                return got[1]
        raise TimeoutError(f"run {tag} never reported its start")

    def drain(self) -> None:
        while self.receive(0.0001) is not None:
            pass

    def close(self) -> None:
        self.sock.close()


def _die_with_parent() -> None:
    """In the child: SIGTERM when the benchmark dies, even by SIGKILL (Linux; else nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Workers:
    """The worker processes of one session, each started in its own session (process group).

    `stop()` sends SIGTERM to every group, then SIGKILL to whatever is left, including
    descendants that made their own session (offload's consumers do): they are remembered by
    `psutil.Process`, which refuses to signal a reused pid.
    """

    def __init__(self, log: IO[bytes]) -> None:
        self.log = log
        self.roots: list[subprocess.Popen[bytes]] = []
        self._seen: dict[int, psutil.Process] = {}

    def start(self, command: list[str], env: Mapping[str, str]) -> None:
        self.roots.append(
            subprocess.Popen(
                command,
                env=dict(env),
                cwd=ROOT,
                stdout=self.log,
                stderr=self.log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        )

    def tree(self) -> list[psutil.Process]:
        """Every live process of the workers (roots and all their descendants)."""
        found: list[psutil.Process] = []
        for popen in self.roots:
            with contextlib.suppress(psutil.NoSuchProcess):
                root = psutil.Process(popen.pid)
                found.append(root)
                found.extend(root.children(recursive=True))
        for process in found:
            self._seen.setdefault(process.pid, process)
        return found

    def exited(self) -> list[str]:
        return [f"{p.args!r} exited {p.returncode}" for p in self.roots if p.poll() is not None]

    def cpu_s(self) -> float:
        """User + system CPU of the tree, including its reaped children."""
        total = 0.0
        for process in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                times = process.cpu_times()
                total += times.user + times.system + times.children_user + times.children_system
        return total

    def memory_mb(self) -> dict[str, float]:
        """RSS, PSS and USS summed over the tree, in MB (PSS counts shared pages once)."""
        sums = {"processes": 0.0, "rss_mb": 0.0, "pss_mb": 0.0, "uss_mb": 0.0}
        for process in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                info = process.memory_full_info()
                sums["processes"] += 1
                sums["rss_mb"] += info.rss / 1e6
                sums["pss_mb"] += getattr(info, "pss", 0) / 1e6
                sums["uss_mb"] += info.uss / 1e6
        return sums

    def stop(self, timeout: float = 20.0) -> None:
        self.tree()  # remember every descendant before the roots go
        for popen in self.roots:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for popen in self.roots:
            try:
                popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGKILL)
                popen.wait(timeout=10)
        _, alive = psutil.wait_procs(list(self._seen.values()), timeout=5)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(alive, timeout=5)
        self.roots.clear()
        self._seen.clear()


def import_with_env(module: str, env: Mapping[str, str]) -> ModuleType:
    """Import `module` afresh with `os.environ` set to `env` (modules read config at import)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        sys.modules.pop(module, None)
        return importlib.import_module(module)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def base_env() -> dict[str, str]:
    """This process's environment without any OFFLOAD_* or BENCH_* setting it may carry."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OFFLOAD_", "BENCH_"))}
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --- the systems ---------------------------------------------------------------------------


class System:
    """One system under test. Subclasses fill in the class attributes and the methods."""

    name: ClassVar[str]
    kind: ClassVar[str]  # "offload", "celery" or "peer"
    services: ClassVar[frozenset[str]] = frozenset()  # of "redis", "rabbitmq"
    python_packages: ClassVar[tuple[str, ...]] = ()
    describe: ClassVar[str]  # layout and settings, for the report
    result_api: ClassVar[str]  # how `result()` waits, for the report

    def __init__(self, workdir: Path, collector_path: str) -> None:
        self.workdir = workdir
        self.env = base_env()
        self.env["BENCH_COLLECTOR"] = collector_path
        self.configure(self.env)

    @classmethod
    def missing(cls) -> str | None:
        """Why this system cannot run here, or None."""
        for package in cls.python_packages:
            if importlib.util.find_spec(package) is None:
                return f"Python package {package!r} is not installed (pip install -e '.[bench]')"
        if "redis" in cls.services and not redis_reachable():
            return f"no Redis at {REDIS_HOST}:{REDIS_PORT}"
        if "rabbitmq" in cls.services and not rabbitmq_reachable():
            return "no RabbitMQ on 127.0.0.1:5672 (or no rabbitmqctl)"
        return None

    def reset_services(self) -> None:
        if "redis" in self.services:
            flush_redis()
        if "rabbitmq" in self.services:
            reset_vhost()

    def cleanup_services(self) -> None:
        if "redis" in self.services:
            flush_redis()
        if "rabbitmq" in self.services:
            delete_vhost()

    def configure(self, env: dict[str, str]) -> None:
        """Add this system's settings to the environment of the workers and the producer."""

    def worker_commands(self) -> list[list[str]]:
        raise NotImplementedError

    def connect(self) -> None:
        raise NotImplementedError

    def send(self, tag: str) -> Any:
        raise NotImplementedError

    def produce(self, tags: list[str]) -> None:
        """The throughput producer: one plain loop of `send`."""
        send = self.send
        for tag in tags:
            send(tag)

    def result(self, handle: Any, timeout: float) -> Any:
        raise NotImplementedError

    def stored(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        """Release the producer's connections."""


def _script(name: str) -> str:
    """A console script of this venv (the one running the benchmark)."""
    return str(Path(sys.executable).with_name(name))


class OffloadSystem(System):
    kind = "offload"
    python_packages = ("offload",)
    broker: ClassVar[str]
    describe = (
        "`offload worker` defaults: supervisor + 2 consumer processes x 4 threads, acks late, "
        "prefetch 1, SQLite ledger"
    )
    result_api = "`handle.result_sync()`: polls the ledger from 2 ms, x1.5, up to 200 ms"

    def configure(self, env: dict[str, str]) -> None:
        env["OFFLOAD_DATA_DIR"] = str(self.workdir)
        if self.broker == "redis":
            env["OFFLOAD_BROKER_URL"] = REDIS_URL
        elif self.broker == "rabbitmq":
            env["OFFLOAD_BROKER_URL"] = AMQP_URL

    def worker_commands(self) -> list[list[str]]:
        return [[sys.executable, "-m", "offload", "worker", "bench.peers_apps.offload_app:jobs"]]

    def connect(self) -> None:
        module = import_with_env("bench.peers_apps.offload_app", self.env)
        self.jobs: Any = module.jobs
        self.noop: Any = module.noop

    def send(self, tag: str) -> Any:
        return self.noop.defer_sync(tag=tag)

    def result(self, handle: Any, timeout: float) -> Any:
        return handle.result_sync(timeout=timeout)

    def stored(self) -> int:
        from offload import RunState
        from offload.ledger import queries

        counts = self.jobs.ledger.read(queries.count_by_state)
        return int(counts.get(RunState.SUCCESS, 0))

    def close(self) -> None:
        self.jobs.close()


class OffloadSqlite(OffloadSystem):
    name = "offload-sqlite"
    broker = "sqlite"


class OffloadRedis(OffloadSystem):
    name = "offload-redis"
    broker = "redis"
    services = frozenset({"redis"})


class OffloadRabbitmq(OffloadSystem):
    name = "offload-rabbitmq"
    broker = "rabbitmq"
    services = frozenset({"rabbitmq"})


class CelerySystem(System):
    kind = "celery"
    python_packages = ("celery",)
    broker: ClassVar[str]
    describe = "raw Celery defaults, `-P prefork -c 2`, plus acks late and a result backend"

    def configure(self, env: dict[str, str]) -> None:
        if self.broker == "sqlite":
            env["BENCH_BROKER_URL"] = f"sqlite:///{self.workdir / 'broker.sqlite'}"
            env["BENCH_RESULT_URL"] = f"db+sqlite:///{self.workdir / 'results.sqlite'}"
        else:
            env["BENCH_BROKER_URL"] = REDIS_URL if self.broker == "redis" else AMQP_URL
            env["BENCH_RESULT_URL"] = RESULT_URL

    def worker_commands(self) -> list[list[str]]:
        return [
            [
                *(sys.executable, "-m", "celery", "-A", "bench.peers_apps.celery_app", "worker"),
                *("-P", "prefork", "-c", "2", "--loglevel=WARNING", "-n", "peers@%h"),
            ]
        ]

    def connect(self) -> None:
        module = import_with_env("bench.peers_apps.celery_app", self.env)
        self.app: Any = module.app
        self.task: Any = module.noop

    def send(self, tag: str) -> Any:
        return self.task.delay(tag)

    def result(self, handle: Any, timeout: float) -> Any:
        return handle.get(timeout=timeout)

    def stored(self) -> int:
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=RESULT_DB)
        try:
            return int(client.dbsize())
        finally:
            client.close()

    def close(self) -> None:
        self.app.close()


class CelerySqlite(CelerySystem):
    name = "celery-sqlite"
    broker = "sqlite"
    describe = (
        "raw Celery defaults, `-P prefork -c 2`, acks late; broker: offload's SQLite "
        "transport; results: Celery's database backend (`db+sqlite://`)"
    )
    result_api = "`AsyncResult.get(interval=0.002)`: polls the results table every 2 ms"

    def result(self, handle: Any, timeout: float) -> Any:
        return handle.get(timeout=timeout, interval=0.002)

    def stored(self) -> int:
        path = self.workdir / "results.sqlite"
        if not path.exists():
            return 0
        with contextlib.closing(sqlite3.connect(path, timeout=5)) as conn:
            try:
                row = conn.execute(
                    "SELECT count(*) FROM celery_taskmeta WHERE status = 'SUCCESS'"
                ).fetchone()
            except sqlite3.OperationalError:  # the table is created on first use
                return 0
        return int(row[0])


class CeleryRedis(CelerySystem):
    name = "celery-redis"
    broker = "redis"
    services = frozenset({"redis"})
    describe = "raw Celery defaults, `-P prefork -c 2`, acks late; Redis result backend"
    result_api = "`AsyncResult.get()`: Redis backend, pub/sub (no polling)"


class CeleryRabbitmq(CelerySystem):
    name = "celery-rabbitmq"
    broker = "rabbitmq"
    services = frozenset({"redis", "rabbitmq"})
    describe = "raw Celery defaults, `-P prefork -c 2`, acks late; Redis result backend"
    result_api = "`AsyncResult.get()`: Redis backend, pub/sub (no polling)"


class DramatiqRedis(System):
    name = "dramatiq-redis"
    kind = "peer"
    services = frozenset({"redis"})
    python_packages = ("dramatiq",)
    describe = (
        "`dramatiq --processes 2 --threads 8` (default threads), RedisBroker, default "
        "middleware + `Results(RedisBackend)`, `store_results=True`"
    )
    result_api = "`message.get_result(block=True)`: BRPOPLPUSH on the result key (no polling)"

    def configure(self, env: dict[str, str]) -> None:
        env["BENCH_BROKER_URL"] = REDIS_URL
        env["BENCH_RESULT_URL"] = RESULT_URL

    def worker_commands(self) -> list[list[str]]:
        app = "bench.peers_apps.dramatiq_app"
        return [[sys.executable, "-m", "dramatiq", app, "--processes", "2", "--threads", "8"]]

    def connect(self) -> None:
        module = import_with_env("bench.peers_apps.dramatiq_app", self.env)
        self.module: Any = module
        self.actor: Any = module.noop

    def send(self, tag: str) -> Any:
        return self.actor.send(tag)

    def result(self, handle: Any, timeout: float) -> Any:
        return handle.get_result(block=True, timeout=int(timeout * 1000))

    def stored(self) -> int:
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=RESULT_DB)
        try:
            return int(client.dbsize())
        finally:
            client.close()

    def close(self) -> None:
        self.module.broker.close()
        self.module.backend.client.close()


class Arq(System):
    name = "arq"
    kind = "peer"
    services = frozenset({"redis"})
    python_packages = ("arq",)
    describe = (
        "2 x `arq WorkerSettings` (max_jobs 10 each), tuned `poll_delay=0.01` (default 0.5 s)"
    )
    result_api = "`await job.result(poll_delay=0.005)`: polls Redis every 5 ms"

    def configure(self, env: dict[str, str]) -> None:
        env["BENCH_BROKER_URL"] = REDIS_URL

    def worker_commands(self) -> list[list[str]]:
        command = [sys.executable, "-m", "arq", "bench.peers_apps.arq_app.WorkerSettings"]
        return [command, command]

    def connect(self) -> None:
        from arq import create_pool

        module = import_with_env("bench.peers_apps.arq_app", self.env)
        self.loop = asyncio.new_event_loop()
        self.pool: Any = self.loop.run_until_complete(create_pool(module.REDIS))
        self.sent = 0
        self.counter = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=BROKER_DB)

    def send(self, tag: str) -> Any:
        job = self.loop.run_until_complete(self.pool.enqueue_job("noop", tag))
        self.sent += 1
        return job

    def produce(self, tags: list[str]) -> None:
        async def loop() -> None:
            enqueue = self.pool.enqueue_job
            for tag in tags:
                await enqueue("noop", tag)

        self.loop.run_until_complete(loop())
        self.sent += len(tags)

    def result(self, handle: Any, timeout: float) -> Any:
        from arq.jobs import ResultNotFound

        async def wait() -> Any:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    return await handle.result(timeout=timeout, poll_delay=0.005)
                except ResultNotFound:
                    # arq's result() reads the result and the queue in two round trips: a
                    # run finishing between them looks unknown. Ask again.
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.001)

        return self.loop.run_until_complete(wait())

    def stored(self) -> int:
        # arq removes a job from its queue in the same transaction that stores its result.
        return self.sent - int(self.counter.zcard("arq:queue"))

    def close(self) -> None:
        self.loop.run_until_complete(self.pool.aclose())
        self.loop.close()
        self.counter.close()


class Rq(System):
    name = "rq"
    kind = "peer"
    services = frozenset({"redis"})
    python_packages = ("rq",)
    describe = (
        "2 x `rq worker --worker-class rq.worker.SimpleWorker` (no fork per job; the "
        "default `Worker` forks one, ~19 ms CPU per job)"
    )
    result_api = "`job.latest_result(timeout=...)`: XREAD BLOCK on the result stream"

    def configure(self, env: dict[str, str]) -> None:
        env["BENCH_BROKER_URL"] = REDIS_URL

    def worker_commands(self) -> list[list[str]]:
        command = [_script("rq"), "worker", "--url", REDIS_URL, "--quiet"]
        command += ["--worker-class", "rq.worker.SimpleWorker", "default"]
        return [command, command]

    def connect(self) -> None:
        from rq import Queue

        self.client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=BROKER_DB)
        self.queue = Queue("default", connection=self.client)

    def send(self, tag: str) -> Any:
        return self.queue.enqueue("bench.peers_apps.rq_app.noop", tag)

    def result(self, handle: Any, timeout: float) -> Any:
        outcome = handle.latest_result(timeout=math.ceil(timeout))
        if outcome is None:
            raise TimeoutError(f"rq job {handle.id}: no result in {timeout}s")
        return outcome.return_value

    def stored(self) -> int:
        return int(self.queue.finished_job_registry.count)

    def close(self) -> None:
        self.client.close()


class HueySystem(System):
    kind = "peer"
    python_packages = ("huey",)
    backend: ClassVar[str]

    def configure(self, env: dict[str, str]) -> None:
        env["BENCH_HUEY"] = self.backend
        env["BENCH_HUEY_FILE"] = str(self.workdir / "huey.sqlite")
        env["BENCH_BROKER_URL"] = REDIS_URL

    def consumer_flags(self) -> list[str]:
        return []

    def worker_commands(self) -> list[list[str]]:
        command = [sys.executable, "-m", "huey.bin.huey_consumer", "bench.peers_apps.huey_app.huey"]
        return [[*command, "-w", "2", "-k", "process", "-q", *self.consumer_flags()]]

    def connect(self) -> None:
        module = import_with_env("bench.peers_apps.huey_app", self.env)
        self.huey: Any = module.huey
        self.task: Any = module.noop

    def send(self, tag: str) -> Any:
        return self.task(tag)

    def stored(self) -> int:
        return int(self.huey.storage.result_store_size())


class HueySqlite(HueySystem):
    name = "huey-sqlite"
    backend = "sqlite"
    describe = (
        "`huey_consumer -w 2 -k process`, SqliteHuey (WAL); tuned polling `-d 0.001 -m 0.01` "
        "(defaults 0.1 s, max 10 s)"
    )
    result_api = "`result.get(blocking=True, max_delay=0.002)`: polls SQLite every <= 2 ms"

    def consumer_flags(self) -> list[str]:
        return ["-d", "0.001", "-m", "0.01"]

    def result(self, handle: Any, timeout: float) -> Any:
        return handle.get(blocking=True, timeout=timeout, max_delay=0.002)


class HueyRedis(HueySystem):
    name = "huey-redis"
    backend = "redis"
    services = frozenset({"redis"})
    describe = "`huey_consumer -w 2 -k process`, RedisHuey (BRPOP), `notify_result=True`"
    result_api = "`result.get(blocking=True)`: BLPOP on a notify key (no polling)"

    def result(self, handle: Any, timeout: float) -> Any:
        return handle.get(blocking=True, timeout=timeout)

    def close(self) -> None:
        self.huey.storage.pool.disconnect()


SYSTEMS: dict[str, type[System]] = {
    cls.name: cls
    for cls in (
        OffloadSqlite,
        OffloadRedis,
        OffloadRabbitmq,
        CelerySqlite,
        CeleryRedis,
        CeleryRabbitmq,
        DramatiqRedis,
        Arq,
        Rq,
        HueySqlite,
        HueyRedis,
    )
}


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)
