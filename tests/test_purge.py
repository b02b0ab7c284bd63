"""The scan finds forgotten pixels wherever an .npy holds them (even renamed, as in a DVC cache)
and superseded artifacts by sha256; membership-inference scores behave as defined."""

import numpy as np

from lmeraser.audit.scan import scan
from lmeraser.data.splits import content_hash
from lmeraser.evaluation import membership_inference
from lmeraser.io import sha256_file
from lmeraser.workspace import Workspace


def test_scan_finds_forgotten_images_and_superseded_artifacts(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 8, 8), dtype=np.uint8)
    (tmp_path / "data").mkdir()
    np.save(tmp_path / "data" / "images.npy", images[1:])  # the forgotten image 0 is gone here
    cache = tmp_path / ".dvc" / "cache" / "files" / "md5" / "ab"
    cache.mkdir(parents=True)
    with open(cache / "cdef0123", "wb") as handle:  # a cache object: no extension, old data version
        np.save(handle, images)
    artifact = tmp_path / "mlartifacts" / "1" / "run" / "prompt.safetensors"
    artifact.parent.mkdir(parents=True)
    artifact.write_bytes(b"old prompt weights")
    forgotten = {content_hash(images[0])}
    hits, counts = scan(Workspace(tmp_path), forgotten, {sha256_file(artifact)})
    kinds = sorted((h.kind, h.location) for h in hits)
    assert kinds == [("forgotten sample", "dvc cache"), ("superseded artifact", "mlflow artifacts")]
    assert counts["data"] == 1
    (cache / "cdef0123").unlink()
    artifact.unlink()
    assert scan(Workspace(tmp_path), forgotten, set())[0] == []


def test_membership_inference_scores():
    separated = membership_inference(np.array([0.01, 0.02]), np.array([1.0, 2.0, 3.0]))
    assert separated["auc"] == 1.0 and separated["tpr_at_1pct_fpr"] == 1.0
    same = membership_inference(np.ones(10), np.ones(50))
    assert same["auc"] == 0.5 and same["tpr_at_1pct_fpr"] == 0.0
    inverted = membership_inference(np.array([5.0]), np.array([0.1, 0.2]))
    assert inverted["auc"] == 0.0
    assert np.isnan(membership_inference(np.array([]), np.ones(3))["auc"])
