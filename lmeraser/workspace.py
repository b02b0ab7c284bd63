"""Every location in a workspace, and typed readers for what lives there.

The bottom layer: every other module asks a `Workspace` where things are instead of spelling
out paths, and reads the files below through the readers here, so the on-disk layout has one
owner. Readers move bytes into typed structures; they compute nothing (which is why the stage
registry does not count this module as code a stage's outputs depend on).

    params.yaml                       the pipeline's parameters (or any file --params names)
    data/<split>/<shard>/{manifest.csv,images.npy}, data/source.json, data/tombstones.csv
                                      a split in shards (source.json says how many; a sample's
                                      shard is a hash of its id), so an erasure rewrites one shard
    artifacts/validation/<split>.json one fingerprint ticket per validated split
    artifacts/backbone/{backbone.safetensors,backbone.json}
    artifacts/clusters/{prototypes.npy,prototypes.json,assignments.csv}
    artifacts/prompts/index.json      the exact prompts (signed: nothing volatile in it)
    artifacts/prompts/last_run.json   what the last train run trained, reused and retired
    artifacts/prompts/store/          content-addressed prompt artifacts (<key>.safetensors)
    artifacts/prompts/approximate/    the influence overlay (overlay.json + its artifacts)
    reports/, metrics.json            evaluation outputs (DVC metrics and plots)
    audit/                            journal, lineage log, batch state, keys
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lmeraser.errors import KERNEL_TREES, DataError, LmeraserError

SPLITS = ("public", "private", "test")
MANIFEST_COLUMNS = ["sample_id", "subject_id", "label", "split", "content_hash"]
# Tombstones and the suppression list: content_key is an HMAC of the content hash (lmeraser/salt.py);
# reason: forget | rectify-input | rectify-label (label: the corrected label).
TOMBSTONE_COLUMNS = ["sample_id", "content_key", "reason", "label"]
KEY_FILE_ENV = "LMERASER_SIGNING_KEY_FILE"  # where the signing key lives, if not in audit/keys/


def image_channels(image_shape) -> int:
    """Channels of an image of shape (H, W) (grey: 1) or (H, W, C)."""
    return 1 if len(image_shape) == 2 else int(image_shape[2])


def check_root(root: Path) -> None:
    """A workspace root is a directory (or not yet made) outside the kernel's trees (/proc, /sys,
    /dev); anything else is one sentence."""
    from lmeraser.errors import shown

    try:
        resolved = root.resolve()
        is_file = root.exists() and not root.is_dir()
    except (OSError, RuntimeError) as error:  # a name too long, a symlink loop, ...
        raise LmeraserError(
            f"{shown(root, 200)}: cannot be used as the workspace root "
            f"({getattr(error, 'strerror', None) or error.__class__.__name__})."
        ) from None
    for tree in KERNEL_TREES:
        if resolved == tree or tree in resolved.parents:
            raise LmeraserError(
                f"{shown(root, 200)}: the workspace root cannot be inside {tree} (a kernel file system); "
                "pass a directory with --root."
            )
    if is_file:
        raise LmeraserError(f"{shown(root, 200)}: the workspace root is not a directory; pass a directory with --root.")


@dataclass(frozen=True)
class Workspace:
    """One workspace: the repository root a pipeline runs in, and the params file it uses."""

    root: Path = Path(".")
    params_file: Path | None = None  # default: <root>/params.yaml

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        check_root(self.root)
        params = Path(self.params_file) if self.params_file is not None else self.root / "params.yaml"
        object.__setattr__(self, "params_file", params)

    @property
    def pipeline_params_file(self) -> Path:
        """The params file dvc.yaml's stages read (whatever --params a command was given)."""
        return self.root / "params.yaml"

    def relative(self, path: Path) -> str:
        """A path as the records name it: relative to the root, with forward slashes."""
        return Path(path).relative_to(self.root).as_posix()

    # -- data ----------------------------------------------------------------------------------

    @property
    def data(self) -> Path:
        return self.root / "data"

    def split_dir(self, split: str) -> Path:
        return self.data / split

    def shard_dirs(self, split: str) -> list[Path]:
        """The directories holding a split's shards, each a `manifest.csv` and an `images.npy`. A
        split is cut into the number of shards `data/source.json` names (`shards`) when it is
        written, so that an erasure rewrites, re-hashes and re-scans one shard, not the split.
        Without that entry (data written before shards), the split's directory is its one shard."""
        count = self.shard_count(split)
        if count is None:
            return [self.split_dir(split)]
        return [self.split_dir(split) / shard_name(i) for i in range(count)]

    def shard_count(self, split: str) -> int | None:
        """How many shards `data/source.json` says the split has; None: the one-directory layout."""
        if not self.source_info_file.exists():
            return None
        info = self.source_info()
        shards = info.get("shards") if isinstance(info, dict) else None
        if shards is None:
            return None
        if not isinstance(shards, dict):
            raise DataError(f"{self.source_info_file}: shards is {shards!r}, not a count per split.")
        count = shards.get(split)
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_SHARDS:
            raise DataError(
                f"{self.source_info_file}: shards.{split} is {count!r}, not a whole number from 1 to {MAX_SHARDS:,}."
            )
        return count

    def shard_dir_of(self, split: str, sample_id: str) -> Path:
        """The shard directory that holds (or would hold) `sample_id` in `split`."""
        count = self.shard_count(split)
        if count is None:
            return self.split_dir(split)
        return self.split_dir(split) / shard_name(shard_index(sample_id, count))

    def check_shards(self, split: str) -> list[Path]:
        """The split's shard directories, checked against what is on disk: a directory
        `data/source.json` does not count (a copy, a count lowered by hand) or one it counts that
        is missing is one sentence, before any is read (the temporary directories of an
        interrupted write, named with a leading dot, are recovery's)."""
        count = self.shard_count(split)
        if count is None:
            return [self.split_dir(split)]
        root = self.split_dir(split)
        try:
            present = {name for name in os.listdir(root) if not name.startswith(".")}
        except FileNotFoundError:
            present = set()
        except OSError as error:
            raise DataError(f"{root}: cannot be listed ({error.__class__.__name__}).") from None
        stray = sorted(name for name in present if not _is_shard_name(name, count))
        if stray:
            raise DataError(
                f"{root / stray[0]}: not one of the {count} shards data/source.json names for {split}; "
                "the data was changed by hand: run 'lmeraser data init'."
            )
        if len(present) < count:
            missing = next(i for i in range(count) if shard_name(i) not in present)
            raise DataError(
                f"{root / shard_name(missing)}: not found; {self._missing_advice(root / shard_name(missing))}."
            )
        return [root / shard_name(i) for i in range(count)]

    @property
    def source_info_file(self) -> Path:
        return self.data / "source.json"

    @property
    def tombstones_file(self) -> Path:
        return self.data / "tombstones.csv"

    @property
    def data_dvc(self) -> Path:
        return self.root / "data.dvc"

    @property
    def dvc_lock(self) -> Path:
        return self.root / "dvc.lock"

    @property
    def dvc_dir(self) -> Path:
        return self.root / ".dvc"

    # -- artifacts -----------------------------------------------------------------------------

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def validation(self) -> Path:
        return self.artifacts / "validation"

    def validation_ticket(self, split: str) -> Path:
        return self.validation / f"{split}.json"

    @property
    def backbone_dir(self) -> Path:
        return self.artifacts / "backbone"

    @property
    def backbone_weights(self) -> Path:
        return self.backbone_dir / "backbone.safetensors"

    @property
    def backbone_meta_file(self) -> Path:
        return self.backbone_dir / "backbone.json"

    @property
    def clusters(self) -> Path:
        return self.artifacts / "clusters"

    @property
    def prototypes_file(self) -> Path:
        return self.clusters / "prototypes.npy"

    @property
    def prototypes_meta_file(self) -> Path:
        return self.clusters / "prototypes.json"

    @property
    def assignments_file(self) -> Path:
        return self.clusters / "assignments.csv"

    @property
    def score_cache_file(self) -> Path:
        """The test split's features, routes and logits (lmeraser/score_cache.py); not versioned."""
        return self.artifacts / "cache" / "test-scores.safetensors"

    @property
    def feature_cache_dir(self) -> Path:
        """The private split's backbone features by content, one file per shard of the split
        (lmeraser/feature_cache.py); not versioned."""
        return self.artifacts / "cache" / "private-features"

    @property
    def legacy_feature_cache_file(self) -> Path:
        """The one-file feature cache written before it followed the shards (removed on sight)."""
        return self.artifacts / "cache" / "private-features.safetensors"

    @property
    def prompts(self) -> Path:
        return self.artifacts / "prompts"

    @property
    def prompt_index_file(self) -> Path:
        return self.prompts / "index.json"

    @property
    def last_run_file(self) -> Path:
        return self.prompts / "last_run.json"

    @property
    def pins_file(self) -> Path:
        """The exact prompts the latest lineage record signed: kept by every train run's prune."""
        return self.prompts / "pinned.json"

    @property
    def store_dir(self) -> Path:
        return self.prompts / "store"

    @property
    def overlay_dir(self) -> Path:
        return self.prompts / "approximate"

    @property
    def overlay_file(self) -> Path:
        return self.overlay_dir / "overlay.json"

    # -- reports -------------------------------------------------------------------------------

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def data_docs(self) -> Path:
        return self.reports / "data_docs"

    @property
    def plots(self) -> Path:
        return self.reports / "plots"

    @property
    def cluster_report(self) -> Path:
        return self.reports / "clusters.json"

    @property
    def baselines_report(self) -> Path:
        return self.reports / "baselines.json"

    @property
    def confusion_report(self) -> Path:
        return self.reports / "confusion_matrix.json"

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.json"

    # -- MLflow defaults (a tracking server, if configured, keeps its own) ----------------------

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def mlflow_default_root(self) -> Path:
        return self.root / "mlruns"

    # -- audit ---------------------------------------------------------------------------------

    @property
    def audit(self) -> Path:
        return self.root / "audit"

    @property
    def journal_file(self) -> Path:
        return self.audit / "journal.jsonl"

    @property
    def lineage_file(self) -> Path:
        return self.audit / "lineage.jsonl"

    @property
    def batches(self) -> Path:
        return self.audit / "batches"

    def batch_file(self, batch_id: str) -> Path:
        return self.batches / f"{batch_id}.json"

    def batch_files(self) -> list[Path]:
        """State files of exact batches not finished (oldest id first; normally none or one)."""
        return sorted(self.batches.glob("batch-*.json"))

    @property
    def inputs_dir(self) -> Path:
        """Copies of corrected images, taken at submission (personal data: never committed)."""
        return self.audit / "inputs"

    @staticmethod
    def corrected_input(request_id: str) -> str:
        """Where a rectify request's corrected image is copied, relative to the workspace root (the
        only path a request may name: the batch deletes it once the data holds the correction)."""
        return f"audit/inputs/{request_id}.npy"

    @property
    def scan_index_file(self) -> Path:
        """What each stored file holds, for incremental scans (lmeraser/audit/scan_index.py); 0600."""
        return self.audit / "scan-index.json"

    @property
    def influence_intent_file(self) -> Path:
        """Written before an influence update changes the overlay, removed once its record is journaled."""
        return self.batches / "influence.intent.json"

    @property
    def keys_dir(self) -> Path:
        return self.audit / "keys"

    @property
    def signing_key_file(self) -> Path:
        """$LMERASER_SIGNING_KEY_FILE, else audit/keys/signing-key.pem."""
        configured = os.environ.get(KEY_FILE_ENV)
        return Path(configured) if configured else self.keys_dir / "signing-key.pem"

    @property
    def signing_key_configured(self) -> bool:
        """Whether $LMERASER_SIGNING_KEY_FILE names the key: a configured key is never created here."""
        return bool(os.environ.get(KEY_FILE_ENV))

    @property
    def signer_file(self) -> Path:
        """The pinned signer: the public key every record must verify with, written with the first
        record and committed (or handed to auditors); `audit verify` trusts it, not the private key."""
        return self.audit / "lineage-public-key.pem"

    @property
    def suppression_file(self) -> Path:
        return self.audit / "suppression.csv"

    @property
    def api_token_file(self) -> Path:
        """The HTTP service's bearer token (0600), when $LMERASER_API_TOKEN does not give one."""
        return self.keys_dir / "api-token"

    @property
    def subject_salt_file(self) -> Path:
        return self.keys_dir / "subject-salt"

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """An exclusive advisory lock `audit/.<name>.lock`; a second process waits for the first."""
        path = self.audit / f".{name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- typed readers -------------------------------------------------------------------------

    def source_info(self) -> dict:
        return _read_json(self.source_info_file, "run 'lmeraser data init' first")

    def _missing_advice(self, directory: Path) -> str:
        """What to do about a missing split or shard: finish an interrupted write (its temporary
        directories, named with a leading dot, are still there) or write the data."""
        interrupted = (
            list(directory.parent.glob(f".{directory.name}.*"))
            + list(self.data.glob(".*.*"))
            + list(self.root.glob(".data.*"))
        )
        return (
            "run `lmeraser unlearn`: it finishes the interrupted write"
            if interrupted
            else "run 'lmeraser data init' first"
        )

    def shard_manifest(self, directory: Path) -> pd.DataFrame:
        """One shard's manifest (a split's directory in the one-directory layout)."""
        path = directory / "manifest.csv"
        if not path.exists():
            raise DataError(f"{path}: not found; {self._missing_advice(directory)}.")
        count = self.shard_count(directory.parent.name) if directory.parent.parent == self.data else None
        shard = (int(directory.name), count) if count is not None and _is_shard_name(directory.name, count) else None
        return _read_manifest(path, shard)[1].copy(deep=False)  # copy-on-write (pandas 3): edits stay the caller's

    def shard_images(self, directory: Path, rows: int, mmap: bool = False) -> np.ndarray:
        """One shard's pixels, checked to hold `rows` images (its manifest's length)."""
        path = directory / "images.npy"
        if not path.exists():
            raise DataError(f"{path}: not found; run 'lmeraser data init' first.")
        try:
            # numpy parses the header with ast.literal_eval, which CPython 3.11 does not make
            # thread-safe ("AST constructor recursion depth mismatch" with clusters training in
            # threads, each opening its members' shards): one opening at a time.
            with _NPY_OPEN_LOCK:
                images = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
        except (ValueError, OSError, EOFError) as error:
            raise DataError(f"{path}: unreadable ({error}).") from None
        if len(images) != rows:
            raise DataError(f"{path}: {len(images)} images but its manifest lists {rows} samples.")
        return images

    def manifest(self, split: str) -> pd.DataFrame:
        """A split's manifest alone (its shards' together, sorted by sample id), without its pixels."""
        dirs = self.check_shards(split)
        if len(dirs) == 1:
            return self.shard_manifest(dirs[0])
        for directory in dirs:  # the one-sentence errors of a missing manifest
            if not (directory / "manifest.csv").exists():
                self.shard_manifest(directory)
        count = len(dirs)
        read = [_read_manifest(d / "manifest.csv", (i, count)) for i, d in enumerate(dirs)]
        idents = tuple(ident for ident, _ in read)
        key = idents[0][:2]  # the split's first shard file, however the workspace's path is written
        kept = _SPLIT_MANIFESTS.get(key)
        if kept is None or kept[0] != idents:
            kept = (idents, _by_sample_id(pd.concat([frame for _, frame in read], ignore_index=True)))
            _SPLIT_MANIFESTS[key] = kept
            while len(_SPLIT_MANIFESTS) > 16:
                _SPLIT_MANIFESTS.popitem(last=False)
        return kept[1].copy(deep=False)

    def split(self, name: str) -> Split:
        """A split's manifest and pixels (its shards' together, sorted by sample id), checked
        against each other."""
        parts = []
        for directory in self.check_shards(name):
            manifest = self.shard_manifest(directory)
            parts.append((manifest, self.shard_images(directory, len(manifest))))
        if len(parts) == 1:
            return Split(name, *parts[0])
        manifest = pd.concat([m for m, _ in parts], ignore_index=True)
        images = np.concatenate([i for _, i in parts])
        order = np.argsort(manifest["sample_id"].to_numpy(), kind="stable")
        return Split(name, manifest.iloc[order].reset_index(drop=True), np.ascontiguousarray(images[order]))

    def images_of(self, split: str, sample_ids: list[str]) -> np.ndarray:
        """The pixels of `sample_ids` (in that order), reading only the shards that hold them."""
        by_shard: dict[Path, list[int]] = {}
        for position, sid in enumerate(sample_ids):
            by_shard.setdefault(self.shard_dir_of(split, sid), []).append(position)
        out: np.ndarray | None = None
        for directory, positions in by_shard.items():
            manifest = self.shard_manifest(directory)
            images = self.shard_images(directory, len(manifest), mmap=True)
            row = {sid: i for i, sid in enumerate(manifest["sample_id"].tolist())}
            wanted = [sample_ids[p] for p in positions]
            missing = [sid for sid in wanted if sid not in row]
            if missing:
                raise DataError(f"sample id {missing[0]} is not in data/{split}.")
            if out is None:
                out = np.empty((len(sample_ids), *images.shape[1:]), dtype=images.dtype)
            out[positions] = images[[row[sid] for sid in wanted]]
        return out if out is not None else np.empty((0,), dtype=np.uint8)

    def tombstones(self) -> pd.DataFrame:
        path = self.tombstones_file
        if not path.exists():
            return pd.DataFrame(columns=TOMBSTONE_COLUMNS)
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        missing = [c for c in TOMBSTONE_COLUMNS if c not in frame]
        if missing:
            raise DataError(
                f"{path}: columns {missing} missing (written before tombstones were keyed); "
                "re-create data/ with `lmeraser data init`."
            )
        return frame[TOMBSTONE_COLUMNS]

    def backbone_meta(self) -> BackboneMeta:
        return BackboneMeta.from_json(_read_json(self.backbone_meta_file, "run the backbone stage first"))

    def prototypes_meta(self) -> dict:
        return _read_json(self.prototypes_meta_file, "run the prototypes stage first")

    def prototypes(self) -> np.ndarray:
        if not self.prototypes_file.exists():
            raise LmeraserError(f"{self.prototypes_file}: not found; run the prototypes stage first.")
        return np.load(self.prototypes_file, allow_pickle=False)

    def assignments(self) -> pd.DataFrame:
        """sample_id -> cluster for every private sample (sorted by sample id)."""
        if not self.assignments_file.exists():
            raise LmeraserError(f"{self.assignments_file}: not found; run the assign stage first.")
        return pd.read_csv(self.assignments_file, dtype={"sample_id": str})

    def cluster_of(self) -> dict[str, int]:
        frame = self.assignments()
        return dict(zip(frame["sample_id"].tolist(), frame["cluster"].astype(int).tolist()))

    def prompt_index(self) -> PromptIndex:
        return PromptIndex.from_json(_read_json(self.prompt_index_file, "run the train stage first"))

    def prompt_index_or_empty(self) -> PromptIndex:
        return self.prompt_index() if self.prompt_index_file.exists() else PromptIndex()

    def pinned_keys(self) -> set[str]:
        return set(_read_json(self.pins_file, "")["keys"]) if self.pins_file.exists() else set()

    def last_run(self) -> dict:
        return _read_json(self.last_run_file, "run the train stage first")

    def overlay_entries(self) -> dict[str, dict]:
        """cluster -> influence overlay entry, as written (active or stale)."""
        return _read_json(self.overlay_file, "")["clusters"] if self.overlay_file.exists() else {}

    def metrics(self) -> dict:
        return _read_json(self.metrics_file, "run `dvc repro` first")


