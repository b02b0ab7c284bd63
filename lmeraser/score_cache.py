"""The test split's scores, cached: a pass re-scores only the clusters that changed.

The test split is scored again and again: by every evaluation and twice per exact batch (the
membership-inference losses before and after). Its features depend only on the backbone and the
images; its routing on the features, the prototypes and which clusters are active; a cluster's
logits on the artifact it serves and on which rows are routed to it. So the cache keeps the
features, routes and logits with the artifact each cluster served, and a pass re-scores a cluster
only when its artifact or its rows changed (a rebuilt cluster, a retired one whose rows moved, an
influence overlay). A changed cluster is re-scored whole, in the same batches as a full pass, so
the result is bit-identical to scoring from scratch (tests/test_score_cache.py checks it).

The cache holds test samples only (never erasable: requests refuse test ids), so it is no copy of
anyone's erased data. It lives in `artifacts/cache/` (not versioned; delete it at will) and is
written atomically; a cache that is missing, unreadable or made for another backbone, test split
or batch size is ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from lmeraser.compute import Compute
from lmeraser.fingerprint import identity
from lmeraser.inference import ServingModel, per_sample_losses
from lmeraser.io import atomic_path
from lmeraser.models.backbone import extract_features, preprocess
from lmeraser.workspace import Split, Workspace


def _identity(test: Split, model: ServingModel, batch_size: int) -> dict:
    contents = hashlib.sha256("\n".join(test.manifest["content_hash"].astype(str)).encode()).hexdigest()
    meta = model.backbone_meta
    return {
        "backbone": meta.sha256,
        "threads": meta.threads,
        "compute": identity(Compute.of(meta)),
        "test": contents,
        "batch_size": batch_size,
        "num_classes": model.index.num_classes,
    }


def _load(ws: Workspace, identity: dict) -> tuple[dict[str, np.ndarray], dict[str, str]] | None:
    path = ws.score_cache_file
    try:
        from safetensors import safe_open

        with safe_open(str(path), "np") as handle:
            meta = handle.metadata() or {}
        if json.loads(meta.get("identity", "null")) != identity:
            return None
        return load_file(str(path)), json.loads(meta["served"])
    except (OSError, SafetensorError, ValueError, KeyError):
        return None


def score_test_split(
    ws: Workspace, model: ServingModel, batch_size: int, test: Split | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Logits and routes of the whole test split (`test`, if the caller read it already) under
    what `model` serves now, and what was re-scored: {"features_cached": bool, "rescored":
    [clusters], "clusters": n}."""
    if test is None:
        test = ws.split("test")
    identity = _identity(test, model, batch_size)
    cached = _load(ws, identity)
    served = model.served_keys()
    with Compute.of(model.backbone_meta).scope() as compute, torch.no_grad():
        x = preprocess(test.images, model.input_spec)
        features = cached[0]["features"] if cached else extract_features(model.backbone, x, batch_size, compute)
        routes = model.route(features)
        logits = np.zeros((len(x), model.index.num_classes), dtype=np.float32)
        rescored = []
        for cluster in (int(c) for c in np.unique(routes)):
            rows = routes == cluster
            unchanged = (
                cached is not None
                and cached[1].get(str(cluster)) == served[str(cluster)]
                and np.array_equal(rows, cached[0]["routes"] == cluster)
            )
            if unchanged:
                logits[rows] = cached[0]["logits"][rows]
            else:
                logits[rows] = model.cluster_logits(x, routes, cluster, batch_size)
                rescored.append(cluster)
    if cached is None or rescored or set(cached[1]) != set(served):
        ws.score_cache_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(ws.score_cache_file) as tmp:
            tensors = {"features": np.ascontiguousarray(features), "routes": routes.astype(np.int64), "logits": logits}
            save_file(
                tensors,
                str(tmp),
                metadata={
                    "identity": json.dumps(identity, sort_keys=True),
                    "served": json.dumps(served, sort_keys=True),
                },
            )
    return (
        logits,
        routes,
        {"features_cached": cached is not None, "rescored": rescored, "clusters": len(np.unique(routes))},
    )


def nonmember_losses(ws: Workspace, model: ServingModel, batch_size: int) -> np.ndarray:
    """Per-sample cross-entropy of the test split (the non-members of membership inference)."""
    test = ws.split("test")
    logits, _, _ = score_test_split(ws, model, batch_size, test)
    return per_sample_losses(logits, test.labels)
