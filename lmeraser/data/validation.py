"""The Great Expectations 1.x suite that guards the splits (the first pipeline stage).

One table row per sample (all splits together) with its manifest fields and facts about its
image, so every check is a standard expectation: schema and dtypes, image shape and pixel
range, label domain, unique ids (hence no id in two splits), every class in every split, pixel
bytes matching the recorded content hash, and no tombstoned sample.
"""

from __future__ import annotations

import hashlib
import json
import logging
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lmeraser.data.splits import content_hash
from lmeraser.errors import DataError
from lmeraser.io import atomic_path, file_identity, sha256_file
from lmeraser.workspace import MANIFEST_COLUMNS, SPLITS, Workspace, image_channels, shard_index, shard_name

SUITE_NAME = "lmeraser_splits"
TABLE_COLUMNS = [
    *MANIFEST_COLUMNS,
    "height",
    "width",
    "channels",
    "image_dtype",
    "pixel_min",
    "pixel_max",
    "hash_matches",
    "suppressed",
]


@dataclass
class ValidationReport:
    success: bool
    failures: list[str]
    docs_index: Path | None
    statistics: dict
    fingerprints: dict[str, dict[str, str]]  # split -> sha256 of its files, as validated

    def reason(self) -> str:
        head = self.failures[0] if self.failures else "unknown failure"
        more = f" (+{len(self.failures) - 1} more)" if len(self.failures) > 1 else ""
        docs = (
            f"data docs: {self.docs_index}"
            if self.docs_index
            else "the changed rows only; run `lmeraser stage validate` for every row and its data docs"
        )
        return f"data validation failed: {head}{more}; {docs}"


IMAGE_FACTS = ("height", "width", "channels", "image_dtype", "pixel_min", "pixel_max", "hash_matches")


def image_facts(images: np.ndarray, content_hashes: pd.Series) -> dict:
    """The per-image columns of the table: shape, dtype, pixel range and whether the pixels still
    hash to the recorded content hash (the expensive part of the table)."""
    flat = images.reshape(len(images), -1)
    return {
        "height": images.shape[1] if images.ndim in (3, 4) else -1,
        "width": images.shape[2] if images.ndim in (3, 4) else -1,
        "channels": image_channels(images.shape[1:]) if images.ndim in (3, 4) else -1,
        "image_dtype": str(images.dtype),
        "pixel_min": flat.min(1).astype(np.int64) if flat.size else np.zeros(0, np.int64),
        "pixel_max": flat.max(1).astype(np.int64) if flat.size else np.zeros(0, np.int64),
        "hash_matches": np.array([content_hash(img) == h for img, h in zip(images, content_hashes)], dtype=bool),
    }


class FactsCache:
    """Image facts of each split, kept in `artifacts/cache/` under the sha256 of the split's files
    and of this module's code: a split whose bytes did not change since it was last checked is
    not hashed again (the suite still checks every row of every split). Not versioned; any
    mismatch or damage means the facts are computed again."""

    def __init__(self, ws: Workspace, fingerprints: dict[str, dict[str, str]]):
        self.ws = ws
        code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
        self.keys = {
            split: hashlib.sha256(json.dumps([code, files], sort_keys=True).encode()).hexdigest()
            for split, files in fingerprints.items()
        }

    def _path(self, split: str) -> Path:
        return self.ws.artifacts / "cache" / f"validation-{split}.npz"

    def get(self, split: str) -> dict | None:
        try:
            with np.load(self._path(split), allow_pickle=False) as stored:
                if str(stored["key"]) != self.keys[split]:
                    return None
                return {name: (stored[name].item() if stored[name].ndim == 0 else stored[name]) for name in IMAGE_FACTS}
        except (OSError, ValueError, KeyError):
            return None

    def put(self, split: str, facts: dict) -> None:
        path = self._path(split)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, key=np.array(self.keys[split]), **{name: np.asarray(facts[name]) for name in IMAGE_FACTS})


