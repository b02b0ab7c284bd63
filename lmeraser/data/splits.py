"""Deterministic public / private / test splits with stable sample ids.

Layout written under `data/` (tracked by data.dvc):

    data/<split>/<shard>/manifest.csv   sample_id, subject_id, label, split, content_hash (sorted by sample_id)
    data/<split>/<shard>/images.npy     uint8 (N, H, W) or (N, H, W, C), row i belongs to manifest row i
    data/tombstones.csv                 sample_id, content key of every erased or corrected sample
    data/source.json                    where the data came from, how it was split, shards per split

A split is cut into ceil(samples / data.shard_size) shards when it is first written (counted
before the suppression list drops anything, so a re-ingestion after erasures cuts it the same
way); a sample's shard is a hash of its id (workspace.shard_index). An erasure or a correction
rewrites only the shards that held the sample, each atomically, so its cost (and that of
hashing the data version and scanning the stores after it) follows the change, not the split.

Everything is a pure function of (source, params), written with byte-deterministic encoders,
so the committed data.dvc matches what `lmeraser data init` writes on any machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from lmeraser.config import DataParams
from lmeraser.data.sources import RawDataset, load_source
from lmeraser.errors import DataError
from lmeraser.io import (
    atomic_directory,
    atomic_path,
    atomic_write_text,
    recover_directory,
    remove_stale_temp_files,
    sha256_bytes,
)
from lmeraser.workspace import (
    MANIFEST_COLUMNS,
    MAX_SHARDS,
    SPLITS,
    TOMBSTONE_COLUMNS,
    Workspace,
    shard_index,
    shard_name,
)


def content_hash(image: np.ndarray) -> str:
    """sha256 of a sample's pixel bytes: what the audit scan searches for."""
    return sha256_bytes(np.ascontiguousarray(image, dtype=np.uint8).tobytes())


def make_sample_id(chash: str, origin: str, index: int) -> str:
    # Content hash plus the position in the source separates exact duplicates.
    return sha256_bytes(f"{chash}:{origin}:{index}".encode())[:20]


def _stratified_take(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask selecting exactly round(fraction * n) samples, spread over classes in
    proportion (largest remainder), chosen at random within each class."""
    classes, counts = np.unique(labels, return_counts=True)
    quotas = fraction * counts
    take = np.floor(quotas).astype(int)
    short = int(round(fraction * len(labels))) - int(take.sum())
    for i in np.argsort(-(quotas - take), kind="stable")[: max(0, short)]:
        take[i] += 1
    mask = np.zeros(len(labels), dtype=bool)
    for cls, n in zip(classes, take):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        mask[idx[:n]] = True
    return mask


def build_splits(raw: RawDataset, params: DataParams, seed: int) -> dict[str, tuple[pd.DataFrame, np.ndarray]]:
    rng = np.random.default_rng(seed)
    images, labels = raw.train_images, raw.train_labels
    origin = np.array(["train"] * len(labels), dtype=object)
    index = np.arange(len(labels))
    if raw.test_images is None:
        test_mask = _stratified_take(labels, params.test_fraction, rng)
        test = (images[test_mask], labels[test_mask], origin[test_mask], index[test_mask])
        images, labels, origin, index = images[~test_mask], labels[~test_mask], origin[~test_mask], index[~test_mask]
    else:
        n_test = len(raw.test_labels)
        test = (raw.test_images, raw.test_labels, np.array(["test"] * n_test, dtype=object), np.arange(n_test))
    if params.subset is not None and params.subset < len(labels):
        keep = _stratified_take(labels, params.subset / len(labels), rng)
        images, labels, origin, index = images[keep], labels[keep], origin[keep], index[keep]
    public_mask = _stratified_take(labels, params.public_fraction, rng)
    parts = {
        "public": (images[public_mask], labels[public_mask], origin[public_mask], index[public_mask]),
        "private": (images[~public_mask], labels[~public_mask], origin[~public_mask], index[~public_mask]),
        "test": test,
    }
    out = {}
    for split, (imgs, labs, orig, idx) in parts.items():
        if len(labs) == 0:
            raise DataError(
                f"data split '{split}' would be empty; check data.public_fraction, "
                "data.test_fraction and data.subset in params.yaml."
            )
        hashes = [content_hash(img) for img in imgs]
        ids = [make_sample_id(h, o, int(i)) for h, o, i in zip(hashes, orig, idx)]
        if split == "private" and raw.train_subjects is not None:
            subjects = raw.train_subjects[idx].tolist()  # the source's own subject ids
        elif split == "private":
            # No subject ids in the source: synthetic ones, data.n_subjects of them (README says so).
            subjects = [f"s{int(s):05d}" for s in rng.integers(0, params.n_subjects, size=len(labs))]
        else:
            subjects = [split] * len(labs)
        manifest = pd.DataFrame(
            {
                "sample_id": ids,
                "subject_id": subjects,
                "label": labs.astype(np.int64),
                "split": split,
                "content_hash": hashes,
            }
        )
        order = np.argsort(manifest["sample_id"].to_numpy(), kind="stable")
        out[split] = (manifest.iloc[order].reset_index(drop=True), np.ascontiguousarray(imgs[order]))
    return out


def write_split(directory: Path, manifest: pd.DataFrame, images: np.ndarray) -> None:
    """One shard's files (or a split's, in the one-directory layout of data written before shards)."""
    directory.mkdir(parents=True, exist_ok=True)
    manifest[MANIFEST_COLUMNS].to_csv(directory / "manifest.csv", index=False, lineterminator="\n")
    with open(directory / "images.npy", "wb") as handle:
        np.save(handle, images, allow_pickle=False)


def write_shards(directory: Path, manifest: pd.DataFrame, images: np.ndarray, count: int) -> None:
    """A split's `count` shards under `directory` (empty ones too: the layout is fixed)."""
    shards = np.array([shard_index(sid, count) for sid in manifest["sample_id"]], dtype=np.int64)
    for i in range(count):
        rows = np.flatnonzero(shards == i)
        write_split(directory / shard_name(i), manifest.iloc[rows].reset_index(drop=True), images[rows])


