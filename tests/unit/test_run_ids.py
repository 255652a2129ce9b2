"""Run ids: uuid4-like, and never shared by two threads or by a parent and its forked child."""

from __future__ import annotations

import os
import re
import threading

from offload.core.run import new_run_id


def test_run_ids_are_32_hex_digits_and_do_not_repeat() -> None:
    ids = [new_run_id() for _ in range(5000)]  # crosses several urandom refills
    assert all(re.fullmatch(r"[0-9a-f]{32}", run_id) for run_id in ids)
    assert len(set(ids)) == len(ids)


def test_threads_and_a_forked_child_never_hand_out_the_same_id() -> None:
    new_run_id()  # the parent's buffer now holds bytes a careless child would reuse
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write its next ids, leave without running any cleanup
        try:
            os.write(write_end, "".join(new_run_id() for _ in range(300)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    parent_ids = [new_run_id() for _ in range(300)]
    from_threads: list[str] = []

    def take() -> None:
        from_threads.extend(new_run_id() for _ in range(300))

    thread = threading.Thread(target=take)
    thread.start()
    thread.join()
    with os.fdopen(read_end, "rb") as pipe:
        text = pipe.read().decode()
    os.waitpid(pid, 0)
    child_ids = [text[i : i + 32] for i in range(0, len(text), 32)]
    assert len(child_ids) == 300
    everything = parent_ids + child_ids + from_threads
    assert len(set(everything)) == len(everything)