def split_fingerprints(
    ws: Workspace, known: dict[str, dict[str, list]] | None = None, identities: dict | None = None
) -> dict[str, dict[str, str]]:
    """split -> sha256 of each of its files (every shard's manifest.csv and images.npy, by path
    in the split): what the validation tickets record and the facts cache is keyed by (each file
    hashed once per validation).

    Args:
        ws: the workspace whose splits are fingerprinted.
        known: split -> path -> [device, inode, size, mtime, ctime, sha256] that an authenticated summary kept: a file
            whose identity is unchanged is not read again (a write changes its ctime, which no user-space call sets
            back; the scan index relies on the same), so a batch hashes the shards it changed, not the data.
        identities: filled with the same form for every file, for the next summary.
    """
    out = {}
    for split in SPLITS:
        root = ws.split_dir(split)
        ws.manifest(split)  # a missing or stray shard, or a broken manifest, is one sentence before any hashing
        files = [directory / name for directory in ws.check_shards(split) for name in ("manifest.csv", "images.npy")]
        kept = (known or {}).get(split) or {}
        out[split], seen = {}, {}
        for path in files:
            try:
                st = path.stat()
            except OSError:
                st = None
            if st is None or not stat.S_ISREG(st.st_mode):
                raise DataError(f"{path}: not found or not a file; run 'lmeraser data init'.")
            rel, ident = path.relative_to(root).as_posix(), file_identity(st)
            before = kept.get(rel)
            sha = before[-1] if isinstance(before, list) and before[:-1] == ident else sha256_file(path)
            out[split][rel], seen[rel] = sha, [*ident, sha]
        if identities is not None:
            identities[split] = seen
    return out


def build_table(
    ws: Workspace, splits: tuple[str, ...] = SPLITS, cache: FactsCache | None = None
) -> tuple[pd.DataFrame, list[str]]:
    """The table the suite checks, and the splits whose image facts came from `cache`."""
    tombstones = ws.tombstones()
    erased = tombstones[tombstones["reason"] != "rectify-label"]
    forgotten_ids = set(erased.loc[erased["reason"] == "forget", "sample_id"]) - {""}
    keys = set(erased["content_key"]) - {""}
    keyer = None
    if keys:
        from lmeraser.salt import Keyer

        keyer = Keyer(ws, create=False)
    frames, reused = [], []
    for split in splits:
        part = ws.split(split)
        frame = part.manifest.copy()
        facts = cache.get(split) if cache else None
        if facts is None:
            facts = image_facts(part.images, frame["content_hash"])
            if cache:
                cache.put(split, facts)
        else:
            reused.append(split)
        for name in IMAGE_FACTS:
            frame[name] = facts[name]
        # Erased ids and contents, compared by keyed hash: the suite (and its data docs) names no
        # forgotten id or hash, only that no row is one.
        frame["suppressed"] = frame["sample_id"].isin(forgotten_ids).to_numpy() | np.array(
            [keyer is not None and keyer.content(h) in keys for h in frame["content_hash"].tolist()], dtype=bool
        )
        frames.append(frame)
    return pd.concat(frames, ignore_index=True), reused


