"""The durable suppression list `audit/suppression.csv`: what was erased or corrected must stay so.

Each exact batch appends the sample ids and keyed content hashes it forgot (and the corrected
labels and replaced images it rectified) before it changes data/; every materialisation of the
data (`lmeraser data init`, any source, any scheduled retrain) applies the list, so a source that
still holds the data (a warehouse, a bucket) never brings it back. The list is a subject of every
lineage record, so the hash chain covers it, and `data/tombstones.csv` is its copy inside the
DVC-versioned data.

Rows: sample_id, content_key (HMAC of the content hash), reason (forget | rectify-input |
rectify-label), label (the corrected label, rectify-label only).

A correction is not an erasure: a re-ingestion keeps a rectified sample, with its corrected label
and its corrected pixels. The corrected pixels are the personal data as it should be, so they live
where the data lives: a rectify-input row names the sample and the content key of the image it
replaced, and a re-ingestion takes the corrected pixels from that sample in data/ as it is before
the re-ingestion (refusing, in one sentence, when data/ no longer holds them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from lmeraser.errors import DataError
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
        frame = pd.DataFrame(
            [{c: str(r.get(c, "")) for c in TOMBSTONE_COLUMNS} for r in new], columns=TOMBSTONE_COLUMNS
        )
        atomic_write_csv(ws.suppression_file, pd.concat([current, frame], ignore_index=True))
    return len(new)


@dataclass
class Corrections:
    """Image corrections to carry into a re-ingested data set: the corrected pixels of every
    rectified sample, read from data/ before it is replaced."""

    by_id: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)  # sample_id -> (content_hash, pixels)
    by_key: dict[str, str] = field(default_factory=dict)  # content key of a replaced image -> sample_id

    @classmethod
    def of(cls, ws: Workspace, listed: pd.DataFrame) -> Corrections:
        rows = listed[(listed["reason"] == "rectify-input") & (listed["sample_id"] != "")]
        erased = set(listed.loc[listed["reason"] == "forget", "sample_id"])
        wanted = set(rows["sample_id"]) - erased  # a rectified sample forgotten later is simply dropped
        out = cls(by_key={key: sid for sid, key in zip(rows["sample_id"], rows["content_key"]) if sid in wanted})
        if not wanted:
            return out
        for split in ("private", "public"):
            try:
                part = ws.split(split)
            except DataError:
                continue
            for row in np.flatnonzero(part.manifest["sample_id"].isin(wanted).to_numpy()):
                out.by_id[part.sample_ids[row]] = (part.manifest["content_hash"][row], part.images[row])
        missing = sorted(wanted - set(out.by_id))
        if missing:
            raise DataError(
                f"{ws.data}: no longer holds sample {missing[0]}, whose image was corrected "
                f"(a rectify-input row of {ws.suppression_file}); "
                "re-ingesting now would bring back the uncorrected image: "
                "restore data/ first (`dvc checkout data.dvc`)."
            )
        return out


def apply(
    ws: Workspace,
    manifest: pd.DataFrame,
    listed: pd.DataFrame | None = None,
    images: np.ndarray | None = None,
    corrections: Corrections | None = None,
) -> tuple[np.ndarray, pd.DataFrame, np.ndarray | None]:
    """What the list says of these rows: (rows to drop, manifest with corrected labels and content
    hashes, images with corrected pixels). A row whose image was corrected (by its sample id, or
    by the content it had before) gets the corrected pixels from `corrections`; without them
    (`corrections` None) such a row is only reported, by a changed content hash."""
    listed = read(ws) if listed is None else listed
    if listed.empty or manifest.empty:
        return np.zeros(len(manifest), dtype=bool), manifest, images
    keyer = Keyer(ws, create=False)
    ids = set(listed.loc[listed["reason"] == "forget", "sample_id"]) - {""}
    row_keys = [keyer.content(h) for h in manifest["content_hash"]]
    forgotten_keys = set(listed.loc[listed["reason"] == "forget", "content_key"]) - {""}
    replaced = listed[listed["reason"] == "rectify-input"]
    corrected_ids = set(replaced["sample_id"]) - {""}
    # Rows written before rectify-input rows named their sample: the replaced content is dropped.
    legacy_keys = set(replaced.loc[replaced["sample_id"] == "", "content_key"]) - {""}
    drop = manifest["sample_id"].isin(ids).to_numpy() | np.array(
        [k in forgotten_keys or k in legacy_keys for k in row_keys], dtype=bool
    )
    out, pixels = manifest, images
    replaced_keys = dict(zip(replaced["content_key"], replaced["sample_id"]))
    for row, (sid, key) in enumerate(zip(manifest["sample_id"], row_keys)):
        if drop[row]:
            continue
        owner = sid if sid in corrected_ids else replaced_keys.get(key, "")
        if not owner:
            continue
        if owner in ids:  # the corrected sample was forgotten later: its old image goes too
            drop[row] = True
            continue
        if corrections is None:
            continue
        chash, image = corrections.by_id[owner]
        if chash != manifest["content_hash"][row]:
            if out is manifest:
                out = manifest.copy()
                pixels = None if images is None else images.copy()
            out.loc[row, "content_hash"] = chash
            if pixels is not None:
                pixels[row] = image
    labels = listed[listed["reason"] == "rectify-label"]
    if not labels.empty:
        # The last correction of a sample wins (rows are appended in order).
        latest = dict(zip(labels["sample_id"], labels["label"].astype(int)))
        hit = out["sample_id"].isin(latest).to_numpy()
        if hit.any():
            out = out.copy() if out is manifest else out
            out.loc[hit, "label"] = [latest[s] for s in out.loc[hit, "sample_id"]]
    return drop, out, pixels


def violations(ws: Workspace) -> list[str]:
    """Samples in data/ that the list says were erased, whose label it corrected, or whose image it
    replaced: `split:id (why)`. Empty when data/ honours the list (a restored old data version
    would not)."""
    listed = read(ws)
    if listed.empty:
        return []
    out = []
    for split in SPLITS:
        manifest = ws.manifest(split)
        drop, corrected, _ = apply(ws, manifest, listed)
        relabelled = (corrected["label"].to_numpy() != manifest["label"].to_numpy()) & ~drop
        out += [f"{split}:{sid} (erased)" for sid in manifest.loc[drop, "sample_id"]]
        out += [f"{split}:{sid} (label corrected)" for sid in manifest.loc[relabelled, "sample_id"]]
        # A row still holding the image a correction replaced (its sample is not the corrected one).
        keyer = Keyer(ws, create=False)
        stale = {k for k, s in zip(listed["content_key"], listed["reason"]) if s == "rectify-input"} - {""}
        old = np.array([keyer.content(h) in stale for h in manifest["content_hash"]], dtype=bool) & ~drop
        out += [f"{split}:{sid} (image corrected)" for sid in manifest.loc[old, "sample_id"]]
    return out
