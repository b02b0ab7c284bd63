"""Where a computation runs: the device, the torch thread count and the precision, and what each
needs to be deterministic.

A workspace computes on one device (`runtime.device`), fixed when the backbone stage runs and
recorded with the backbone (artifacts/backbone/backbone.json): every pass over the backbone
(features, prompt training, serving, the influence path, replay) runs there, so a change of
device re-runs the pipeline (DVC tracks it as a param of the backbone stage), and a workspace made
on a GPU is refused, in one sentence, on a machine without one. The device's identity (its name,
CUDA's and cuDNN's versions) and the precision are part of every artifact key, cache key and
lineage record, because they change the bits.

On CUDA, determinism also needs cuBLAS's fixed workspace (CUBLAS_WORKSPACE_CONFIG, read when
cuBLAS starts, so set before the first CUDA call), cuDNN's deterministic kernels, TF32 off and
attention's plain kernel; lmeraser.determinism sets the latter with torch's deterministic
algorithms. And a row's result must not depend on the rows batched with it (the feature cache
and the assignment of a sample rely on it), so every feature batch, on every device, is padded to
the full batch size rounded up to 8 rows (`Compute.padded_rows`): cuBLAS picks its kernel by the
matrix's shape, and so, by the row count, does MKL's COMPATIBLE branch, which portable numerics pin.

`precision: bf16` runs the backbone's passes (backbone training, features, prompt training and
serving) under bf16 autocast, for big backbones; trainable parameters, optimiser state and
outputs stay float32. The influence path computes in its own `influence.dtype`, without autocast.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from lmeraser import numerics
from lmeraser.errors import ConfigError

CUBLAS_WORKSPACE = ":4096:8"  # one of the two settings cuBLAS documents as deterministic
ROW_MULTIPLE = 8  # every feature batch is padded to a multiple of this many rows (Compute.padded_rows)


@dataclass(frozen=True)
class Compute:
    device: str = "cpu"  # cpu, cuda or cuda:N
    threads: int = 1  # intra-op CPU threads (also what feeds a GPU)
    precision: str = "float32"  # float32 | bf16 (autocast of the backbone's passes)
    # portable | native (lmeraser/numerics.py), checked before computing; None: whatever this
    # process runs, unchecked (a library caller's own computation, the fingerprint)
    numerics: str | None = None

    @classmethod
    def of(cls, meta) -> Compute:
        """Where passes over a backbone run (its `BackboneMeta`): its device, precision, numerics
        and threads."""
        return cls(meta.device, meta.threads, meta.precision, meta.numerics)

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def cuda_index(self) -> int:
        return self.torch_device.index or 0

    def check(self, source: str = "runtime.device") -> Compute:
        """Refuse, in one sentence naming `source`, a device this machine does not have, or
        numerics this process does not run; on CUDA, fix cuBLAS's workspace before anything
        starts it."""
        self.require_numerics()
        if self.is_cuda:
            if not torch.cuda.is_available():
                built = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", built without CUDA")
                hint = (
                    "set runtime.device: cpu to run on the CPU"
                    if source == "runtime.device"
                    else "run it on a machine with that device"
                )
                raise ConfigError(
                    f"{source} is {self.device}, but torch sees no CUDA device on this machine ({built}); {hint}."
                )
            if self.cuda_index >= torch.cuda.device_count():
                raise ConfigError(
                    f"{source} is {self.device}, but this machine has {torch.cuda.device_count()} CUDA device(s)."
                )
            # Kept for the process: cuBLAS reads it once, when its first handle is created.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        return self

    def require_numerics(self) -> None:
        """Refuse to compute under numerics other than the ones asked for (lmeraser/numerics.py)."""
        if self.numerics is not None:
            numerics.require(self.numerics)

    def padded_rows(self, rows: int, batch_size: int) -> int:
        """How many rows a batch of `rows` (at most `batch_size`) is padded to, so that no row's
        bits depend on the others: one shape, whatever the batch holds. cuBLAS picks its kernel by
        the matrix's shape; MKL's COMPATIBLE branch (which portable numerics pin) computes rows
        by another kernel when the row count is not a multiple of 8, and small matrices by
        another again (measured): so every batch is the full batch size, rounded up to 8."""
        return -(-max(rows, batch_size) // ROW_MULTIPLE) * ROW_MULTIPLE

    def with_threads(self, threads: int) -> Compute:
        return replace(self, threads=threads)

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.torch_device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast of a forward pass when the precision asks for it, else nothing."""
        return torch.autocast("cuda" if self.is_cuda else "cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def adamw(self, params, lr: float, weight_decay: float) -> torch.optim.AdamW:
        """AdamW, with torch's fused kernel on the CPU: one ATen kernel that ATEN_CPU_CAPABILITY
        (a portable pin) selects. The default per-tensor path takes its square root through MKL's
        vector math, whose bits differ between CPUs even under MKL_CBWR=COMPATIBLE (measured: an
        Intel Xeon and an AMD EPYC). Elsewhere (CUDA), torch's default."""
        return torch.optim.AdamW(
            params, lr=lr, weight_decay=weight_decay, fused=self.torch_device.type == "cpu" or None
        )

    @contextlib.contextmanager
    def scope(self) -> Iterator[Compute]:
        """The block runs with this thread count and deterministic kernels (lmeraser.determinism)."""
        from lmeraser.determinism import deterministic

        self.require_numerics()
        with deterministic(self.threads, cuda=self.is_cuda):
            yield self

    @property
    def faiss_gpu(self) -> int | None:
        """The GPU FAISS runs k-means and routing on: this device when it is CUDA and the faiss
        installed is a GPU build that sees it (faiss-gpu), else None (faiss-cpu)."""
        if not self.is_cuda:
            return None
        import faiss

        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() <= self.cuda_index:
            return None
        return self.cuda_index


CPU = Compute()  # the default: the CPU, one thread, float32


@torch.no_grad()
def seeded_uniform_(tensor: torch.Tensor, bound: float, generator: torch.Generator) -> None:
    """Fill `tensor` with U(-bound, bound) drawn from a CPU `generator`, whatever the tensor's
    device: the draw, and so a prompt's initial value, is the same on every device."""
    tensor.copy_(torch.empty(tensor.shape, dtype=tensor.dtype).uniform_(-bound, bound, generator=generator))