def shard_count(samples: int, shard_size: int) -> int:
    return max(1, -(-samples // shard_size))


def recover_data(ws: Workspace) -> list[str]:
    """Finish or undo what a killed writer left in data/ (see io.atomic_directory); what was done."""
    done = recover_directory(ws.data)
    for split in SPLITS:
        done += recover_directory(ws.split_dir(split))
        for directory in ws.shard_dirs(split):
            if directory != ws.split_dir(split):
                done += recover_directory(directory)
    done += [f"removed the temporary file {ws.relative(p)}" for p in remove_stale_temp_files(ws.data, recursive=True)]
    return done


def init_data(params: DataParams, seed: int, ws: Workspace) -> dict:
    """Materialise the splits of `params.source` into the workspace's data/, atomically.

    The suppression list (audit/suppression.csv) is applied first: a sample erased before stays
    out, a corrected label stays corrected, whatever the source still holds; data/tombstones.csv
    is its copy.
    """
    from lmeraser import suppression

    if ws.batch_files():
        raise DataError(
            f"an unlearning batch is in progress ({ws.relative(ws.batch_files()[0])}); "
            "finish it with `lmeraser unlearn` before re-ingesting, or its record would describe data it did not make."
        )
    recover_data(ws)
    raw = load_source(params.source, params.image_size)
    splits = build_splits(raw, params, seed)
    # Counted before the suppression list drops anything: the same source cuts the same shards.
    shards = {split: shard_count(len(manifest), params.shard_size) for split, (manifest, _) in splits.items()}
    too_many = [split for split, count in shards.items() if count > MAX_SHARDS]
    if too_many:
        raise DataError(
            f"data.shard_size {params.shard_size} would cut data/{too_many[0]} into {shards[too_many[0]]:,} shards; "
            f"at most {MAX_SHARDS:,} per split: raise data.shard_size in params.yaml."
        )
    listed = suppression.read(ws)
    corrections = suppression.Corrections.of(ws, listed)  # from data/ as it is, before it is replaced
    suppressed, corrected, replaced = 0, 0, 0
    for split, (manifest, images) in list(splits.items()):
        drop, fixed, pixels = suppression.apply(ws, manifest, listed, images, corrections)
        corrected += int(((fixed["label"] != manifest["label"]).to_numpy() & ~drop).sum())
        replaced += int(((fixed["content_hash"] != manifest["content_hash"]).to_numpy() & ~drop).sum())
        suppressed += int(drop.sum())
        splits[split] = (fixed.loc[~drop].reset_index(drop=True), np.ascontiguousarray(pixels[~drop]))
    summary = {
        "source": raw.name,
        "seed": seed,
        "image_shape": list(raw.train_images.shape[1:]),
        "num_classes": int(max(raw.train_labels.max(), -1 if raw.test_labels is None else raw.test_labels.max()) + 1),
        "counts": {split: len(manifest) for split, (manifest, _) in splits.items()},
        "shards": shards,
        "shard_size": params.shard_size,
        "suppressed": suppressed,
        "labels_corrected": corrected,
        "images_corrected": replaced,
    }
    with atomic_directory(ws.data) as staging:
        for split, (manifest, images) in splits.items():
            write_shards(staging / split, manifest, images, shards[split])
        listed.to_csv(staging / "tombstones.csv", index=False, lineterminator="\n")
        info = {k: v for k, v in summary.items() if k not in ("suppressed", "labels_corrected", "images_corrected")}
        (staging / "source.json").write_text(source_json(info))
    return summary


def source_json(info: dict) -> str:
    return json.dumps(info, indent=2, sort_keys=True) + "\n"


def refresh_counts(ws: Workspace) -> None:
    """Make data/source.json's per-split counts those of the splits as they are (after samples were
    removed), so a re-ingestion that yields the same splits yields the same data version."""
    info = ws.source_info()
    counts = {split: len(ws.manifest(split)) for split in SPLITS}
    if info.get("counts") != counts:
        atomic_write_text(ws.source_info_file, source_json({**info, "counts": counts}))


def add_tombstones(rows: list[dict], ws: Workspace) -> None:
    """Append (sample_id, content_key, reason, label) rows, skipping ones already present; atomic."""
    current = ws.tombstones()
    seen = set(zip(current["sample_id"], current["content_key"], current["reason"]))
    new = [r for r in rows if (r["sample_id"], r["content_key"], r["reason"]) not in seen]
    if not new:
        return
    frame = pd.concat(
        [
            current,
            pd.DataFrame([{c: str(r.get(c, "")) for c in TOMBSTONE_COLUMNS} for r in new], columns=TOMBSTONE_COLUMNS),
        ],
        ignore_index=True,
    )
    with atomic_path(ws.tombstones_file) as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")


def update_sample(
    sample_id: str, split: str, ws: Workspace, label: int | None = None, image: np.ndarray | None = None
) -> dict:
    """Correct one sample's label or pixels in place (an atomic rewrite of its shard); returns the old row."""
    directory = ws.shard_dir_of(split, sample_id)
    manifest = ws.shard_manifest(directory)
    images = ws.shard_images(directory, len(manifest))
    rows = np.flatnonzero(manifest["sample_id"].to_numpy() == sample_id)
    if len(rows) != 1:
        raise DataError(f"sample id {sample_id} is not in data/{split}.")
    row = int(rows[0])
    old = manifest.iloc[row].to_dict()
    manifest, images = manifest.copy(), images.copy()
    if label is not None:
        manifest.loc[row, "label"] = int(label)
    if image is not None:
        images[row] = image
        manifest.loc[row, "content_hash"] = content_hash(image)
    with atomic_directory(directory) as staging:
        write_split(staging, manifest, images)
    return old


def remove_samples(sample_ids: list[str] | set[str], split: str, ws: Workspace) -> pd.DataFrame:
    """Delete samples from a split (manifest rows and pixel bytes); returns the removed rows.

    Each shard that held one is rebuilt beside the old one and swapped in (the others are not
    touched), so a crash leaves every shard either old or new; the batch that called this
    re-runs it for the samples still present (lmeraser/unlearning/exact.py).
    """
    by_shard: dict[Path, set[str]] = {}
    for sid in set(sample_ids):
        by_shard.setdefault(ws.shard_dir_of(split, sid), set()).add(sid)
    shards = []
    for directory, wanted in sorted(by_shard.items()):
        manifest = ws.shard_manifest(directory)
        hit = manifest["sample_id"].isin(wanted).to_numpy()
        unknown = wanted - set(manifest.loc[hit, "sample_id"])
        if unknown:
            raise DataError(f"sample id {sorted(unknown)[0]} is not in data/{split}.")
        shards.append((directory, manifest, hit))
    removed = []
    for directory, manifest, hit in shards:  # everything checked before anything is written
        images = ws.shard_images(directory, len(manifest))
        with atomic_directory(directory) as staging:
            write_split(staging, manifest.loc[~hit].reset_index(drop=True), np.ascontiguousarray(images[~hit]))
        removed.append(manifest.loc[hit])
    frame = pd.concat(removed, ignore_index=True) if removed else pd.DataFrame(columns=MANIFEST_COLUMNS)
    return frame.sort_values("sample_id", kind="stable").reset_index(drop=True)