_MANIFESTS: collections.OrderedDict[tuple, tuple[tuple, pd.DataFrame]] = collections.OrderedDict()
_MANIFESTS_LOCK = threading.Lock()
_NPY_OPEN_LOCK = threading.Lock()
_MANIFESTS_KEPT = 4096  # shard manifests parsed in this process (a few hundred rows each)
_SPLIT_MANIFESTS: collections.OrderedDict[tuple, tuple[tuple, pd.DataFrame]] = collections.OrderedDict()


MANIFEST_DTYPES = {"sample_id": str, "subject_id": str, "label": "int64", "split": str, "content_hash": str}
MAX_SHARDS = 1_000_000  # per split


def _is_shard_name(name: str, count: int) -> bool:
    return len(name) >= 4 and name.isdigit() and name == shard_name(int(name)) and int(name) < count


def _read_manifest(path: Path, shard: tuple[int, int] | None = None) -> tuple[tuple, pd.DataFrame]:
    """A manifest file, parsed once per process while its identity (device, inode, size, mtime,
    ctime, as the scan index keeps it) does not change: a batch and the service read every
    shard's manifest several times, and an erasure changes one shard. Not to be modified: the
    Workspace readers hand out copies."""
    st = path.stat()
    ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    key = (st.st_dev, st.st_ino, shard)  # the file, however it is named (a batch resolves the workspace's path)
    with _MANIFESTS_LOCK:  # clusters train in threads, each reading its members' shards
        kept = _MANIFESTS.get(key)
        if kept is not None and kept[0] == ident:
            _MANIFESTS.move_to_end(key)
            return kept
    try:
        # The types are forced: an empty shard's header-only file must read as the others do.
        frame = pd.read_csv(path, dtype=MANIFEST_DTYPES)
    except (ValueError, TypeError, UnicodeDecodeError, pd.errors.ParserError):
        frame = None  # which of the reasons below, in that order (one parse in the usual case)
    header = frame.columns if frame is not None else _manifest_header(path)
    missing = [column for column in MANIFEST_COLUMNS if column not in header]
    if missing:
        raise DataError(f"{path}: not a manifest (no {missing[0]} column); run 'lmeraser data init'.")
    if frame is None:
        try:
            frame = pd.read_csv(path, dtype=MANIFEST_DTYPES)
        except (ValueError, TypeError, UnicodeDecodeError, pd.errors.ParserError) as error:
            raise DataError(
                f"{path}: not a manifest (a value of the wrong type, e.g. a label that is not a whole number: "
                f"{error.__class__.__name__}); run 'lmeraser data init'."
            ) from None
    if shard is not None and len(frame):
        index, count = shard
        elsewhere = [sid for sid in frame["sample_id"].tolist() if shard_index(str(sid), count) != index]
        if elsewhere:
            home = shard_name(shard_index(str(elsewhere[0]), count))
            raise DataError(
                f"{path}: sample id {elsewhere[0]} belongs in shard {home} (its id's hash), not here; "
                "the data was changed by hand: run 'lmeraser data init'."
            )
    with _MANIFESTS_LOCK:
        _MANIFESTS[key] = (ident, frame)
        while len(_MANIFESTS) > _MANIFESTS_KEPT:
            _MANIFESTS.popitem(last=False)
    return ident, frame


