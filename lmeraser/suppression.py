"""The durable suppression list `audit/suppression.csv`: what was erased or corrected must stay so.

Each exact batch appends the sample ids and keyed content hashes it forgot (and the corrected
labels and replaced images it rectified) before it changes data/; every materialisation of the
data (`lmeraser data init`, any source, any scheduled retrain) applies the list, so a source that
still holds the data (a warehouse, a bucket) never brings it back. The list is a subject of every
lineage record, so the hash chain covers it, and `data/tombstones.csv` is its copy inside the
DVC-versioned data.

Rows: sample_id, content_key (HMAC of the content hash), reason (forget | rectify-input |
rectify-label), label (the corrected label, rectify-label only).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from lmeraser.io import atomic_write_csv
from lmeraser.salt import Keyer
from lmeraser.workspace import SPLITS, TOMBSTONE_COLUMNS, Workspace


def read(ws: Workspace) -> pd.DataFrame:
    if not ws.suppression_file.exists():
        return pd.DataFrame(columns=TOMBSTONE_COLUMNS)
    frame = pd.read_csv(ws.suppression_file, dtype=str, keep_default_na=False)
    return frame[TOMBSTONE_COLUMNS]


def add(ws: Workspace, rows: list[dict]) -> int:
    """Append rows not yet listed (atomic rewrite); returns how many were new."""
    current = read(ws)
    seen = set(zip(current["sample_id"], current["content_key"], current["reason"]))
    new = [r for r in rows if (r["sample_id"], r["content_key"], r["reason"]) not in seen]
    if new:
        frame = pd.DataFrame([{c: str(r.get(c, "")) for c in TOMBSTONE_COLUMNS} for r in new], columns=TOMBSTONE_COLUMNS)
        atomic_write_csv(ws.suppression_file, pd.concat([current, frame], ignore_index=True))
    return len(new)


def apply(ws: Workspace, manifest: pd.DataFrame, listed: pd.DataFrame | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """(rows of `manifest` to drop, manifest with corrected labels): what the list says of them."""
    listed = read(ws) if listed is None else listed
    if listed.empty or manifest.empty:
        return np.zeros(len(manifest), dtype=bool), manifest
    keyer = Keyer(ws, create=False)
    erased = listed[listed["reason"] != "rectify-label"]
    keys = set(erased["content_key"]) - {""}
    ids = set(erased.loc[erased["reason"] == "forget", "sample_id"]) - {""}
    drop = manifest["sample_id"].isin(ids).to_numpy() | np.array([keyer.content(h) in keys for h in manifest["content_hash"]], dtype=bool)
    labels = listed[listed["reason"] == "rectify-label"]
    corrected = manifest
    if not labels.empty:
        # The last correction of a sample wins (rows are appended in order).
        latest = dict(zip(labels["sample_id"], labels["label"].astype(int)))
        hit = manifest["sample_id"].isin(latest).to_numpy()
        if hit.any():
            corrected = manifest.copy()
            corrected.loc[hit, "label"] = [latest[s] for s in manifest.loc[hit, "sample_id"]]
    return drop, corrected


def violations(ws: Workspace) -> list[str]:
    """Samples in data/ that the list says were erased, or whose label it corrected: `split:id
    (why)`. Empty when data/ honours the list (a restored old data version would not)."""
    listed = read(ws)
    if listed.empty:
        return []
    out = []
    for split in SPLITS:
        manifest = ws.manifest(split)
        drop, corrected = apply(ws, manifest, listed)
        relabelled = (corrected["label"].to_numpy() != manifest["label"].to_numpy()) & ~drop
        out += [f"{split}:{sid} (erased)" for sid in manifest.loc[drop, "sample_id"]]
        out += [f"{split}:{sid} (label corrected)" for sid in manifest.loc[relabelled, "sample_id"]]
    return out
