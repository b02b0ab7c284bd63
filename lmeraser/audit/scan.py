"""`audit scan`: search every storage location for forgotten samples' pixels and for prompt
artifacts that were trained on them (invariant 5).

The locations are data/, the DVC cache and the default local remote, artifacts/ and the MLflow
artifact roots. Every `.npy`-format file (whatever its name, e.g. in a cache) is read and each
image's content hash keyed with the workspace's salt (records hold keyed hashes only), and so are
the content hashes a feature cache holds rows for (whatever its name); every
file's sha256 is compared with the superseded artifacts, and every file (but the current
tombstones, which name them by design) is searched for the ids of erased samples. What to look
for comes from the signed records and the suppression list, never from data/, which a
re-ingestion could have rewritten.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmeraser.audit.stores import storage_locations
from lmeraser.data.splits import content_hash
from lmeraser.errors import reason
from lmeraser.io import sha256_file
from lmeraser.lineage.records import lineage_log
from lmeraser.progress import track
from lmeraser.salt import Keyer
from lmeraser.workspace import Workspace

NPY_MAGIC = b"\x93NUMPY"


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
_ID_TOKEN = re.compile(rb"(?<![0-9a-fA-F])[0-9a-fA-F]{20}(?![0-9a-fA-F])")
ID_SEARCH_CHUNK = 64 << 20  # a file is searched in chunks of this size (overlapping by a token and its edges)


def erased_sample_ids(ws: Workspace) -> set[str]:
    """The ids of every erased sample, from the suppression list (a signed subject of every record).

    Args:
        ws: the workspace whose suppression list is read.
    """
    from lmeraser import suppression

    listed = suppression.read(ws)
    return set(listed.loc[listed["reason"] == "forget", "sample_id"]) - {""}


def _tokens(data: bytes) -> set[str]:
    """The sample-id-shaped tokens in `data`, lower-cased (ids are written in either case)."""
    return {token.decode().lower() for token in _ID_TOKEN.findall(data)}


def _sha256_and_id_tokens(path: Path) -> tuple[str, set[str]]:
    """A file's sha256 and every sample-id-shaped token it names, in one read whatever its size,
    and every element of an `.npy` array of strings (ids stored back to back have no separator)."""
    digest, tokens, carry = hashlib.sha256(), set(), b""
    with open(path, "rb") as handle:
        while chunk := handle.read(ID_SEARCH_CHUNK):
            if not carry and chunk[:6] == NPY_MAGIC:
                tokens |= _npy_string_tokens(path)
            digest.update(chunk)
            data = carry + chunk
            tokens |= _tokens(data)
            carry = data[-22:]  # a token cut by the chunk's end is whole in the next, with its edges
    return digest.hexdigest(), tokens


def _npy_string_tokens(path: Path) -> set[str]:
    """The tokens of each element of an `.npy` array of strings (none for any other array)."""
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError):
        return set()
    if array.dtype.kind not in "SU":
        return set()
    return {t for value in array.ravel() for t in _tokens(value if isinstance(value, bytes) else str(value).encode())}


@dataclass
class ScanReport:
    hits: list[Hit]
    counts: dict[str, int]  # files searched per location
    not_searched: list[str]  # locations this machine cannot read, with why
    read: dict[str, int]  # files read per location; the others were answered by the scan index
    index: dict  # the scan index: mode (incremental | full | none), why a full scan, sha256 as saved
    remote_stores: dict = field(
        default_factory=dict
    )  # searched stores not on this machine: what and where (no credentials)

    def summary(self) -> dict:
        """What a record signs about the scan (remote stores named only where there are some, so a
        local workspace's record is what it always was)."""
        summary = {
            "hits": len(self.hits),
            "files_scanned": self.counts,
            "files_read": self.read,
            "not_searched": self.not_searched,
            "index": self.index,
        }
        if self.remote_stores:
            summary["remote_stores"] = self.remote_stores
        return summary


def _search(
    store, index, keyer: Keyer | None, targets: tuple, seen: dict[str, dict]
) -> tuple[int, int, dict, list[Hit]]:
    """One store: (files listed, files read, the index entries, the hits); `seen`: what each
    content read so far holds, by sha256 (_holdings)."""
    sample_keys, artifact_hashes, reference_digests, keyed_ids, tombstones_sha256 = targets  # the last: a set
    n = fresh = 0
    entries, hits = {}, []
    root = store.root  # a directory's resolves its path: once per store, not per file
    for rel, ident in track(store.listing(), f"scanning {store.label}"):
        entry = index.known(store.label, root, rel, ident) if index is not None else None
        if entry is None:
            try:
                with store.local(rel) as path:
                    entry = {"id": ident, **_holdings(path, keyer, seen)}
            except FileNotFoundError:
                if store.elsewhere:
                    raise  # listed and not readable: the store is not searched, never silently passed
                continue  # removed since the listing: nothing of it is left to find
            fresh += 1
        n += 1
        entries[rel] = entry
        where = store.where(rel)
        for digest in set(entry.get("keys", ())) & sample_keys:
            hits.append(Hit(store.label, where, "forgotten sample", digest))
        if entry["sha256"] in artifact_hashes:
            hits.append(Hit(store.label, where, "superseded artifact", entry["sha256"]))
        if entry["digest"] is not None and entry["digest"] in reference_digests:
            hits.append(Hit(store.label, where, "audit IN reference", entry["digest"]))
        named = set() if entry["sha256"] in tombstones_sha256 else set(entry.get("ids", ()))
        named |= {keyer.subject("sample:" + sid) for sid in _tokens(rel.encode(errors="replace"))} if keyer else set()
        for digest in sorted(named & keyed_ids):
            hits.append(Hit(store.label, where, "erased sample id", digest))
    return n, fresh, entries, hits


TOMBSTONES_HEADER = b"sample_id,content_key,reason,label"
_TOMBSTONE_ROW = re.compile(rb"(?:[0-9a-f]{20})?,(?:[0-9a-f]{64})?,[a-z-]+,[0-9]*")


def tombstone_versions(ws: Workspace) -> set[str]:
    """sha256 of data/tombstones.csv as it is and of each earlier version (the file is only ever
    appended to: each version is its prefix at a row's end), when every row is a tombstone's
    (id, keyed content hash, reason, label); empty otherwise: an edited file (a manifest's line
    appended, say) is searched like any other.

    Args:
        ws: the workspace whose tombstones file is read.
    """
    try:
        raw = ws.tombstones_file.read_bytes() if ws.tombstones_file.is_file() else b""
    except OSError:
        return set()
    lines = raw.splitlines(keepends=True)
    if not lines or lines[0].rstrip(b"\r\n") != TOMBSTONES_HEADER:
        return set()
    if any(not _TOMBSTONE_ROW.fullmatch(line.rstrip(b"\r\n")) for line in lines[1:]):
        return set()
    versions, digest = set(), hashlib.sha256()
    for line in lines:
        digest.update(line)
        versions.add(digest.hexdigest())
    return versions


def _holdings(path: Path, keyer: Keyer | None, seen: dict[str, dict] | None = None) -> dict:
    """What the scan looks for in one file: the keyed content hashes of the samples it holds, its
    sha256, its tensor digest, and the keyed sample ids it names. `seen` (sha256 -> the rest):
    contents already read, this scan or an earlier one the index keeps; a file of the same bytes
    (a shard, its DVC cache object and the remote's copy) is only hashed, and what it holds is
    taken from there: the same bytes hold the same samples and name the same ids."""
    if seen is not None:
        sha256 = sha256_file(path)
        if (known := seen.get(sha256)) is not None:
            return {"sha256": sha256, **known}
    sha256, tokens = _sha256_and_id_tokens(path)
    entry = {"sha256": sha256, "digest": _tensor_digest(path)}
    if keyer is not None:
        entry["keys"] = sorted(_content_keys(path, keyer))
        entry["ids"] = sorted(keyer.subject("sample:" + sid) for sid in tokens)
    if seen is not None:
        seen[sha256] = {k: v for k, v in entry.items() if k != "sha256"}
    return entry


def scan(
    ws: Workspace,
    sample_keys: set[str],
    artifact_hashes: set[str],
    sample_ids: set[str] | None = None,
    reference_digests: set[str] = frozenset(),
    full: bool = False,
) -> ScanReport:
    """Search every storage location for the given keyed content hashes and artifact sha256s, for
    the forgetting audit's IN references by tensor digest (`reference_digests`: prompts trained on
    the subjects' data, which must never be written), and for the ids of erased samples
    (`sample_ids`; default: every erased id of the suppression list) in any file but the current
    tombstones. Files unchanged since the scan index read them are answered from it
    (lmeraser/audit/scan_index.py); `full` reads every file and rebuilds the index.

    Args:
        ws: the workspace whose stores are searched (and the DVC remotes and MLflow locations it names).
        sample_keys: keyed (HMAC) content hashes of erased images.
        artifact_hashes: sha256 of superseded prompt files.
        sample_ids: erased sample ids to find (default: the suppression list's).
        reference_digests: tensor digests of the forgetting audit's IN references.
        full: read every file, not only those new or changed since the scan index.

    Returns:
        The hits, the files listed and read per store, the stores not searched (with the
        reason) and the index searched.
    """
    import time

    from lmeraser.audit.scan_index import ScanIndex
    from lmeraser.errors import DataError

    ids = erased_sample_ids(ws) if sample_ids is None else sample_ids
    try:
        keyer = Keyer(ws, create=False)
    except DataError:
        if sample_keys or ids:
            raise  # keyed targets and no salt to key with: the error says what to restore
        keyer = None  # nothing was ever keyed here: nothing erased to find by key, and no index
    started = time.time()  # a full scan saw every file as it was from here on
    keyed_ids = {keyer.subject("sample:" + sid) for sid in ids} if keyer is not None else set()
    index = ScanIndex.load(ws, keyer, full) if keyer is not None else None
    hits, counts, read, found, remote = [], {}, {}, {}, {}
    locations = storage_locations(ws)
    not_searched = list(locations.not_searched)
    # Every file is searched for erased ids too (a copy of a shard's manifest names its samples),
    # except data/tombstones.csv and its earlier versions (and their copies in the DVC cache and
    # remotes, by content): they name erased ids by design.
    targets = (sample_keys, artifact_hashes, reference_digests, keyed_ids, tombstone_versions(ws))
    # What each content holds, by sha256: from the index (unless this scan reads everything) and
    # from every file this scan reads, so that the copies of one content are read for it once.
    seen = (
        {sha: content for sha, content in index.contents.items() if "ids" in content}
        if index is not None and index.reason is None
        else {}
    )
    for location, store in locations.stores.items():
        try:
            n, fresh, entries, found_here = _search(store, index, keyer, targets, seen)
        except Exception as error:  # noqa: BLE001 - a store elsewhere that fails mid-scan is not searched; a local one raises
            if not store.elsewhere:
                raise
            not_searched.append(f"{location} ({store.root}): cannot be read from here ({reason(error)})")
            continue
        hits += found_here
        not_searched += [f"{location}: {skipped}" for skipped in getattr(store, "skipped", ())]
        counts[location], read[location] = n, fresh
        found[location] = (store.root, entries)
        if store.elsewhere:
            remote[location] = store.describe()
    if index is None:
        report = {"mode": "none", "reason": "no salt yet, so nothing was erased here and no index is kept"}
    else:
        report = {"mode": "full" if index.reason else "incremental", "reason": index.reason}
        try:
            report["sha256"] = index.replace(found, started if index.reason else None)
        except OSError as error:  # the scan stands; the next one reads everything again
            report["sha256"], report["not_saved"] = (
                None,
                f"{ws.relative(ws.scan_index_file)}: {error.__class__.__name__}",
            )
    return ScanReport(hits, counts, not_searched, read, report, remote)


@dataclass
class ScanTargets:
    sample_keys: set[str]  # keyed content hashes of forgotten or replaced samples
    artifact_hashes: set[str]  # prompts trained on them, superseded and not deployed again
    reference_digests: set[str] = frozenset()  # the forgetting audit's IN references (tensor digests)


def scan_targets(ws: Workspace) -> ScanTargets:
    """What must be gone, from the signed records: every erased content, every superseded prompt,
    every forgetting-audit IN reference (also those of a batch still open).

    Args:
        ws: the workspace whose records and open batch are read.
    """
    records = lineage_log(ws).read_unverified()
    erased = {key for r in records for key in r.predicate.get("removed_content_keys", [])}
    superseded = {
        c["prompt_sha256_before"]
        for r in records
        for c in r.predicate.get("clusters_rebuilt", [])
        if c["prompt_sha256_before"]
    }
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
        held = (r.predicate.get("purge") or {}).get("audit_references") or (
            (r.predicate.get("forgetting_audit") or {}).get("references") or {}
        )
        references |= set(held.get("in_reference_digests", []))
    return ScanTargets(erased, superseded, references)
