"""The serving overlay: influence-updated prompts that serve in place of exact ones.

What a cluster serves is its exact prompt from the train stage (`prompts/index.json`), unless an
influence update overlays it (`prompts/approximate/overlay.json` and its safetensors files). An
overlay entry names the exact key it was computed from and stands only while the index still
holds that key: once the cluster is rebuilt exactly, the entry is stale and ignored. The overlay
lives outside the train stage's outputs, so DVC never sees it and `dvc repro` never reverts it.
"""

from __future__ import annotations

from lmeraser.io import atomic_write_json
from lmeraser.workspace import PromptIndex, Workspace


class Overlay:
    def __init__(self, ws: Workspace):
        self.ws = ws
        self.path = ws.overlay_file

    @property
    def store(self):
        from lmeraser.store import ArtifactStore  # torch: only when prompts are read or written

        return ArtifactStore(self.ws.overlay_dir)

    def read(self) -> dict[str, dict]:
        return self.ws.overlay_entries()

    def write(self, entries: dict[str, dict]) -> None:
        atomic_write_json(self.path, {"clusters": dict(sorted(entries.items(), key=lambda kv: int(kv[0])))})

    def active(self, index: PromptIndex) -> dict[str, dict]:
        """Entries whose exact base is still the deployed exact prompt."""
        exact = index.clusters
        return {c: e for c, e in self.read().items() if c in exact and exact[c].key == e["base_key"]}

    def served(self, index: PromptIndex) -> dict[str, tuple[str, str]]:
        """cluster -> (its artifact's path relative to the workspace, sha256): what each cluster serves."""
        active = self.active(index)
        out = {}
        for c, entry in index.clusters.items():
            if c in active:
                out[c] = (
                    self.ws.relative(self.ws.overlay_dir / f"{active[c]['key']}.safetensors"),
                    active[c]["sha256"],
                )
            else:
                out[c] = (self.ws.relative(self.ws.store_dir / f"{entry.key}.safetensors"), entry.sha256)
        return out
