"""`audit scan`: search every storage location for forgotten samples' pixels and for prompt
artifacts that were trained on them (invariant 5).

The locations are data/, the DVC cache and the default local remote, artifacts/ and the MLflow
artifact roots. Every `.npy`-format file (whatever its name, e.g. in a cache) is read and each
image hashed; every file's sha256 is compared with the superseded artifacts.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmeraser.data.splits import content_hash
from lmeraser.io import sha256_file
from lmeraser.lineage.records import lineage_log
from lmeraser.progress import track
from lmeraser.versioning import remote_path
from lmeraser.workspace import Workspace

NPY_MAGIC = b"\x93NUMPY"


def storage_roots(ws: Workspace) -> dict[str, Path]:
    roots = {
        "data": ws.data,
        "dvc cache": ws.dvc_dir / "cache",
        "artifact store": ws.artifacts,
        "mlflow artifacts": ws.mlflow_artifacts,
        "mlflow (default root)": ws.mlflow_default_root,
    }
    remote = remote_path(ws.root)
    if remote is not None:
        roots["dvc remote"] = remote
    return roots


def files(directory: Path) -> Iterable[Path]:
    if directory.exists():
        for base, _, names in os.walk(directory):
            for name in names:
                path = Path(base) / name
                if path.is_file() and not path.is_symlink():
                    yield path


def _image_hashes(path: Path) -> set[str]:
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


def scan(ws: Workspace, sample_hashes: set[str], artifact_hashes: set[str]) -> tuple[list[Hit], dict[str, int]]:
    """Search every storage location for the given sample content hashes and artifact sha256s."""
    hits, counts = [], {}
    for location, directory in storage_roots(ws).items():
        n = 0
        for path in track(files(directory), f"scanning {location}"):
            n += 1
            if sample_hashes:
                for digest in _image_hashes(path) & sample_hashes:
                    hits.append(Hit(location, str(path), "forgotten sample", digest))
            if artifact_hashes and (digest := sha256_file(path)) in artifact_hashes:
                hits.append(Hit(location, str(path), "superseded artifact", digest))
        counts[location] = n
    return hits, counts


@dataclass
class ScanTargets:
    sample_hashes: set[str]  # content hashes of forgotten or replaced samples
    artifact_hashes: set[str]  # prompts trained on them, superseded and not deployed again


def scan_targets(ws: Workspace) -> ScanTargets:
    """What must be gone: every tombstoned sample, and every prompt a record says was superseded."""
    records = lineage_log(ws).read_unverified()
    superseded = {c["prompt_sha256_before"] for r in records for c in r.predicate.get("clusters_rebuilt", []) if c["prompt_sha256_before"]}
    superseded -= set(ws.prompt_index_or_empty().hashes().values())
    return ScanTargets(set(ws.tombstones()["content_hash"]), superseded)
