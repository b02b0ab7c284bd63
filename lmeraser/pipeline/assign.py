"""assign: every private sample to its nearest prototype (invariant 2), persisted by sample id."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from lmeraser.clustering import cluster_sizes, nearest, size_summary
from lmeraser.compute import Compute
from lmeraser.config import Params
from lmeraser.feature_cache import private_features
from lmeraser.io import atomic_write_csv, atomic_write_json
from lmeraser.models.backbone import load_backbone
from lmeraser.workspace import Workspace


def run(params: Params, ws: Workspace, log: Callable[[str], None] = print) -> dict:
    model, meta = load_backbone(ws)
    prototypes = ws.prototypes()
    private = ws.manifest("private")
    # Features of contents seen before come from the cache, shard by shard (bit-identical; only new
    # ones are computed, from the pixels of the shards that hold them).
    features, computed = private_features(ws, model, meta)
    clusters = nearest(features, prototypes, gpu=Compute.of(meta).faiss_gpu)
    atomic_write_csv(ws.assignments_file, pd.DataFrame({"sample_id": private["sample_id"], "cluster": clusters}))
    sizes = cluster_sizes(clusters, len(prototypes))
    summary = size_summary(sizes)
    atomic_write_json(ws.cluster_report, {**summary, "sizes": sizes.tolist()})
    atomic_write_csv(ws.plots / "cluster_sizes.csv", pd.DataFrame({"cluster": np.arange(len(sizes)), "size": sizes}))
    log(
        f"assigned {len(private)} private samples to {summary['n_clusters'] - summary['n_empty']} non-empty clusters"
        f" (features computed for {computed}, {len(private) - computed} from the cache)"
    )
    return {"metrics": summary, "features_computed": computed}
