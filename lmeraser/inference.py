"""Serving: route each sample to its nearest non-empty prototype, then apply that cluster's
prompt and head, in batches.

What a cluster serves is its exact prompt from the train stage, unless an influence update
overlays it (lmeraser/overlay.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lmeraser.clustering import nearest
from lmeraser.compute import Compute
from lmeraser.config import PromptParams
from lmeraser.models.backbone import extract_features, load_backbone, preprocess
from lmeraser.overlay import Overlay
from lmeraser.store import ArtifactStore
from lmeraser.training import load_prompt
from lmeraser.workspace import BackboneMeta, InputSpec, PromptIndex, Workspace


@dataclass
class ServingModel:
    backbone: torch.nn.Module
    backbone_meta: BackboneMeta
    prototypes: np.ndarray
    index: PromptIndex  # the exact prompts (train stage output)
    store: ArtifactStore
    overlay: dict = field(default_factory=dict)  # cluster -> active influence entry
    overlay_store: ArtifactStore | None = None

    @classmethod
    def load(cls, ws: Workspace) -> ServingModel:
        backbone, meta = load_backbone(ws)
        index = ws.prompt_index()
        overlay = Overlay(ws)
        return cls(
            backbone, meta, ws.prototypes(), index, ArtifactStore(ws.store_dir), overlay.active(index), overlay.store
        )

    def state(self, cluster: int | str) -> dict[str, torch.Tensor]:
        """The prompt a cluster serves: its influence overlay if active, else its exact prompt."""
        cluster = str(int(cluster))
        if cluster in self.overlay:
            return self.overlay_store.load(self.overlay[cluster]["key"])
        return self.store.load(self.index.clusters[cluster].key)

    def cluster_model(self, cluster: int | str) -> torch.nn.Module:
        return load_prompt(self.backbone, self.prompt_params, self.index.num_classes, self.state(cluster))

    @property
    def prompt_params(self) -> PromptParams:
        return PromptParams.from_identity(self.index.prompt)

    @property
    def input_spec(self) -> InputSpec:
        return self.backbone_meta.input

    @property
    def active_clusters(self) -> list[int]:
        """Clusters with a trained prompt; empty or retired clusters are skipped by routing."""
        return sorted(int(c) for c in self.index.clusters)

    def route(self, features: np.ndarray) -> np.ndarray:
        return nearest(
            features, self.prototypes, np.asarray(self.active_clusters), Compute.of(self.backbone_meta).faiss_gpu
        )

    def served_keys(self) -> dict[str, str]:
        """cluster -> the artifact it serves (`overlay:<key>` or `exact:<key>`)."""
        return {
            c: (f"overlay:{self.overlay[c]['key']}" if c in self.overlay else f"exact:{e.key}")
            for c, e in self.index.clusters.items()
        }

    @torch.no_grad()
    def cluster_logits(self, x: torch.Tensor, routes: np.ndarray, cluster: int, batch_size: int) -> np.ndarray:
        """Logits of the rows of `x` routed to `cluster`, in a fixed batching (a cluster scored
        alone gives the same bits as in a full pass), on the backbone's device and precision. The
        caller holds the compute's scope."""
        model, compute = self.cluster_model(cluster), Compute.of(self.backbone_meta)
        rows = np.flatnonzero(routes == cluster)
        out = []
        for s in range(0, len(rows), batch_size):
            with compute.autocast():
                out.append(model(compute.put(x[rows[s : s + batch_size]])).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.index.num_classes), np.float32)

    @torch.no_grad()
    def logits(self, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Class logits and the cluster each sample was routed to."""
        with Compute.of(self.backbone_meta).scope() as compute:
            x = preprocess(images, self.input_spec)
            routes = self.route(extract_features(self.backbone, x, batch_size, compute))
            out = np.zeros((len(x), self.index.num_classes), dtype=np.float32)
            for cluster in np.unique(routes):
                out[routes == cluster] = self.cluster_logits(x, routes, cluster, batch_size)
        return out, routes

    def predict(self, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Predicted labels and the cluster each sample was routed to."""
        logits, routes = self.logits(images, batch_size)
        return logits.argmax(1), routes

    def losses(self, images: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Per-sample cross-entropy under the routed cluster's prompt (the MIA signal)."""
        logits, _ = self.logits(images, batch_size)
        return per_sample_losses(logits, labels)


def per_sample_losses(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cross-entropy of each row of `logits` against its label (the membership-inference signal)."""
    labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return torch.nn.functional.cross_entropy(torch.from_numpy(logits), labels, reduction="none").numpy()