def _manifest_header(path: Path) -> pd.Index:
    try:
        return pd.read_csv(path, nrows=0).columns
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise DataError(f"{path}: not a manifest ({error.__class__.__name__}); run 'lmeraser data init'.") from None


def shard_name(index: int) -> str:
    return f"{index:04d}"


def shard_index(sample_id: str, count: int) -> int:
    """Which of `count` shards holds a sample: a hash of its id, so it never moves while the
    split changes (and any id, whatever its characters, has one)."""
    return int(hashlib.sha256(sample_id.encode()).hexdigest()[:8], 16) % count


def _by_sample_id(manifest: pd.DataFrame) -> pd.DataFrame:
    order = np.argsort(manifest["sample_id"].to_numpy(), kind="stable")
    return manifest.iloc[order].reset_index(drop=True)


@dataclass
class Split:
    name: str
    manifest: pd.DataFrame
    images: np.ndarray

    def __len__(self) -> int:
        return len(self.manifest)

    @property
    def labels(self) -> np.ndarray:
        return self.manifest["label"].to_numpy(dtype=np.int64, copy=True)

    @property
    def sample_ids(self) -> list[str]:
        return self.manifest["sample_id"].tolist()


@dataclass(frozen=True)
class SplitPixels:
    """A split's pixels read on demand by row of its manifest (sorted by sample id): a cluster's
    training reads its members from the shards that hold them (memory-mapped), not the whole split
    into memory; the rows come back in the order asked, with the same bytes as `Workspace.split`."""

    ws: Workspace
    split: str
    sample_ids: list[str]

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, rows) -> np.ndarray:
        return self.ws.images_of(self.split, [self.sample_ids[int(row)] for row in np.asarray(rows).ravel()])


