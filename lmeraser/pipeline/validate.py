"""validate: the Great Expectations suite over every split; one fingerprint ticket per split."""

from __future__ import annotations

from collections.abc import Callable

from lmeraser.config import Params
from lmeraser.data.validation import SUITE_NAME, validate_splits
from lmeraser.errors import ValidationFailed
from lmeraser.io import atomic_write_json
from lmeraser.workspace import Workspace


def run(params: Params, ws: Workspace, log: Callable[[str], None] = print, changed_only: bool = False) -> dict:
    """`changed_only` (an unlearning batch's rebuild): only the rows that changed since the last
    validation, against the summary it kept; `dvc repro` and `lmeraser stage validate` check every row."""
    report = validate_splits(ws, changed_only=changed_only)
    if not report.success:
        raise ValidationFailed(report.reason())
    # One ticket per split holding only that split's fingerprint: a change to the private split
    # re-runs nothing that depends on the public one.
    for split, files in report.fingerprints.items():
        atomic_write_json(
            ws.validation_ticket(split), {"split": split, "suite": SUITE_NAME, "passed": True, "sha256": files}
        )
    reused = report.statistics["facts_reused"]
    cut_with = ws.source_info().get("shard_size")
    if cut_with is not None and cut_with != params.data.shard_size:
        log(
            f"note: data/ was cut into shards of {cut_with} samples; data.shard_size {params.data.shard_size} "
            "takes effect at the next `lmeraser data init` (the same samples, re-cut)"
        )
    if report.statistics["mode"] == "changed rows":
        log(
            f"validation passed: the {report.statistics['rows_checked']} row(s) that changed, "
            f"and whole-split checks over {report.statistics['rows']} samples"
        )
    else:
        note = f" (image facts of {', '.join(reused)} reused: files unchanged since last checked)" if reused else ""
        log(
            f"validation passed: {report.statistics['evaluated']} expectations "
            f"over {report.statistics['rows']} samples{note}"
        )
    return {
        "metrics": {"expectations": report.statistics["evaluated"], "rows": report.statistics["rows"]},
        "docs": str(report.docs_index),
        "facts_reused": reused,
    }
