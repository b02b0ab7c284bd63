"""Backbone features of the private samples, cached by content: `assign` featurises only what it
has not seen.

A sample's feature vector is a function of the frozen backbone, its thread count, the input size
and the sample's pixels, nothing else, so the cache is keyed by (backbone sha256, threads,
input size and normalisation) for the whole file and by each sample's content hash for each row. Features are
computed in the same batching whatever the cache holds, and a row's features do not depend on the
other rows of its batch (tests/test_feature_cache.py checks both on the machine it runs on), so
assignments from cached features are bit-identical to a pass from scratch.

The cache is data derived from people's samples: it is rewritten to hold the current private
split's contents only (every `assign` drops the rows of removed or replaced content), the purge
step of a batch drops erased contents again whatever ran before it, and `audit scan` reads the
content hashes it holds. It lives in `artifacts/cache/` (not versioned; safetensors, never a
pickle; written atomically); a cache that is missing, unreadable or made for another backbone is
ignored and rewritten.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from lmeraser.io import atomic_path
from lmeraser.workspace import BackboneMeta, Workspace

KIND = "lmeraser-feature-cache"  # in the file's metadata: how `audit scan` recognises one


def _identity(meta: BackboneMeta) -> dict:
    from lmeraser.compute import Compute
    from lmeraser.fingerprint import identity

    return {
        "backbone": meta.sha256,
        "threads": meta.threads,
        "compute": identity(Compute.of(meta)),
        "img_size": meta.img_size,
        **meta.input.to_json(),
    }


def _digests(content_hashes: list[str]) -> np.ndarray:
    return np.frombuffer(b"".join(bytes.fromhex(h) for h in content_hashes), dtype=np.uint8).reshape(
        len(content_hashes), 32
    )


def read(path: Path) -> tuple[dict, list[str], np.ndarray] | None:
    """(identity, content hashes, features) of a cache file, or None when it is not one."""
    try:
        with safe_open(str(path), "np") as handle:
            meta = handle.metadata() or {}
        if meta.get("kind") != KIND:
            return None
        tensors = load_file(str(path))
        contents, features = tensors["content"], tensors["features"]
        if contents.ndim != 2 or contents.shape[1] != 32 or len(contents) != len(features):
            return None
        return json.loads(meta["identity"]), [row.tobytes().hex() for row in contents], features
    except (OSError, SafetensorError, ValueError, KeyError):
        return None


def _write(path: Path, identity: dict, content_hashes: list[str], features: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tensors = {"content": _digests(content_hashes), "features": np.ascontiguousarray(features, dtype=np.float32)}
        save_file(tensors, str(tmp), metadata={"kind": KIND, "identity": json.dumps(identity, sort_keys=True)})


def private_features(
    ws: Workspace, backbone, meta: BackboneMeta, images: np.ndarray, content_hashes: list[str]
) -> tuple[np.ndarray, int]:
    """Features of the private split (rows of `images`) under `backbone` (a torch module), and how
    many were computed rather than read from the cache. Leaves the cache holding exactly these
    contents."""
    # torch and timm only here: `audit scan` reads caches through `read` without them.
    from lmeraser.models.backbone import image_features

    identity = _identity(meta)
    cached = read(ws.feature_cache_file)
    known = {h: row for row, h in enumerate(cached[1])} if cached is not None and cached[0] == identity else {}
    hits = [i for i, h in enumerate(content_hashes) if h in known]
    missing = [i for i, h in enumerate(content_hashes) if h not in known]
    computed = image_features(backbone, meta, images[missing])  # (0, D) when nothing is missing
    features = np.zeros((len(content_hashes), computed.shape[1]), np.float32)
    features[missing] = computed
    if hits:
        features[hits] = cached[2][[known[content_hashes[i]] for i in hits]]
    _write(ws.feature_cache_file, identity, content_hashes, features)
    return features, len(missing)


def drop_contents(ws: Workspace, keyed: set[str], key: Callable[[str], str]) -> int:
    """Remove the rows whose content hash, keyed by `key` (the workspace salt's
    `Keyer.content`), is in `keyed` (what a batch erased); the number removed."""
    cached = read(ws.feature_cache_file)
    if cached is None or not keyed:
        return 0
    identity, contents, features = cached
    keep = [i for i, h in enumerate(contents) if key(h) not in keyed]
    if len(keep) < len(contents):
        _write(ws.feature_cache_file, identity, [contents[i] for i in keep], features[keep])
    return len(contents) - len(keep)
