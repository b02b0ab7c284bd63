"""`audit scan`: search every storage location for forgotten samples' pixels and for prompt
artifacts that were trained on them (invariant 5).

The locations are data/, the DVC cache and the default local remote, artifacts/ and the MLflow
artifact roots. Every `.npy`-format file (whatever its name, e.g. in a cache) is read and each
image's content hash keyed with the workspace's salt (records hold keyed hashes only), and so are
the content hashes a feature cache holds rows for (whatever its name); every
file's sha256 is compared with the superseded artifacts. What to look for comes from the signed
records, never from data/, which a re-ingestion could have rewritten.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmeraser.data.splits import content_hash
from lmeraser.io import sha256_file
from lmeraser.lineage.records import lineage_log
from lmeraser.progress import track
from lmeraser.salt import Keyer
from lmeraser.versioning import cache_dir, local_path, remotes
from lmeraser.workspace import Workspace

NPY_MAGIC = b"\x93NUMPY"


@dataclass
class Locations:
    roots: dict[str, Path]  # searched (and purged) on this machine
    not_searched: list[str]  # where copies may be that this machine cannot read, with why


def storage_locations(ws: Workspace) -> Locations:
    """Every place the stores keep bytes, asked of the stores themselves: data/, the DVC cache
    (`dvc cache dir`) and every DVC remote (`dvc remote list`), the prompt store, and every MLflow
    experiment's artifact location (MlflowClient), wherever they are."""
    from lmeraser import tracking

    roots: dict[str, Path] = {"data": ws.data, "dvc cache": cache_dir(ws.root), "artifact store": ws.artifacts}
    not_searched = []
    for name, url in remotes(ws.root).items():
        path = local_path(ws.root, url)
        if path is None:
            not_searched.append(f"dvc remote '{name}' ({url.split('://')[0]}): not on this machine; `dvc gc --cloud -r {name}` still purges it")
        else:
            roots[f"dvc remote '{name}'"] = path
    try:
        locations = tracking.artifact_locations(ws)
    except Exception as error:  # noqa: BLE001 - an unreachable tracking server is a gap to report, not a crash
        locations = {}
        not_searched.append(f"MLflow tracking store ({error.__class__.__name__}): unreachable")
    for label, uri in locations.items():
        path = local_path(ws.root, uri)
        if path is None:
            not_searched.append(f"{label} ({uri.split('://')[0]}): remote artifact store")
        else:
            roots[label] = path
    for label, path in (("mlflow artifacts", ws.mlflow_artifacts), ("mlflow (default root)", ws.mlflow_default_root)):
        roots.setdefault(label, path)
    # Each directory is searched once: under its first name, and not again inside another.
    resolved: dict[str, Path] = {}
    for label, path in roots.items():
        if path.resolve() not in resolved.values():
            resolved[label] = path.resolve()
    nested = {a for a, p in resolved.items() for q in resolved.values() if q in p.parents}
    return Locations({label: roots[label] for label in resolved if label not in nested}, not_searched)


def files(directory: Path) -> Iterable[Path]:
    if directory.exists():
        for base, _, names in os.walk(directory):
            for name in names:
                path = Path(base) / name
                if path.is_file() and not path.is_symlink():
                    yield path


