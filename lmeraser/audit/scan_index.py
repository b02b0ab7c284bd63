"""The scan index: what each stored file holds, so a batch's scan reads only new or changed files.

`audit scan` must show that no copy of a forgotten sample is left in any store. Reading every
store on every batch makes a forget cost a full read of the data (invariant 7: cost follows the
change). The index keeps, per location and file, its identity and sha256, and per content (by
sha256) what the scan looks for in it: the keyed content hashes of the images (or feature-cache
rows) it holds, its tensor digest (safetensors) and the keyed sample ids it names (an entry read
before ids were searched in every store holds none, and is read again). A data shard, its DVC
cache object and its copy on the remote are the same bytes, so what they hold is kept once (the
index is a third of the size it would be per file). A scan lists every file (metadata only),
reads the ones whose identity changed, and answers the targets from the index for the rest: what
a file holds does not depend on what is searched, so new targets are found in old files.

A file's identity is (device, inode, size, mtime, ctime): a write changes its ctime, which no
user-space call can set back, so a copy planted into an indexed file is read again. The index is
authenticated with the workspace's salt (an HMAC: an edit without the secret is detected) and
bound to it (keyed hashes mean nothing under another salt). A missing, damaged, altered or
foreign index means a full scan, with the reason in the scan's report; `lmeraser audit scan
--full` reads everything and rebuilds it. The report carries the sha256 of the index as saved, so
a record says what was searched.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from lmeraser.errors import LmeraserError
from lmeraser.io import MissingFile, atomic_write_bytes, read_trusted
from lmeraser.salt import Keyer
from lmeraser.workspace import Workspace

MAX_INDEX_BYTES = 1 << 34  # far above any real index (a few hundred bytes per stored file): a device is not read
VERSION = 2  # 1 kept what a file holds per file; a version-1 index means one full scan


@dataclass
class ScanIndex:
    """Entries by location label, then by path relative to the location's root."""

    path: Path
    keyer: Keyer
    locations: dict[str, dict] = field(default_factory=dict)  # label -> {"root": str, "files": {rel: {id, sha256}}}
    contents: dict[str, dict] = field(default_factory=dict)  # sha256 -> {"digest", "keys", "ids" (MLflow)}
    full_scan_at: float | None = None  # when every file was last read (a full scan)
    reason: str | None = None  # why this scan reads everything (None: incremental)

    @classmethod
    def load(cls, ws: Workspace, keyer: Keyer, full: bool = False) -> ScanIndex:
        """The workspace's saved index, or an empty one whose `reason` says why this scan reads everything (asked for,
        missing, unreadable, damaged, altered or of another format).

        Args:
            ws: the workspace whose scan index file is read.
            keyer: the workspace's salt: it authenticates the index and keys the hashes in it.
            full: start from an empty index, as `lmeraser audit scan --full` asks.
        """
        path = ws.scan_index_file
        index = cls(path, keyer)
        if full:
            index.reason = "a full scan was asked for"
            return index
        try:  # a regular file only, never through a link, never blocking on a FIFO
            raw = read_trusted(path, "scan index", MAX_INDEX_BYTES)
        except MissingFile:
            index.reason = "no scan index yet"
            return index
        except LmeraserError as error:
            index.reason = f"the scan index cannot be read ({str(error).split(': ', 1)[-1].rstrip('.')})"
            return index
        body, problem = keyer.unseal("scan-index", raw)
        if problem == "damaged":
            index.reason = "the scan index is damaged (not the JSON it writes)"
            return index
        if problem == "altered":
            index.reason = "the scan index fails its authentication (altered, or made with another salt)"
            return index
        if body.get("version") != VERSION:
            index.reason = f"the scan index has format {body.get('version')!r}, this code writes {VERSION}"
            return index
        index.locations = body.get("locations") or {}
        index.contents = body.get("contents") or {}
        index.full_scan_at = body.get("full_scan_at")
        return index

    def known(self, label: str, root: str, rel: str, ident: list | None) -> dict | None:
        """The entry of a file whose identity has not changed since it was read ({"id", "sha256"}
        and what its content holds), else None (also for a file without an identity:
        lmeraser/audit/stores.py, and for one whose content was read before sample ids were searched).

        Args:
            label: the location's label (`Store.label`).
            root: the location's root (`Store.root`); an index kept for another root answers nothing.
            rel: the file's path relative to that root.
            ident: the file's identity as the store lists it now; None: it has none.
        """
        if self.reason is not None or ident is None:
            return None
        location = self.locations.get(label)
        if location is None or location.get("root") != str(root):
            return None
        entry = location["files"].get(rel)
        if entry is None or entry.get("id") != ident:
            return None
        content = self.contents.get(entry.get("sha256"))
        if content is None or "ids" not in content:
            return None
        return {**entry, **content}

    def replace(self, found: dict[str, tuple[str, dict[str, dict]]], full_scan_at: float | None) -> str:
        """Save the index of this scan (every file listed, as found or read) atomically; its sha256.

        Args:
            found: label -> (root, relative path -> entry) for every location this scan searched.
            full_scan_at: when this scan started, in seconds since the epoch, if it read every file; None: keep the last
                full scan's time.
        """
        self.locations, self.contents = {}, {}
        for label, (root, files) in found.items():
            self.locations[label] = {"root": str(root), "files": {}}
            for rel, entry in files.items():
                self.locations[label]["files"][rel] = {"id": entry["id"], "sha256": entry["sha256"]}
                content = {k: v for k, v in entry.items() if k not in ("id", "sha256")}
                self.contents[entry["sha256"]] = content
        if full_scan_at is not None:
            self.full_scan_at = full_scan_at
        body = {
            "version": VERSION,
            "salt": self.keyer.fingerprint(),
            "full_scan_at": self.full_scan_at,
            "locations": self.locations,
            "contents": self.contents,
        }
        data = self.keyer.seal("scan-index", body)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, data, mode=0o600)
        return hashlib.sha256(data).hexdigest()
