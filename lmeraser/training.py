"""Deterministic per-cluster prompt training and the keys that address its artifacts.

Invariant 3: `prompt_k = train(backbone, members_k sorted by id, config, seed(global_seed, k))`,
an independent, seeded, pure function with a fixed thread count. Invariant 4: each artifact is
stored under the hash of everything that determines it, so re-running the stage after a deletion
retrains exactly the clusters whose inputs changed: unlearning and training share this code path.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lmeraser.code_identity import code_version, library_versions
from lmeraser.compute import CPU, Compute
from lmeraser.config import PromptParams
from lmeraser.errors import LmeraserError
from lmeraser.fingerprint import identity
from lmeraser.io import sha256_json
from lmeraser.models.prompts import PromptedClassifier, init_peft

# Bumped when the structure of the key changes; the train stage says how many artifacts a
# change re-keyed, and why.
KEY_FORMAT = 4  # 3: the compute (device, its name, precision) joined the key; 4: numerics, pins, fingerprint


def cluster_seed(global_seed: int, cluster: int | str) -> int:
    """A per-cluster seed that depends on nothing but (global seed, cluster id)."""
    return int.from_bytes(hashlib.sha256(f"{global_seed}:{cluster}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def members_digest(sample_ids: Sequence[str], content_hashes: Sequence[str], labels: Sequence[int]) -> str:
    digest = hashlib.sha256()
    for sid, chash, label in zip(sample_ids, content_hashes, labels):
        digest.update(f"{sid}:{chash}:{int(label)}\n".encode())
    return digest.hexdigest()


def key_inputs(
    *, backbone_sha256: str, prompt: PromptParams, num_classes: int, compute: Compute, extra: dict | None = None
) -> dict:
    """What every cluster's key shares: recorded in the prompt index, so that a later run can say
    which of them changed when it re-keys artifacts."""
    return {
        "key_format": KEY_FORMAT,
        "backbone": backbone_sha256,
        "prompt": prompt.identity(),
        "num_classes": num_classes,
        "threads": compute.threads,
        "compute": identity(compute),
        "code": code_version(prompt.kind),
        "versions": library_versions(),
        "extra": extra or {},
    }


def artifact_key(shared: dict, members: str, seed: int) -> str:
    """Hash of everything that determines a cluster's trained prompt (invariant 4)."""
    return sha256_json({**shared, "members": members, "seed": seed})


def train_prompt(
    backbone: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    prompt: PromptParams,
    num_classes: int,
    seed: int,
    compute: Compute = CPU,
) -> dict[str, torch.Tensor]:
    """Train one PEFT module + head on (x, y), which must already be ordered by sample id, on
    `compute` (the backbone already on its device); returns the state in host memory.

    All randomness comes from a private CPU generator seeded with `seed` (never the global RNG),
    so concurrent trainings in threads cannot disturb each other and every device draws the same.
    """
    if len(y) == 0:
        raise LmeraserError("cannot train a prompt on an empty cluster.")
    cfg = prompt.adapter
    with compute.scope():
        generator = torch.Generator().manual_seed(seed)
        model = PromptedClassifier(backbone, prompt, num_classes)
        init_peft(model, generator)
        model = model.to(compute.torch_device)
        x, y = compute.put(x), compute.put(y)  # one cluster's members: small next to the model
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = compute.adamw(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        total = cfg.epochs * math.ceil(len(y) / cfg.batch_size)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
        for _ in range(cfg.epochs):
            order = torch.randperm(len(y), generator=generator)
            for start in range(0, len(y), cfg.batch_size):
                idx = compute.put(order[start : start + cfg.batch_size])
                with compute.autocast():
                    loss = F.cross_entropy(model(x[idx]).float(), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        return {name: tensor.detach().cpu().clone().contiguous() for name, tensor in model.state_dict().items()}


def load_prompt(
    backbone: torch.nn.Module, prompt: PromptParams, num_classes: int, state: dict[str, torch.Tensor]
) -> PromptedClassifier:
    """A cluster's model in eval mode, on the backbone's device."""
    model = PromptedClassifier(backbone, prompt, num_classes)
    model.load_state_dict(state)
    model.eval()
    return model.to(next(backbone.parameters()).device)