def _content_keys(path: Path, keyer: Keyer) -> set[str]:
    """Keyed content hashes of what a file holds of people's samples: the images of an
    `.npy`-format file, or the contents a feature cache (lmeraser/feature_cache.py) has rows for."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head[:6] == NPY_MAGIC:
        try:
            array = np.load(path, allow_pickle=False, mmap_mode="r")
        except (ValueError, OSError):
            return set()
        if array.dtype != np.uint8 or array.ndim not in (3, 4):  # grey (N, H, W) or RGB (N, H, W, C)
            return set()
        return {keyer.content(content_hash(image)) for image in array}
    if head[8:9] == b"{":  # a safetensors header
        from lmeraser.feature_cache import read

        cached = read(path)
        return {keyer.content(h) for h in cached[1]} if cached else set()
    return set()


def _tensor_digest(path: Path) -> str | None:
    """The tensor digest (lmeraser.audit.forgetting.tensor_digest) of a safetensors file, whatever
    its name or metadata; None for any other file."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head[8:9] != b"{":
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from lmeraser.audit.forgetting import tensor_digest

    try:
        return tensor_digest(load_file(str(path)))
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None


@dataclass
class Hit:
    location: str
    path: str
    kind: str  # "forgotten sample" | "superseded artifact" | "erased sample id" | "audit IN reference"
    digest: str  # the keyed content hash, the artifact's sha256, or the id keyed with the salt


# Sample ids are 20 hex digits (data/splits.make_sample_id): found as tokens in any text a file holds.
_ID_TOKEN = re.compile(rb"(?<![0-9a-f])[0-9a-f]{20}(?![0-9a-f])")
MAX_ID_SEARCH_FILE = 64 << 20  # a bundle's JSON and YAML are small; larger files are weights


def erased_sample_ids(ws: Workspace) -> set[str]:
    """The ids of every erased sample, from the suppression list (a signed subject of every record)."""
    from lmeraser import suppression

    listed = suppression.read(ws)
    return set(listed.loc[listed["reason"] == "forget", "sample_id"]) - {""}


def _ids_in(path: Path, ids: set[str]) -> set[str]:
    if path.stat().st_size > MAX_ID_SEARCH_FILE:
        return set()
    with open(path, "rb") as handle:
        return {token.decode() for token in _ID_TOKEN.findall(handle.read())} & ids


def scan(
    ws: Workspace, sample_keys: set[str], artifact_hashes: set[str], sample_ids: set[str] | None = None, reference_digests: set[str] = frozenset()
) -> tuple[list[Hit], dict[str, int], list[str]]:
    """Search every storage location for the given keyed content hashes and artifact sha256s, for
    the forgetting audit's IN references by tensor digest (`reference_digests`: prompts trained on
    the subjects' data, which must never be written), and the MLflow stores (runs, registered
    bundles) also for the ids of erased samples (`sample_ids`; default: every erased id of the
    suppression list); (hits, files read per location, locations that could not be searched)."""
    keyer = Keyer(ws, create=False) if sample_keys else None
    ids = erased_sample_ids(ws) if sample_ids is None else sample_ids
    id_keyer = Keyer(ws, create=False) if ids else None
    hits, counts = [], {}
    locations = storage_locations(ws)
    for location, directory in locations.roots.items():
        n = 0
        # data/ and the DVC cache keep the tombstones (erased ids, by design); a registered model or
        # a run's artifacts must name none.
        look_for_ids = bool(ids) and location.startswith("mlflow")
        for path in track(files(directory), f"scanning {location}"):
            n += 1
            if keyer is not None:
                for digest in _content_keys(path, keyer) & sample_keys:
                    hits.append(Hit(location, str(path), "forgotten sample", digest))
            if artifact_hashes and (digest := sha256_file(path)) in artifact_hashes:
                hits.append(Hit(location, str(path), "superseded artifact", digest))
            if reference_digests and (digest := _tensor_digest(path)) in reference_digests:
                hits.append(Hit(location, str(path), "audit IN reference", digest))
            if look_for_ids:
                for sid in _ids_in(path, ids):
                    hits.append(Hit(location, str(path), "erased sample id", id_keyer.subject("sample:" + sid)))
        counts[location] = n
    return hits, counts, locations.not_searched


@dataclass
class ScanTargets:
    sample_keys: set[str]  # keyed content hashes of forgotten or replaced samples
    artifact_hashes: set[str]  # prompts trained on them, superseded and not deployed again
    reference_digests: set[str] = frozenset()  # the forgetting audit's IN references (tensor digests)


def scan_targets(ws: Workspace) -> ScanTargets:
    """What must be gone, from the signed records: every erased content, every superseded prompt,
    every forgetting-audit IN reference (also those of a batch still open)."""
    records = lineage_log(ws).read_unverified()
    erased = {key for r in records for key in r.predicate.get("removed_content_keys", [])}
    superseded = {c["prompt_sha256_before"] for r in records for c in r.predicate.get("clusters_rebuilt", []) if c["prompt_sha256_before"]}
    superseded -= set(ws.prompt_index_or_empty().hashes().values())
    references = set()
    # An open batch (stopped by a check, killed) trained references no record names yet.
    from lmeraser.audit.forgetting import in_digests

    for path in ws.batch_files():
        try:
            capture = json.loads(path.read_bytes()).get("done", {}).get("capture") or {}
        except (ValueError, OSError, AttributeError):
            continue
        references |= set(in_digests(capture.get("forgetting_audit")))
    for r in records:
        held = (r.predicate.get("purge") or {}).get("audit_references") or ((r.predicate.get("forgetting_audit") or {}).get("references") or {})
        references |= set(held.get("in_reference_digests", []))
    return ScanTargets(erased, superseded, references)
