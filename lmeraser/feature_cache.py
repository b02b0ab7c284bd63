"""Backbone features of the private samples, cached by content: `assign` featurises only what it
has not seen.

A sample's feature vector is a function of the frozen backbone, its thread count, the input size
and the sample's pixels, nothing else, so the cache is keyed by (backbone sha256, threads,
input size and normalisation) for the whole file and by each sample's content hash for each row. Features are
computed in the same batching whatever the cache holds, and a row's features do not depend on the
other rows of its batch (tests/test_feature_cache.py checks both on the machine it runs on), so
assignments from cached features are bit-identical to a pass from scratch.

The cache follows the split's shards (lmeraser/workspace.py): one file per shard,
`artifacts/cache/private-features/<shard>.safetensors`, holding that shard's contents in its
manifest's order. An erasure rewrites one data shard, so `assign` rewrites one cache file and reads
the pixels of no other shard; the scan reads that file again and no other (the one-file cache of
before grew every forget's cost with the data: 12 MB written, read back and keyed at 30,000
private samples).

The cache is data derived from people's samples: each file is rewritten to hold its shard's
current contents only (every `assign` drops the rows of removed or replaced content, and the files
of shards that no longer exist), the purge step of a batch drops erased contents again whatever ran
before it, and `audit scan` reads the content hashes each file holds. It lives in
`artifacts/cache/` (not versioned; safetensors, never a pickle; written atomically); a file that is
missing, unreadable or made for another backbone is ignored and rewritten.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save_file

from lmeraser.errors import LmeraserError
from lmeraser.io import atomic_path, read_trusted
from lmeraser.workspace import BackboneMeta, Workspace

KIND = "lmeraser-feature-cache"  # in the file's metadata: how `audit scan` recognises one
MAX_FILE_BYTES = 1 << 32  # one shard's features: megabytes; a larger file is not a cache this writes


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
    """(identity, content hashes, features) of a cache file, or None when it is not one. Read as
    the product's trusted files are (lmeraser/io.py `read_trusted`): a regular file only, never
    through a link, opened without blocking, so a FIFO or a device at a cache path cannot hang
    `assign`, the purge or the scan, and a link's target is never taken for the cache."""
    try:
        data = read_trusted(path, "feature-cache file", MAX_FILE_BYTES)
        size = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
        if meta.get("kind") != KIND:
            return None
        tensors = load(data)
        contents, features = tensors["content"], tensors["features"]
        if contents.ndim != 2 or contents.shape[1] != 32 or len(contents) != len(features):
            return None
        return json.loads(meta["identity"]), [row.tobytes().hex() for row in contents], features
    except (LmeraserError, SafetensorError, ValueError, KeyError, AttributeError, RecursionError):
        return None


def _clear(path: Path) -> None:
    """Make room for a cache file at `path`: a link, FIFO or device there is removed, never read
    or written through (the file is then rebuilt); a directory is refused in one sentence."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        raise LmeraserError(
            f"{path}: a directory where a feature-cache file belongs; remove it (the cache is rebuilt from the data)."
        )
    if not stat.S_ISREG(mode):
        path.unlink()


def _write(path: Path, identity: dict, content_hashes: list[str], features: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear(path)
    with atomic_path(path) as tmp:
        tensors = {"content": _digests(content_hashes), "features": np.ascontiguousarray(features, dtype=np.float32)}
        save_file(tensors, str(tmp), metadata={"kind": KIND, "identity": json.dumps(identity, sort_keys=True)})


def shard_file(ws: Workspace, directory: Path) -> Path:
    """The cache file of the private split's shard `directory`."""
    return ws.feature_cache_dir / f"{directory.name}.safetensors"


