"""FAISS k-means prototypes and nearest-prototype assignment.

Prototypes are fitted on *public* features by default (invariant 1): deleting a private sample
never moves a prototype, so only the cluster that held it changes. Assignment is a pure function
of (backbone, prototypes, sample) on the un-augmented view, computed once and persisted.

Both run on the workspace's GPU when it has one and the faiss installed is a GPU build
(`gpu`: the device index, from `Compute.faiss_gpu`), else on the CPU; which one is recorded with
the prototypes, since the float order, and so a borderline assignment, can differ.
"""

from __future__ import annotations

import threading

import faiss
import numpy as np

from lmeraser.config import ClusteringParams
from lmeraser.errors import LmeraserError


def choose_k(n_private: int, n_fit: int, params: ClusteringParams) -> int:
    """K = clamp(round(n_private / target_cluster_size), min_clusters, max_clusters), and never
    more than the number of points k-means is fitted on."""
    k = round(n_private / params.target_cluster_size)
    k = max(params.min_clusters, min(params.max_clusters, k))
    return max(1, min(k, n_fit))


def fit_prototypes(
    features: np.ndarray, k: int, params: ClusteringParams, seed: int, threads: int = 1, gpu: int | None = None
) -> np.ndarray:
    if len(features) < k:
        raise LmeraserError(f"k-means needs at least {k} points to fit {k} prototypes, got {len(features)}.")
    faiss.omp_set_num_threads(threads)
    kmeans = faiss.Kmeans(
        features.shape[1],
        k,
        niter=params.niter,
        seed=seed,
        verbose=False,
        # faiss subsamples above max_points_per_centroid * k; keep every point for exactness.
        max_points_per_centroid=max(256, len(features) // k + 1),
        min_points_per_centroid=1,
        # faiss's Kmeans takes a number of GPUs and uses the first ones: one, for the same result
        # on machines with more.
        **({"gpu": 1} if gpu is not None else {}),
    )
    kmeans.train(np.ascontiguousarray(features, dtype=np.float32))
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


def nearest(
    features: np.ndarray, prototypes: np.ndarray, allowed: np.ndarray | None = None, gpu: int | None = None
) -> np.ndarray:
    """Index of the nearest prototype for each row; restricted to `allowed` cluster ids if given."""
    ids = np.arange(len(prototypes)) if allowed is None else np.asarray(sorted(allowed), dtype=np.int64)
    if len(ids) == 0:
        raise LmeraserError("no non-empty cluster to route to; train at least one cluster first.")
    index = faiss.IndexFlatL2(prototypes.shape[1])
    if gpu is not None:
        index = faiss.index_cpu_to_gpu(_gpu_resources(gpu), gpu, index)
    index.add(np.ascontiguousarray(prototypes[ids], dtype=np.float32))
    _, found = index.search(np.ascontiguousarray(features, dtype=np.float32), 1)
    return ids[found[:, 0]]


_local = threading.local()


def _gpu_resources(gpu: int):
    """faiss's GPU scratch memory and streams: made once per device and thread (they are not
    thread-safe), not per routing call (serving routes every request)."""
    made = _local.__dict__.setdefault("gpu_resources", {})
    if gpu not in made:
        made[gpu] = faiss.StandardGpuResources()
    return made[gpu]


def cluster_sizes(assignments: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(assignments, minlength=k)


def size_summary(sizes: np.ndarray) -> dict:
    nonempty = sizes[sizes > 0]
    return {
        "n_clusters": int(len(sizes)),
        "n_empty": int((sizes == 0).sum()),
        "size_min": int(nonempty.min()) if len(nonempty) else 0,
        "size_median": float(np.median(nonempty)) if len(nonempty) else 0.0,
        "size_mean": float(nonempty.mean()) if len(nonempty) else 0.0,
        "size_max": int(sizes.max()) if len(sizes) else 0,
    }
