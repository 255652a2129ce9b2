"""Wake-ups between the processes that share one SQLite broker file.

A consuming connection binds a UNIX datagram socket in ``<db>.wake/`` (or, when that path is too
long for a socket address, in a per-user directory under the temp dir named by a hash of the
database path, so every process derives the same one). After its commit a producer sends one
byte to every socket there: a socket nobody is bound to any more (its consumer died) refuses it
and is unlinked; a full one (wake-ups already pending) is skipped. Where AF_UNIX datagrams are
unavailable the consumer polls at 50 ms instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import selectors
import socket
import tempfile

__all__ = ["Waker", "wake_directory"]

logger = logging.getLogger(__name__)

_SUN_PATH_MAX = 103  # AF_UNIX path limit incl. NUL is 108 on Linux, 104 on macOS
_WAKE_NAME_MAX = 16  # "<pid up to 7 digits>-<8 hex>"


def wake_directory(db_path: str) -> str | None:
    if not hasattr(socket, "AF_UNIX"):
        return None
    real = os.path.realpath(db_path)
    directory = real + ".wake"
    if len(os.fsencode(directory)) + 1 + _WAKE_NAME_MAX <= _SUN_PATH_MAX:
        return directory
    # Too long for a socket address: every process derives the same short directory instead.
    digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:16]
    directory = os.path.join(tempfile.gettempdir(), f"offload-wake-{os.getuid()}", digest)
    if len(os.fsencode(directory)) + 1 + _WAKE_NAME_MAX <= _SUN_PATH_MAX:
        return directory
    return None


class Waker:
    """Datagram wake-ups between the processes sharing one broker file."""

    def __init__(self, directory: str | None) -> None:
        self.pid = os.getpid()
        self.directory = directory
        self.path: str | None = None
        self._listener: socket.socket | None = None
        self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if directory else None
        # An ack wakes its own consumer through a socketpair, from any thread or the loop itself.
        self._self_r, self._self_w = socket.socketpair()
        for sock in (self._sender, self._self_r, self._self_w):
            if sock is not None:
                sock.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._self_r, selectors.EVENT_READ)
        self.cleared = False  # no wait() since the last clear(): select() would see new ones

    @property
    def is_listening(self) -> bool:
        """Whether producers can reach us (a stat(): `listen()` checks it, not every wait)."""
        return self.path is not None and os.path.exists(self.path)

    def listen(self) -> None:
        """Bind our socket, or bind it again if its file was removed (a cleaned temp dir)."""
        if self.directory is None or self.is_listening:
            return
        self._unlisten()
        path = os.path.join(self.directory, f"{self.pid}-{secrets.token_hex(4)}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            parent = os.path.dirname(self.directory)
            if os.path.basename(parent).startswith("offload-wake-"):
                os.makedirs(parent, mode=0o700, exist_ok=True)  # the /tmp fallback is per user
            os.makedirs(self.directory, exist_ok=True)
            sock.setblocking(False)
            sock.bind(path)
        except OSError:
            sock.close()
            logger.warning(
                "cannot bind a wake-up socket in %s; the consumer polls instead",
                self.directory,
                exc_info=True,
            )
            return
        self._listener, self.path = sock, path
        self._selector.register(sock, selectors.EVENT_READ)

    def notify_all(self) -> None:
        if self.directory is None or self._sender is None:
            return
        try:
            names = os.listdir(self.directory)
        except OSError:
            return  # no consumer has listened yet
        for name in names:
            path = os.path.join(self.directory, name)
            try:
                self._sender.sendto(b"\0", path)
            except BlockingIOError:
                pass  # its queue is full: it has wake-ups pending anyway
            except ConnectionRefusedError:
                with contextlib.suppress(OSError):
                    os.unlink(path)  # nobody is bound to it: its consumer died
            except FileNotFoundError:
                pass  # unlinked meanwhile
            except OSError:  # not ours to write, say: that consumer polls at its cap
                logger.debug("cannot wake the consumer at %s", path, exc_info=True)

    def filenos(self) -> tuple[int, ...]:
        """The sockets a wake-up arrives on, for an event loop to watch; they change on rebind."""
        return tuple(s.fileno() for s in (self._listener, self._self_r) if s is not None)

    def notify_self(self) -> None:
        with contextlib.suppress(OSError):
            self._self_w.send(b"\0")

    def clear(self, fileno: int | None = None) -> None:
        """Read the pending wake-ups: of every socket, or only of the one an event loop saw."""
        self.cleared = True
        for sock in (self._listener, self._self_r):
            if sock is None or (fileno is not None and sock.fileno() != fileno):
                continue
            with contextlib.suppress(OSError):
                while sock.recv(512):
                    pass

    def wait(self, timeout: float) -> None:
        self._selector.select(timeout)
        self.cleared = False

    def _unlisten(self) -> None:
        if self._listener is not None:
            self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None
        if self.path is not None and self.pid == os.getpid():
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        self.path = None

    def close(self) -> None:
        self._unlisten()
        self._selector.close()
        for sock in (self._sender, self._self_r, self._self_w):
            if sock is not None:
                sock.close()
