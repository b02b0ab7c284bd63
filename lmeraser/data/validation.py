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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lmeraser.data.splits import content_hash
from lmeraser.io import atomic_path, sha256_file
from lmeraser.workspace import MANIFEST_COLUMNS, SPLITS, Workspace, image_channels

SUITE_NAME = "lmeraser_splits"
TABLE_COLUMNS = [*MANIFEST_COLUMNS, "height", "width", "channels", "image_dtype", "pixel_min", "pixel_max", "hash_matches", "suppressed"]


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
        return f"data validation failed: {head}{more}; data docs: {self.docs_index}"


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
        self.keys = {split: hashlib.sha256(json.dumps([code, files], sort_keys=True).encode()).hexdigest() for split, files in fingerprints.items()}

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


def split_fingerprints(ws: Workspace) -> dict[str, dict[str, str]]:
    """split -> sha256 of its manifest.csv and images.npy: what the validation tickets record and
    the facts cache is keyed by (each file hashed once per validation)."""
    return {split: {name: sha256_file(ws.split_dir(split) / name) for name in ("manifest.csv", "images.npy")} for split in SPLITS}


def build_table(ws: Workspace, splits: tuple[str, ...] = SPLITS, cache: FactsCache | None = None) -> tuple[pd.DataFrame, list[str]]:
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
            [keyer is not None and keyer.content(h) in keys for h in frame["content_hash"]], dtype=bool
        )
        frames.append(frame)
    return pd.concat(frames, ignore_index=True), reused


def build_suite(info: dict):
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
    for split in SPLITS:
        expectations.append(
            E.ExpectColumnDistinctValuesToContainSet(column="label", value_set=classes, row_condition=f'split=="{split}"', condition_parser="pandas")
        )
    suite = gx.ExpectationSuite(name=SUITE_NAME)
    for expectation in expectations:
        suite.add_expectation(expectation)
    return suite


def _describe_failure(result) -> str:
    config = result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k in ("column", "row_condition") and v}
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


def validate_splits(ws: Workspace, reuse_facts: bool = True) -> ValidationReport:
    """Run the suite with a Checkpoint that also writes HTML data docs to reports/data_docs; with
    `reuse_facts`, the image facts of splits whose files did not change come from the cache. The
    report carries the splits' fingerprints (`split_fingerprints`)."""
    import great_expectations as gx

    # GX sets some of its loggers to INFO itself (e.g. the ephemeral docs site's temporary directory).
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("great_expectations")] + ["great_expectations"]:
        logging.getLogger(name).setLevel(logging.ERROR)
    info = ws.source_info()
    fingerprints = split_fingerprints(ws)
    table, reused = build_table(ws, cache=FactsCache(ws, fingerprints) if reuse_facts else None)
    docs_dir = ws.data_docs.resolve()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    context.add_data_docs_site(
        site_name="lmeraser",
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    batch = context.data_sources.add_pandas("lmeraser").add_dataframe_asset("splits").add_batch_definition_whole_dataframe("all")
    suite = context.suites.add(build_suite(info))
    definition = context.validation_definitions.add(gx.ValidationDefinition(name="splits", data=batch, suite=suite))
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="lmeraser_splits",
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["lmeraser"])],
            result_format={"result_format": "SUMMARY"},
        )
    )
    outcome = checkpoint.run(batch_parameters={"dataframe": table})
    results = [r for run in outcome.run_results.values() for r in run.results]
    failures = [_describe_failure(r) for r in results if not r.success]
    return ValidationReport(
        success=bool(outcome.success),
        failures=failures,
        docs_index=docs_dir / "index.html",
        statistics={"evaluated": len(results), "failed": len(failures), "rows": len(table), "facts_reused": reused},
        fingerprints=fingerprints,
    )
