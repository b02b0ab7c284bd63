"""Deterministic per-cluster prompt training and the content-addressed artifact store.

Invariant 3: `prompt_k = train(backbone, members_k sorted by id, config, seed(global_seed, k))`,
an independent, seeded, pure function with a fixed thread count. Invariant 4: each artifact is
stored under the hash of everything that determines it, so re-running the stage after a deletion
retrains exactly the clusters whose inputs changed: unlearning and training share this code path.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import lmeraser
from lmeraser.config import PromptParams
from lmeraser.errors import LmeraserError
from lmeraser.io import atomic_path, canonical_json, sha256_file, sha256_json
from lmeraser.models.prompts import PromptedClassifier, init_peft

# The modules whose source determines a trained artifact: a change to any of them invalidates
# every stored prompt; a change elsewhere (CLI, flows, docs) does not.
_TRAINING_CODE = ("training.py", "models/prompts.py", "models/backbone.py")


def code_version() -> str:
    root = Path(lmeraser.__file__).parent
    digest = hashlib.sha256()
    for name in _TRAINING_CODE:
        digest.update(name.encode() + b"\0" + (root / name).read_bytes())
    return digest.hexdigest()[:16]


def cluster_seed(global_seed: int, cluster: int | str) -> int:
    """A per-cluster seed that depends on nothing but (global seed, cluster id)."""
    return int.from_bytes(hashlib.sha256(f"{global_seed}:{cluster}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def members_digest(sample_ids: Sequence[str], content_hashes: Sequence[str], labels: Sequence[int]) -> str:
    digest = hashlib.sha256()
    for sid, chash, label in zip(sample_ids, content_hashes, labels):
        digest.update(f"{sid}:{chash}:{int(label)}\n".encode())
    return digest.hexdigest()


def artifact_key(
    *,
    members: str,
    backbone_sha256: str,
    prompt: PromptParams,
    num_classes: int,
    seed: int,
    threads: int,
    extra: dict | None = None,
) -> str:
    """Hash of everything that determines a cluster's trained prompt (invariant 4)."""
    return sha256_json(
        {
            "members": members,
            "backbone": backbone_sha256,
            "prompt": prompt.model_dump(),
            "num_classes": num_classes,
            "seed": seed,
            "threads": threads,
            "code": code_version(),
            "torch": torch.__version__,
            "extra": extra or {},
        }
    )


_TORCH_LOCK = threading.Lock()


@contextlib.contextmanager
def deterministic_torch(threads: int) -> Iterator[None]:
    """Fixed intra-op thread count and deterministic kernels for the duration of a training."""
    with _TORCH_LOCK:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
    yield


def train_prompt(
    backbone: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    params: PromptParams,
    num_classes: int,
    seed: int,
    threads: int = 1,
) -> dict[str, torch.Tensor]:
    """Train one prompt + head on (x, y), which must already be ordered by sample id.

    All randomness comes from a private generator seeded with `seed` (never the global RNG),
    so concurrent trainings in threads cannot disturb each other.
    """
    if len(y) == 0:
        raise LmeraserError("cannot train a prompt on an empty cluster.")
    with deterministic_torch(threads):
        generator = torch.Generator().manual_seed(seed)
        model = PromptedClassifier(backbone, params, num_classes)
        init_peft(model, generator)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay)
        total = params.epochs * math.ceil(len(y) / params.batch_size)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
        for _ in range(params.epochs):
            order = torch.randperm(len(y), generator=generator)
            for start in range(0, len(y), params.batch_size):
                idx = order[start : start + params.batch_size]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        return {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}


def load_prompt(backbone: torch.nn.Module, params: PromptParams, num_classes: int, state: dict[str, torch.Tensor]) -> PromptedClassifier:
    model = PromptedClassifier(backbone, params, num_classes)
    model.load_state_dict(state)
    model.eval()
    return model


@dataclass(frozen=True)
class StoredArtifact:
    key: str
    path: Path
    sha256: str


class ArtifactStore:
    """Prompt artifacts as `<root>/<key>.safetensors`, written atomically, never modified."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).exists()

    def save(self, key: str, state: dict[str, torch.Tensor], meta: dict) -> StoredArtifact:
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path(key)) as tmp:
            # One metadata entry only: safetensors writes a multi-key metadata map in hash order,
            # which would make the bytes differ between runs.
            save_file(state, str(tmp), metadata={"lmeraser": canonical_json(meta).decode()})
        return StoredArtifact(key, self.path(key), sha256_file(self.path(key)))

    def load(self, key: str) -> dict[str, torch.Tensor]:
        if not self.has(key):
            raise LmeraserError(f"{self.path(key)}: prompt artifact missing from the store; re-run the train stage.")
        return load_file(str(self.path(key)))

    def keys(self) -> set[str]:
        return {p.name.removesuffix(".safetensors") for p in self.root.glob("*.safetensors")} if self.root.exists() else set()

    def prune(self, keep: set[str]) -> list[str]:
        """Delete every artifact not in `keep` (superseded prompts must not survive)."""
        removed = sorted(self.keys() - keep)
        for key in removed:
            self.path(key).unlink()
        return removed


def to_tensors(x: np.ndarray | torch.Tensor, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return (x if isinstance(x, torch.Tensor) else torch.from_numpy(x)), torch.from_numpy(np.asarray(y, dtype=np.int64))
