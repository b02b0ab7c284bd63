"""The serving overlay: influence-updated prompts that serve in place of exact ones.

What a cluster serves is its exact prompt from the train stage (`prompts/index.json`), unless an
influence update overlays it (`prompts/approximate/overlay.json` and its safetensors files). An
overlay entry names the exact key it was computed from and stands only while the index still
holds that key: once the cluster is rebuilt exactly, the entry is stale and ignored. The overlay
lives outside the train stage's outputs, so DVC never sees it and `dvc repro` never reverts it.
"""

from __future__ import annotations

from pathlib import Path

from lmeraser.io import atomic_write_json, read_json


class Overlay:
    """Influence-updated prompts that serve in place of exact ones until the exact rebuild."""

    def __init__(self, artifacts: str | Path = "artifacts"):
        self.root = Path(artifacts) / "prompts" / "approximate"
        self.path = self.root / "overlay.json"

    @property
    def store(self):
        from lmeraser.training import ArtifactStore  # torch: only when prompts are read or written

        return ArtifactStore(self.root)

    def read(self) -> dict[str, dict]:
        return read_json(self.path)["clusters"] if self.path.exists() else {}

    def write(self, entries: dict[str, dict]) -> None:
        atomic_write_json(self.path, {"clusters": dict(sorted(entries.items(), key=lambda kv: int(kv[0])))})

    def active(self, index: dict) -> dict[str, dict]:
        """Entries whose exact base is still the deployed exact prompt."""
        exact = index["clusters"]
        return {c: e for c, e in self.read().items() if c in exact and exact[c]["key"] == e["base_key"]}

    def served(self, index: dict) -> dict[str, tuple[str, dict]]:
        """cluster -> (its artifact's path under artifacts/prompts/, its entry): what each cluster serves."""
        active = self.active(index)
        return {
            c: (f"approximate/{active[c]['key']}.safetensors", active[c]) if c in active else (f"store/{e['key']}.safetensors", e)
            for c, e in index["clusters"].items()
        }
