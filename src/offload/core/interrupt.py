"""Stopping a running task: raising an exception inside it.

`interrupt()` is shared by both lanes, and the inline lane's processes raise the same
exceptions. A task on its process's main thread (a prefork child runs its task there) gets the
exception from a signal handler, so sleeps and blocking calls are interrupted too; a task on
another thread gets an asynchronous exception, which it sees at its next Python instruction (a
blocking C call sees it when it returns). The durable lane's watchers (`lanes/durable/watch.py`)
decide when.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading

from offload.errors import TaskCancelledError, TaskTimeoutError

INTERRUPT_SIGNAL = signal.SIGUSR2
"""Delivers an interrupt to a task on its process's main thread."""


class SoftTimeoutExpired(TaskTimeoutError):
    """`TaskTimeoutError` raised in a running task when its soft timeout expires."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(args or ("soft timeout expired",)))


class CancelExpired(TaskCancelledError):
    """`TaskCancelledError` raised in a running task that ignored `cancel()`."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(args or ("cancelled: the task ignored ctx.cancelled too long",)))


INTERRUPTS = (SoftTimeoutExpired, CancelExpired)
"""What `interrupt()` raises; code that ends an attempt catches these around its bookkeeping."""

_main_pending: type[BaseException] | None = None


def _on_interrupt_signal(_signum: int, _frame: object) -> None:
    global _main_pending
    pending, _main_pending = _main_pending, None
    if pending is not None:
        raise pending()


def watch_thread(thread_id: int) -> None:
    """Prepare to interrupt `thread_id`; call it from that thread before the task starts."""
    if thread_id == threading.main_thread().ident:
        signal.signal(INTERRUPT_SIGNAL, _on_interrupt_signal)


def interrupt(thread_id: int, exc_type: type[BaseException]) -> None:
    """Raise `exc_type` in a thread of this process, soon."""
    global _main_pending
    if thread_id == threading.main_thread().ident:
        _main_pending = exc_type
        os.kill(os.getpid(), INTERRUPT_SIGNAL)
    else:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(thread_id), ctypes.py_object(exc_type)
        )


def clear_interrupt(thread_id: int) -> None:
    """Forget an interrupt that was sent to `thread_id` but not yet seen."""
    global _main_pending
    if thread_id == threading.main_thread().ident:
        _main_pending = None
    else:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), None)
