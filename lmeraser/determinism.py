"""Scoped determinism: a fixed torch thread count and deterministic kernels for a block, restored
on exit.

Torch's deterministic flag is process-wide, so concurrent blocks (clusters training in threads)
share one setting: a block that asks for the thread count already in force joins it; one that
asks for another waits until the others have left. The thread count itself is per calling thread
under OpenMP (`omp_set_num_threads`), so every block sets it in its own thread: a thread that
joined without setting it would train with the default count, and other bits. The last block out
restores what was there before, so a library call never leaves the process changed.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_state = threading.Condition()
_active = {"threads": 0, "depth": 0, "saved": None}


@contextlib.contextmanager
def deterministic(threads: int) -> Iterator[None]:
    """Run the block with `threads` intra-op threads and deterministic algorithms."""
    with _state:
        while _active["depth"] and _active["threads"] != threads:
            _state.wait()
        if not _active["depth"]:
            _active["saved"] = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
            torch.use_deterministic_algorithms(True)
            _active["threads"] = threads
        torch.set_num_threads(threads)
        _active["depth"] += 1
    try:
        yield
    finally:
        with _state:
            _active["depth"] -= 1
            if not _active["depth"]:
                saved_threads, saved_flag = _active["saved"]
                torch.set_num_threads(saved_threads)
                torch.use_deterministic_algorithms(saved_flag)
                _active["threads"] = 0
                _state.notify_all()
