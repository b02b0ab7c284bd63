"""The content-addressed prompt store: `<root>/<key>.safetensors`, written atomically, never
modified (invariant 4: a key is the hash of everything that determines the artifact)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmeraser.errors import LmeraserError
from lmeraser.io import atomic_path, canonical_json, sha256_file


@dataclass(frozen=True)
class StoredArtifact:
    key: str
    path: Path
    sha256: str


class ArtifactStore:
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
        return (
            {p.name.removesuffix(".safetensors") for p in self.root.glob("*.safetensors")}
            if self.root.exists()
            else set()
        )

    def prune(self, keep: set[str]) -> list[str]:
        """Delete every artifact not in `keep` (superseded prompts must not survive)."""
        removed = sorted(self.keys() - keep)
        for key in removed:
            self.path(key).unlink()
        return removed