@dataclass(frozen=True)
class InputSpec:
    """How images enter the backbone: resized to img_size, in_chans channels, normalised per
    channel with the backbone's mean and std."""

    img_size: int
    in_chans: int = 1
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    def to_json(self) -> dict:
        return {"in_chans": self.in_chans, "mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class BackboneMeta:
    """`artifacts/backbone/backbone.json`: what the frozen backbone is and how it was made."""

    sha256: str
    params: dict  # the backbone section it was built with
    num_classes: int
    threads: int  # torch threads every whole-split pass over this backbone uses
    origin: dict = field(default_factory=dict)  # trained on the public split, or a checkpoint
    input_json: dict = field(default_factory=dict)  # InputSpec without img_size (older files: grey, 0.5/0.5)
    device: str = "cpu"  # where it was made and every pass over it runs (lmeraser/compute.py)
    precision: str = "float32"
    # portable | native (lmeraser/numerics.py); older files: native; null: made by a library
    # caller's own Compute, whatever its process ran (unchecked)
    numerics: str | None = "native"
    fingerprint: str = ""  # the numeric fingerprint of the machine that made it (lmeraser/fingerprint.py)

    @property
    def img_size(self) -> int:
        return int(self.params["img_size"])

    @property
    def input(self) -> InputSpec:
        raw = self.input_json
        return InputSpec(
            self.img_size, int(raw.get("in_chans", 1)), tuple(raw.get("mean", (0.5,))), tuple(raw.get("std", (0.5,)))
        )

    @classmethod
    def from_json(cls, raw: dict) -> BackboneMeta:
        return cls(
            raw["sha256"],
            raw["params"],
            int(raw["num_classes"]),
            int(raw.get("threads", 1)),
            raw.get("origin", {}),
            raw.get("input", {}),
            str(raw.get("device", "cpu")),
            str(raw.get("precision", "float32")),
            None if raw.get("numerics", "native") is None else str(raw.get("numerics", "native")),
            str(raw.get("fingerprint", "")),
        )

    def to_json(self) -> dict:
        return {
            "sha256": self.sha256,
            "params": self.params,
            "num_classes": self.num_classes,
            "threads": self.threads,
            "origin": self.origin,
            "input": self.input_json,
            "device": self.device,
            "precision": self.precision,
            "numerics": self.numerics,
            "fingerprint": self.fingerprint,
        }


@dataclass(frozen=True)
class PromptEntry:
    key: str  # content address in the store
    sha256: str  # of the stored file
    n_members: int
    seed: int

    def to_json(self) -> dict:
        return {"key": self.key, "sha256": self.sha256, "n_members": self.n_members, "seed": self.seed}


@dataclass(frozen=True)
class PromptIndex:
    """`artifacts/prompts/index.json`: the exact prompt each cluster serves, and what every
    cluster's artifact key shares (backbone, PEFT kind and settings, code and library versions).

    Signed in every lineage record, so it holds only what determines the served model: nothing
    about when or how fast it was made (that is `last_run.json`).
    """

    clusters: dict[str, PromptEntry] = field(default_factory=dict)
    key_inputs: dict = field(default_factory=dict)

    @property
    def backbone_sha256(self) -> str | None:
        return self.key_inputs.get("backbone")

    @property
    def num_classes(self) -> int:
        return int(self.key_inputs.get("num_classes", 0))

    @property
    def prompt(self) -> dict:
        """{"kind": K, K: settings}: the chosen PEFT kind only."""
        return self.key_inputs.get("prompt", {})

    @classmethod
    def from_json(cls, raw: dict) -> PromptIndex:
        clusters = {
            c: PromptEntry(e["key"], e["sha256"], int(e["n_members"]), int(e["seed"]))
            for c, e in raw["clusters"].items()
        }
        return cls(clusters, raw.get("key_inputs", {}))

    def to_json(self) -> dict:
        return {
            "clusters": {c: self.clusters[c].to_json() for c in sorted(self.clusters, key=int)},
            "key_inputs": self.key_inputs,
        }

    def hashes(self) -> dict[str, str]:
        return {c: e.sha256 for c, e in self.clusters.items()}


def _read_json(path: Path, hint: str) -> Any:
    if not path.exists():
        raise LmeraserError(f"{path}: not found" + (f"; {hint}." if hint else "."))
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LmeraserError(f"{path}: not valid JSON ({error.__class__.__name__}).") from None
