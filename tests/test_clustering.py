import numpy as np
import pytest

from lmeraser.clustering import choose_k, cluster_sizes, fit_prototypes, nearest, size_summary
from lmeraser.config import ClusteringParams
from lmeraser.errors import LmeraserError


def test_adaptive_k_rule():
    params = ClusteringParams(target_cluster_size=50, min_clusters=2, max_clusters=10)
    assert choose_k(500, 1000, params) == 10
    assert choose_k(260, 1000, params) == 5
    assert choose_k(10, 1000, params) == 2
    assert choose_k(100_000, 1000, params) == 10
    assert choose_k(500, 3, params) == 3


def _blobs(seed=0):
    rng = np.random.default_rng(seed)
    centres = np.array([[0, 0], [10, 0], [0, 10]], np.float32)
    return (centres[rng.integers(0, 3, 300)] + rng.normal(0, 0.5, (300, 2))).astype(np.float32)


def test_prototypes_are_deterministic_and_find_the_blobs():
    params = ClusteringParams(niter=20)
    a = fit_prototypes(_blobs(), 3, params, seed=1)
    b = fit_prototypes(_blobs(), 3, params, seed=1)
    assert np.array_equal(a, b)
    assert sorted(np.round(a).astype(int).tolist()) == [[0, 0], [0, 10], [10, 0]]
    with pytest.raises(LmeraserError, match="at least 5 points"):
        fit_prototypes(_blobs()[:4], 5, params, seed=1)


def test_nearest_respects_allowed_clusters():
    prototypes = np.array([[0, 0], [10, 0], [0, 10]], np.float32)
    points = np.array([[1, 1], [9, 1], [1, 9]], np.float32)
    assert nearest(points, prototypes).tolist() == [0, 1, 2]
    routed = nearest(points, prototypes, np.array([0, 2]))
    assert routed.tolist()[0] == 0 and routed.tolist()[2] == 2 and 1 not in routed.tolist()
    with pytest.raises(LmeraserError):
        nearest(points, prototypes, np.array([], dtype=np.int64))


def test_size_summary_counts_empty_clusters():
    sizes = cluster_sizes(np.array([0, 0, 2, 2, 2]), 4)
    assert sizes.tolist() == [2, 0, 3, 0]
    summary = size_summary(sizes)
    assert summary["n_empty"] == 2 and summary["size_min"] == 2 and summary["size_max"] == 3