def build_suite(info: dict, coverage: bool = True):
    """The suite; `coverage` adds "every class in every split", which needs whole splits (the
    change-following validation checks it from the manifests instead)."""
    import great_expectations as gx

    E = gx.expectations
    height, width = info["image_shape"][:2]
    channels = image_channels(info["image_shape"])
    classes = list(range(info["num_classes"]))
    expectations = [
        E.ExpectTableColumnsToMatchSet(column_set=TABLE_COLUMNS, exact_match=True),
        E.ExpectColumnValuesToBeOfType(column="label", type_="int64"),
        E.ExpectColumnValuesToNotBeNull(column="sample_id"),
        E.ExpectColumnValuesToMatchRegex(column="sample_id", regex=r"^[0-9a-f]{20}$"),
        E.ExpectColumnValuesToMatchRegex(column="content_hash", regex=r"^[0-9a-f]{64}$"),
        E.ExpectColumnValuesToNotBeNull(column="subject_id"),
        E.ExpectColumnValuesToBeUnique(column="sample_id"),
        E.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        E.ExpectColumnValuesToBeInSet(column="height", value_set=[height]),
        E.ExpectColumnValuesToBeInSet(column="width", value_set=[width]),
        E.ExpectColumnValuesToBeInSet(column="channels", value_set=[channels]),
        E.ExpectColumnValuesToBeInSet(column="image_dtype", value_set=["uint8"]),
        E.ExpectColumnValuesToBeBetween(column="pixel_min", min_value=0, max_value=255),
        E.ExpectColumnValuesToBeBetween(column="pixel_max", min_value=0, max_value=255),
        E.ExpectColumnValuesToBeBetween(column="label", min_value=0, max_value=len(classes) - 1),
        E.ExpectColumnValuesToBeInSet(column="hash_matches", value_set=[True]),
        # Forgotten samples and the replaced pixels of rectified inputs must not come back.
        E.ExpectColumnValuesToBeInSet(column="suppressed", value_set=[False]),
    ]
    for split in SPLITS if coverage else ():
        expectations.append(
            E.ExpectColumnDistinctValuesToContainSet(
                column="label", value_set=classes, row_condition=f'split=="{split}"', condition_parser="pandas"
            )
        )
    suite = gx.ExpectationSuite(name=SUITE_NAME)
    for expectation in expectations:
        suite.add_expectation(expectation)
    return suite


def _describe_failure(result) -> str:
    config = result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k in ("column", "row_condition") and v}
    if isinstance(kwargs.get("row_condition"), dict):  # GX 1.x keeps a pandas condition as a filter dict
        kwargs["row_condition"] = kwargs["row_condition"].get("pass_through_filter", kwargs["row_condition"])
    where = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    detail = result.result or {}
    count = detail.get("unexpected_count")
    sample = detail.get("partial_unexpected_list") or detail.get("details", {}).get("mismatched")
    text = f"{config.type}({where})"
    if count:
        text += f" failed on {count} row(s)"
    if sample:
        text += f", e.g. {str(sample[:3]) if isinstance(sample, list) else str(sample)[:120]}"
    return text


def validate_splits(ws: Workspace, reuse_facts: bool = True, changed_only: bool = False) -> ValidationReport:
    """Run the suite with a Checkpoint that also writes HTML data docs to reports/data_docs; with
    `reuse_facts`, the image facts of splits whose files did not change come from the cache. The
    report carries the splits' fingerprints (`split_fingerprints`). With `changed_only` (an
    unlearning batch's rebuild), only the rows that changed since the last validation are checked,
    against the summary it kept (ChangeSummary), when that summary is usable; else every row."""
    info = ws.source_info()
    summary = ChangeSummary.load(ws) if changed_only else None
    identities: dict = {}
    fingerprints = split_fingerprints(ws, summary.body.get("files") if summary else None, identities)
    if summary is not None:
        report = summary.validate_changes(ws, info, fingerprints)
        if report is not None:
            if report.success:
                ChangeSummary.save(ws, fingerprints, identities, previous=summary)
            return report
    table, reused = build_table(ws, cache=FactsCache(ws, fingerprints) if reuse_facts else None)
    results, docs_index = _run_suite(ws, table, info, coverage=True, docs=True)
    failures = [_describe_failure(r) for r in results if not r.success]
    if not failures:
        ChangeSummary.save(ws, fingerprints, identities)
    return ValidationReport(
        success=not failures,
        failures=failures,
        docs_index=docs_index,
        statistics={
            "evaluated": len(results),
            "failed": len(failures),
            "rows": len(table),
            "facts_reused": reused,
            "mode": "full",
        },
        fingerprints=fingerprints,
    )


