"""Scoped determinism: a fixed torch thread count and deterministic kernels for a block, restored
on exit.

Torch's deterministic flag is process-wide, so concurrent blocks (clusters training in threads)
share one setting: a block that asks for the thread count already in force joins it; one that
asks for another waits until the others have left. The thread count itself is per calling thread
under OpenMP (`omp_set_num_threads`), so every block sets it in its own thread: a thread that
joined without setting it would train with the default count, and other bits. The last block out
restores what was there before, so a library call never leaves the process changed.

The same block fixes what CUDA needs besides (harmless on a CPU): cuDNN's deterministic kernels,
no autotuning (it picks kernels by timing) and no TF32, which rounds float32 matmuls differently
by GPU generation. A block for CUDA (`cuda=True`) also leaves attention to its plain matmul
kernel: the fused flash and memory-efficient kernels' backward accumulates with atomics (the CPU
honours the same switches, so a CPU block keeps its fused kernel and its bits). cuBLAS's
workspace is set once per process by lmeraser.compute.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_state = threading.Condition()
_active = {"mode": None, "depth": 0, "saved": None}


@contextlib.contextmanager
def deterministic(threads: int, cuda: bool = False) -> Iterator[None]:
    """Run the block with `threads` intra-op threads and deterministic algorithms (and, for a
    block on CUDA, deterministic attention)."""
    mode = (threads, cuda)
    with _state:
        while _active["depth"] and _active["mode"] != mode:
            _state.wait()
        if not _active["depth"]:
            saved_cuda = _cuda_flags()
            _active["saved"] = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), saved_cuda)
            torch.use_deterministic_algorithms(True)
            _set_cuda_flags((True, False, False, False, *((False, False, False) if cuda else saved_cuda[4:])))
            _active["mode"] = mode
        torch.set_num_threads(threads)
        _active["depth"] += 1
    try:
        yield
    finally:
        with _state:
            _active["depth"] -= 1
            if not _active["depth"]:
                saved_threads, saved_flag, saved_cuda = _active["saved"]
                torch.set_num_threads(saved_threads)
                torch.use_deterministic_algorithms(saved_flag)
                _set_cuda_flags(saved_cuda)
                _active["mode"] = None
                _state.notify_all()


def _cuda_flags() -> tuple[bool, ...]:
    cuda = torch.backends.cuda
    return (
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.allow_tf32,
        cuda.matmul.allow_tf32,
        cuda.flash_sdp_enabled(),
        cuda.mem_efficient_sdp_enabled(),
        cuda.cudnn_sdp_enabled(),
    )


def _set_cuda_flags(flags: tuple[bool, ...]) -> None:
    (
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
    ) = flags[:4]
    torch.backends.cuda.enable_flash_sdp(flags[4])
    torch.backends.cuda.enable_mem_efficient_sdp(flags[5])
    torch.backends.cuda.enable_cudnn_sdp(flags[6])