def private_features(ws: Workspace, backbone, meta: BackboneMeta) -> tuple[np.ndarray, int]:
    """Features of the private split (in the order of `ws.manifest("private")`: by sample id)
    under `backbone` (a torch module), and how many were computed rather than read from the cache.
    Leaves each shard's cache file holding exactly that shard's contents; a shard whose file
    already does is neither read for pixels nor written."""
    # torch and timm only here: `audit scan` reads caches through `read` without them.
    from lmeraser.models.backbone import image_features

    identity = _identity(meta)
    blocks, ids, computed, kept = [], [], 0, set()
    for directory in ws.check_shards("private"):
        manifest = ws.shard_manifest(directory)
        hashes = manifest["content_hash"].tolist()
        path = shard_file(ws, directory)
        kept.add(path.name)
        cached = read(path)  # None for anything but a regular cache file; `_write` makes room for it
        cached = cached if cached is not None and cached[0] == identity else None
        if cached is not None and cached[1] == hashes:
            features = cached[2]
        else:
            known = {h: row for row, h in enumerate(cached[1])} if cached is not None else {}
            missing = [i for i, h in enumerate(hashes) if h not in known]
            if missing or cached is None:  # pixels only for what the cache lacks ((0, D) for an empty shard)
                images = ws.shard_images(directory, len(manifest), mmap=True)
                fresh = image_features(backbone, meta, np.ascontiguousarray(images[missing]))
            else:
                fresh = np.zeros((0, cached[2].shape[1]), np.float32)
            features = np.zeros((len(hashes), fresh.shape[1]), np.float32)
            features[missing] = fresh
            hits = [i for i, h in enumerate(hashes) if h in known]
            if hits:
                features[hits] = cached[2][[known[hashes[i]] for i in hits]]
            _write(path, identity, hashes, features)
            computed += len(missing)
        blocks.append(features)
        ids.extend(manifest["sample_id"].tolist())
    # Files of shards that are gone (the data cut again) and the one-file cache of before.
    for stale in [p for p in _cache_files(ws) if p.parent != ws.feature_cache_dir or p.name not in kept]:
        _clear(stale)
        stale.unlink(missing_ok=True)
    order = _split_order(ids)
    if [ids[i] for i in order] != ws.manifest("private")["sample_id"].tolist():
        raise LmeraserError("the private split's shards and its manifest disagree; run 'lmeraser data init'.")
    return np.concatenate(blocks)[order], computed


def _split_order(ids: list[str]) -> np.ndarray:
    """The order that puts rows gathered shard by shard into the split's (by sample id, as
    `Workspace.manifest` sorts)."""
    return np.argsort(np.array(ids, dtype=object), kind="stable")


def _cache_files(ws: Workspace) -> list[Path]:
    files = sorted(ws.feature_cache_dir.glob("*.safetensors")) if ws.feature_cache_dir.is_dir() else []
    return files + ([ws.legacy_feature_cache_file] if ws.legacy_feature_cache_file.exists() else [])


def read_all(ws: Workspace) -> tuple[dict, list[str], np.ndarray] | None:
    """(identity, content hashes, features) of the whole private split's cache, in the split's
    order (by sample id), or None when a shard's file is missing, unreadable, of another identity
    or not its shard's contents (then `assign` recomputes what it lacks)."""
    identities, ids, contents, blocks = [], [], [], []
    for directory in ws.check_shards("private"):
        manifest = ws.shard_manifest(directory)
        cached = read(shard_file(ws, directory))
        if cached is None or cached[1] != manifest["content_hash"].tolist():
            return None
        identities.append(cached[0])
        ids.extend(manifest["sample_id"].tolist())
        contents.extend(cached[1])
        blocks.append(cached[2])
    if not blocks or any(identity != identities[0] for identity in identities):
        return None
    order = _split_order(ids)
    return identities[0], [contents[i] for i in order], np.concatenate(blocks)[order]


def drop_contents(ws: Workspace, keyed: set[str], key: Callable[[str], str]) -> int:
    """Remove, from every cache file, the rows whose content hash, keyed by `key` (the workspace
    salt's `Keyer.content`), is in `keyed` (what a batch erased); the number removed."""
    if not keyed:
        return 0
    removed = 0
    for path in _cache_files(ws):
        cached = read(path)
        if cached is None:
            continue
        identity, contents, features = cached
        keep = [i for i, h in enumerate(contents) if key(h) not in keyed]
        if len(keep) < len(contents):
            _write(path, identity, [contents[i] for i in keep], features[keep])
            removed += len(contents) - len(keep)
    return removed