def _run_suite(ws: Workspace, table: pd.DataFrame, info: dict, coverage: bool, docs: bool) -> tuple[list, Path | None]:
    """The suite's results over `table`, through a Checkpoint; with `docs`, HTML data docs in
    reports/data_docs (the full validation's; a change-following run leaves them as they were)."""
    import great_expectations as gx

    # GX sets some of its loggers to INFO itself (e.g. the ephemeral docs site's temporary directory).
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("great_expectations")] + [
        "great_expectations"
    ]:
        logging.getLogger(name).setLevel(logging.ERROR)
    docs_dir = ws.data_docs.resolve()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    if docs:
        context.add_data_docs_site(
            site_name="lmeraser",
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
    batch = (
        context.data_sources.add_pandas("lmeraser")
        .add_dataframe_asset("splits")
        .add_batch_definition_whole_dataframe("all")
    )
    suite = context.suites.add(build_suite(info, coverage))  # after the context: GX needs one for a suite
    definition = context.validation_definitions.add(gx.ValidationDefinition(name="splits", data=batch, suite=suite))
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="lmeraser_splits",
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["lmeraser"])] if docs else [],
            result_format={"result_format": "SUMMARY"},
        )
    )
    outcome = checkpoint.run(batch_parameters={"dataframe": table})
    return [r for run in outcome.run_results.values() for r in run.results], (docs_dir / "index.html" if docs else None)


# -- validation that follows the change ----------------------------------------------------------


def _keyer(ws: Workspace, create: bool = False):
    """The workspace's salt, or None (missing, unsound, or its directory not writable for a new
    one: then no summary is kept and the next validation checks every row; a batch's preflight
    says what is wrong with the salt before it changes anything)."""
    from lmeraser.errors import DataError
    from lmeraser.salt import Keyer

    try:
        return Keyer(ws, create=create)
    except (DataError, OSError):
        return None


# A summary's columns per split: the manifest's fields and each row's keyed content hash.
SUMMARY_COLUMNS = ("sample_id", "subject_id", "label", "content_hash", "content_key")


