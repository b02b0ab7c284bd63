"""Purge what was trained on, or contains, forgotten samples, and scan to prove it is gone.

Invariant 5: after a forget request the sample's bytes are gone from data/, the DVC cache and
the (local) remote, and no superseded prompt artifact survives in the artifact store or the
MLflow artifact root. `scan` searches all of them by content hash.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmeraser.data.splits import content_hash
from lmeraser.io import sha256_file
from lmeraser.versioning import dvc, remote_path

NPY_MAGIC = b"\x93NUMPY"


def scan_roots(root: Path) -> dict[str, Path]:
    roots = {
        "data": root / "data",
        "dvc cache": root / ".dvc" / "cache",
        "artifact store": root / "artifacts",
        "mlflow artifacts": root / "mlartifacts",
        "mlflow (default root)": root / "mlruns",
    }
    remote = remote_path(root)
    if remote is not None:
        roots["dvc remote"] = remote
    return roots


def _files(directory: Path) -> Iterable[Path]:
    if directory.exists():
        for base, _, names in os.walk(directory):
            for name in names:
                path = Path(base) / name
                if path.is_file() and not path.is_symlink():
                    yield path


def _image_hashes(path: Path) -> set[str]:
    """Content hashes of every image in an .npy-format file (whatever its name, e.g. in a cache)."""
    with open(path, "rb") as handle:
        if handle.read(6) != NPY_MAGIC:
            return set()
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError):
        return set()
    if array.dtype != np.uint8 or array.ndim != 3:
        return set()
    return {content_hash(image) for image in array}


@dataclass
class Hit:
    location: str
    path: str
    kind: str  # "forgotten sample" | "superseded artifact"
    digest: str


def scan(root: Path, sample_hashes: set[str], artifact_hashes: set[str]) -> tuple[list[Hit], dict]:
    """Search every storage location for forgotten samples' pixels and superseded artifacts."""
    hits, counts = [], {}
    for location, directory in scan_roots(root).items():
        n = 0
        for path in _files(directory):
            n += 1
            if sample_hashes:
                for digest in _image_hashes(path) & sample_hashes:
                    hits.append(Hit(location, str(path), "forgotten sample", digest))
            if artifact_hashes:
                digest = sha256_file(path)
                if digest in artifact_hashes:
                    hits.append(Hit(location, str(path), "superseded artifact", digest))
        counts[location] = n
    return hits, counts


def purge(root: Path, superseded_artifacts: set[str], log=print) -> dict:
    """Delete superseded artifacts from the MLflow roots, then garbage-collect DVC cache and remote.

    The artifact store needs nothing here: the train stage already pruned every superseded key
    (and `scan` checks that it did).
    """
    roots = scan_roots(root)
    removed = []
    if superseded_artifacts:
        for location in ("mlflow artifacts", "mlflow (default root)"):
            for path in _files(roots[location]):
                if sha256_file(path) in superseded_artifacts:
                    path.unlink()
                    removed.append(str(path))
    # Push the current version first so the remote keeps what the workspace needs, then drop
    # every cache and remote object that only older data versions reference.
    remote = roots.get("dvc remote")
    if remote is not None:
        dvc(root, "push", "-q")
    dvc(root, "gc", "--workspace", "--force", "-q")
    if remote is not None and remote.exists():
        dvc(root, "gc", "--workspace", "--cloud", "--force", "-q")
    log(f"purged {len(removed)} superseded artifact file(s); DVC cache{' and remote' if remote else ''} garbage-collected")
    return {"artifact_files_removed": len(removed), "dvc_gc": True, "remote_gc": remote is not None}
