"""prototypes: FAISS k-means on backbone features of the public split (invariant 1)."""

from __future__ import annotations

from collections.abc import Callable

from lmeraser.clustering import choose_k, fit_prototypes
from lmeraser.compute import Compute
from lmeraser.config import Params
from lmeraser.io import atomic_save_npy, atomic_write_json, sha256_file
from lmeraser.models.backbone import image_features, load_backbone
from lmeraser.workspace import Workspace


def run(params: Params, ws: Workspace, log: Callable[[str], None] = print) -> dict:
    model, meta = load_backbone(ws)
    fit_on = params.clustering.fit_on
    fit_split = ws.split(fit_on)
    k = choose_k(len(ws.manifest("private")), len(fit_split), params.clustering)
    if fit_on == "private":
        log("clustering.fit_on=private: prototypes depend on private data, so every deletion rebuilds every cluster")
    gpu = Compute.of(meta).faiss_gpu
    prototypes = fit_prototypes(
        image_features(model, meta, fit_split.images), k, params.clustering, params.seed, params.runtime.threads, gpu
    )
    atomic_save_npy(ws.prototypes_file, prototypes)
    faiss_on = "cpu" if gpu is None else "gpu"  # faiss-gpu (its k-means takes the first GPU)
    atomic_write_json(
        ws.prototypes_meta_file,
        {
            "k": k,
            "fit_on": fit_on,
            "backbone_sha256": meta.sha256,
            "sha256": sha256_file(ws.prototypes_file),
            "faiss": faiss_on,
        },
    )
    log(f"{k} prototypes fitted on {len(fit_split)} {fit_on} samples (faiss on {faiss_on})")
    return {"metrics": {"k": k}}
