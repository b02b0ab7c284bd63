"""Serving: route each sample to its nearest non-empty prototype, then apply that cluster's
prompt and head, in batches.

What a cluster serves is its exact prompt from the train stage, unless an influence update
overlays it (lmeraser/overlay.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmeraser.clustering import nearest
from lmeraser.config import PromptParams
from lmeraser.io import read_json
from lmeraser.models.backbone import extract_features, load_backbone, preprocess
from lmeraser.overlay import Overlay
from lmeraser.training import ArtifactStore, load_prompt


@dataclass
class ServingModel:
    backbone: torch.nn.Module
    backbone_meta: dict
    prototypes: np.ndarray
    index: dict  # the exact prompts (train stage output)
    store: ArtifactStore
    overlay: dict = field(default_factory=dict)  # cluster -> active influence entry
    overlay_store: ArtifactStore | None = None

    @classmethod
    def load(cls, artifacts: str | Path = "artifacts") -> ServingModel:
        artifacts = Path(artifacts)
        backbone, meta = load_backbone(artifacts / "backbone")
        prototypes = np.load(artifacts / "clusters" / "prototypes.npy", allow_pickle=False)
        index = read_json(artifacts / "prompts" / "index.json")
        overlay = Overlay(artifacts)
        return cls(backbone, meta, prototypes, index, ArtifactStore(artifacts / "prompts" / "store"), overlay.active(index), overlay.store)

    def state(self, cluster: int | str) -> dict[str, torch.Tensor]:
        """The prompt a cluster serves: its influence overlay if active, else its exact prompt."""
        cluster = str(int(cluster))
        if cluster in self.overlay:
            return self.overlay_store.load(self.overlay[cluster]["key"])
        return self.store.load(self.index["clusters"][cluster]["key"])

    def cluster_model(self, cluster: int | str) -> torch.nn.Module:
        return load_prompt(self.backbone, self.prompt_params, self.index["num_classes"], self.state(cluster))

    @property
    def prompt_params(self) -> PromptParams:
        return PromptParams(**self.index["prompt"])

    @property
    def active_clusters(self) -> list[int]:
        """Clusters with a trained prompt; empty or retired clusters are skipped by routing."""
        return sorted(int(c) for c in self.index["clusters"])

    def route(self, features: np.ndarray) -> np.ndarray:
        return nearest(features, self.prototypes, np.asarray(self.active_clusters))

    @torch.no_grad()
    def logits(self, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Class logits and the cluster each sample was routed to."""
        x = preprocess(images, self.backbone_meta["params"]["img_size"])
        routes = self.route(extract_features(self.backbone, x, batch_size))
        out = np.zeros((len(x), self.index["num_classes"]), dtype=np.float32)
        for cluster in np.unique(routes):
            model = self.cluster_model(cluster)
            rows = np.flatnonzero(routes == cluster)
            for start in range(0, len(rows), batch_size):
                batch = rows[start : start + batch_size]
                out[batch] = model(x[batch]).numpy()
        return out, routes

    def predict(self, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Predicted labels and the cluster each sample was routed to."""
        logits, routes = self.logits(images, batch_size)
        return logits.argmax(1), routes

    def losses(self, images: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Per-sample cross-entropy under the routed cluster's prompt (the MIA signal)."""
        logits, _ = self.logits(images, batch_size)
        return torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(np.asarray(labels, dtype=np.int64)), reduction="none").numpy()