class ChangeSummary:
    """What the last passing validation saw, kept in `artifacts/cache/validation-summary.json` (not
    versioned) so that an unlearning batch's rebuild checks only the rows that changed: per split
    the files' sha256 and every row's manifest fields with its keyed content hash (in columns, and
    a split whose files did not change is carried over as it was, not rebuilt); and the
    tombstones file as it was (length and sha256: tombstones are appended, so rows after it are
    new). Authenticated with the workspace's salt (an HMAC) and bound to this module's code; no
    salt, a mismatch or any damage means the whole suite runs.

    Checked on the changed rows (added or modified, by manifest fields, in splits whose files
    changed): every row expectation of the suite, through Great Expectations, and "suppressed"
    against every tombstone. Checked over whole splits from their manifests and the summary: ids
    unique across splits, every class in every split, and no row (changed or not) is named by a
    tombstone added since. Image facts and content hashes are computed for the changed rows only.
    """

    def __init__(self, body: dict):
        self.body = body

    @staticmethod
    def path(ws: Workspace) -> Path:
        return ws.artifacts / "cache" / "validation-summary.json"

    @staticmethod
    def _code() -> str:
        return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()

    @classmethod
    def load(cls, ws: Workspace) -> ChangeSummary | None:
        keyer = _keyer(ws)
        if keyer is None:
            return None
        try:
            body, problem = keyer.unseal("validation-summary", cls.path(ws).read_bytes())
        except OSError:
            return None
        return cls(body) if problem is None and body.get("code") == cls._code() else None

    @classmethod
    def save(
        cls,
        ws: Workspace,
        fingerprints: dict[str, dict[str, str]],
        identities: dict[str, dict[str, list]],
        previous: ChangeSummary | None = None,
    ) -> None:
        """Keep what this passing validation saw; content keys of rows the last summary knew are
        reused, so only changed rows are keyed again.

        Args:
            ws: the workspace.
            fingerprints: what `split_fingerprints` gave for this validation.
            identities: the split files' identities and sha256 as `split_fingerprints` filled them (the next
                change-following validation hashes only files whose identity changed).
            previous: the summary this validation followed, if any.
        """
        from lmeraser.io import atomic_write_bytes

        # The salt is made here if the workspace never had one (as it is at the first keyed hash):
        # without a summary, the first erasure after `dvc repro` would check every row again.
        keyer = _keyer(ws, create=True)
        if keyer is None:
            return
        previous = previous or cls.load(ws)
        kept = previous.body["splits"] if previous else {}
        known: dict[str, str] = {}
        splits = {}
        for split in SPLITS:
            if split in kept and kept[split]["sha256"] == fingerprints[split]:
                splits[split] = kept[split]  # its files did not change, so neither did its rows
                continue
            if not known:  # content hash -> content key, for the rows the last summary keyed
                for columns in kept.values():
                    known.update(zip(columns["content_hash"], columns["content_key"], strict=True))
            m = ws.manifest(split)
            hashes = m["content_hash"].tolist()
            splits[split] = {
                "sha256": fingerprints[split],
                "sample_id": m["sample_id"].tolist(),
                "subject_id": m["subject_id"].tolist(),
                "label": [int(label) for label in m["label"].tolist()],
                "content_hash": hashes,
                "content_key": [known.get(h) or keyer.content(h) for h in hashes],
            }
        tombstones = ws.tombstones_file.read_bytes() if ws.tombstones_file.exists() else b""
        body = {
            "code": cls._code(),
            "tombstones": {
                "bytes": len(tombstones),
                "sha256": hashlib.sha256(tombstones).hexdigest(),
                "rows": len(ws.tombstones()),
            },
            "splits": splits,
            "files": identities,
        }
        path = cls.path(ws)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, keyer.seal("validation-summary", body))

    def validate_changes(
        self, ws: Workspace, info: dict, fingerprints: dict[str, dict[str, str]]
    ) -> ValidationReport | None:
        """The change-following validation; None when the tombstones were rewritten rather than
        appended to, or a split's pixels and manifest disagree in length (the whole suite says why)."""
        kept = self.body["tombstones"]
        raw = ws.tombstones_file.read_bytes() if ws.tombstones_file.exists() else b""
        if len(raw) < kept["bytes"] or hashlib.sha256(raw[: kept["bytes"]]).hexdigest() != kept["sha256"]:
            return None
        tombstones = ws.tombstones()
        erased = tombstones[tombstones["reason"] != "rectify-label"]
        forgotten_ids = set(erased.loc[erased["reason"] == "forget", "sample_id"]) - {""}
        erased_keys = set(erased["content_key"]) - {""}
        new = tombstones.iloc[kept["rows"] :]
        new = new[new["reason"] != "rectify-label"]
        new_ids, new_keys = set(new.loc[new["reason"] == "forget", "sample_id"]) - {""}, set(new["content_key"]) - {""}
        keyer = _keyer(ws)
        manifests = {split: ws.manifest(split) for split in SPLITS}
        frames, failures, changed_rows, suppressed_unchanged = [], [], 0, 0
        for split in SPLITS:
            m = manifests[split]
            before = self.body["splits"].get(split) or {"sha256": None, **{name: [] for name in SUMMARY_COLUMNS}}
            keyed_before = dict(
                zip(
                    zip(*(before[name] for name in SUMMARY_COLUMNS[:4]), strict=True),
                    before["content_key"],
                    strict=True,
                )
            )
            fields = list(
                zip(
                    m["sample_id"].tolist(),
                    m["subject_id"].tolist(),
                    m["label"].astype(int).tolist(),
                    m["content_hash"].tolist(),
                    strict=True,
                )
            )
            if before["sha256"] == fingerprints[split]:
                changed = np.zeros(len(m), dtype=bool)
            else:
                changed = np.array([f not in keyed_before for f in fields], dtype=bool)
                # The other rows of a shard whose files changed (a few hundred): their pixels must
                # still hash to their unchanged manifest fields (a plain check: the suite's start
                # alone costs seconds, and an erasure changes no row's fields).
                in_shards = _rows_in_changed_shards(ws, split, m, before["sha256"] or {}, fingerprints[split])
                pixel_rows = np.flatnonzero(in_shards & ~changed)
                if len(pixel_rows):
                    try:
                        held = ws.images_of(split, m["sample_id"].iloc[pixel_rows].tolist())
                    except DataError:
                        return None
                    wrong = sum(
                        content_hash(image) != h
                        for image, h in zip(held, m["content_hash"].iloc[pixel_rows], strict=True)
                    )
                    if wrong:
                        failures.append(
                            f"expect_column_values_to_be_in_set(column=hash_matches) failed on {wrong} row(s), "
                            "e.g. [False]"
                        )
                    changed_rows += len(pixel_rows)
            rows = np.flatnonzero(changed)
            if len(rows):
                frame = m.iloc[rows].reset_index(drop=True)
                try:  # from the shards that hold them only
                    images = ws.images_of(split, frame["sample_id"].tolist())
                except DataError:
                    return None
                facts = image_facts(images, frame["content_hash"])
                for name in IMAGE_FACTS:
                    frame[name] = facts[name]
                frame["suppressed"] = frame["sample_id"].isin(forgotten_ids).to_numpy() | np.array(
                    [keyer.content(h) in erased_keys for h in frame["content_hash"].tolist()], dtype=bool
                )
                frames.append(frame)
                changed_rows += len(rows)
            # Rows that did not change, against the tombstones added since the summary.
            if new_ids or new_keys:
                suppressed_unchanged += sum(
                    1
                    for f, c in zip(fields, changed, strict=True)
                    if not c and (f[0] in new_ids or keyed_before.get(f) in new_keys)
                )
        results = []
        if frames:
            table = pd.concat(frames, ignore_index=True)[TABLE_COLUMNS]
            results, _ = _run_suite(ws, table, info, coverage=False, docs=False)
            failures += [_describe_failure(r) for r in results if not r.success]
        if suppressed_unchanged:
            failures.append(
                f"expect_column_values_to_be_in_set(column=suppressed) failed on {suppressed_unchanged} row(s), "
                "e.g. [True]"
            )
        ids = pd.concat([m["sample_id"] for m in manifests.values()], ignore_index=True)
        duplicated = ids[ids.duplicated(keep=False)]
        if len(duplicated):
            failures.append(
                f"expect_column_values_to_be_unique(column=sample_id) failed on {len(duplicated)} row(s), "
                f"e.g. {sorted(set(duplicated))[:3]}"
            )
        classes = set(range(info["num_classes"]))
        for split, m in manifests.items():
            missing = sorted(classes - set(m["label"].astype(int)))
            if missing:
                where = f'column=label, row_condition=split=="{split}"'
                failures.append(
                    f"expect_column_distinct_values_to_contain_set({where}) failed, e.g. classes {missing[:3]} missing"
                )
        return ValidationReport(
            success=not failures,
            failures=failures,
            docs_index=None,
            statistics={
                "evaluated": len(results) + 2 + len(SPLITS),
                "failed": len(failures),
                "rows": int(sum(len(m) for m in manifests.values())),
                "rows_checked": changed_rows,
                "facts_reused": list(SPLITS),
                "mode": "changed rows",
            },
            fingerprints=fingerprints,
        )


def _rows_in_changed_shards(ws: Workspace, split: str, manifest: pd.DataFrame, before: dict, now: dict) -> np.ndarray:
    """Which rows sit in a shard whose files' sha256 differ from `before` (none in the
    one-directory layout, whose one "shard" is the split: there, changed fields decide)."""
    count = ws.shard_count(split)
    if count is None:
        return np.zeros(len(manifest), dtype=bool)
    shards = {key.split("/", 1)[0] for key, sha in now.items() if before.get(key) != sha}
    return np.array([shard_name(shard_index(sid, count)) in shards for sid in manifest["sample_id"]], dtype=bool)
