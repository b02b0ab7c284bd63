"""What each step of an exact batch hands to the next, typed: `Capture`, `Applied`, `Versioned`,
`Rebuilt`, `Purged`, `Verified`, `Recorded`, and the batch state that holds them
(`audit/batches/<batch_id>.json`). They serialise to the batch file's JSON exactly as the
untyped dicts before them did, so a batch interrupted under that format resumes, and the record
built from them is byte for byte the record those dicts made (tests/test_batch_state.py).

Sections a record signs as they are (the scan summary, membership inference, the forgetting
audit, the purge's registry report) stay dicts here: their schemas belong to the modules that
make them (lmeraser/audit/, lmeraser/tracking.py).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from lmeraser.lineage.records import CodeInfo
from lmeraser.request import Request

STEPS = ("capture", "apply", "version", "rebuild", "purge", "verify", "record")
Split = Literal["public", "private", "test"]


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    omitted_when_empty: ClassVar[tuple[str, ...]] = ()  # keys the batch file leaves out when empty

    def to_json(self) -> dict:
        out = self.model_dump(mode="json")
        for name in self.omitted_when_empty:
            if not out[name]:
                del out[name]
        return out


class Sample(_Step):
    """A target as the data held it before the batch."""

    split: Split
    content_hash: str
    label: int


class Capture(_Step):
    """The state before the batch changes anything, and its plan."""

    code: CodeInfo  # the code version as the batch found it
    data_md5: str | None
    dvc_lock_sha256: str | None
    prompts: dict[str, str]  # cluster -> sha256 of the prompt it serves
    exact_prompts: dict[str, str] = {}  # cluster -> sha256 of its exact prompt (influence overlays stand in for some)
    exact_keys: dict[str, str] | None = None  # cluster -> content-addressed key; None: captured before keys were kept
    supersedes: list[int] = []  # influence records of these requests that this batch supersedes
    accuracy: float | None
    planned_clusters: list[int]
    backbone_rebuild: bool
    samples: dict[str, Sample]  # sample id -> where it was
    membership_inference: dict | None
    n_clusters: int
    outside_change: dict | None = None
    forgetting_audit: dict | None = None  # the audit's references and before-scores (lmeraser/audit/forgetting.py)


class Applied(_Step):
    """The data changed: samples removed, corrections written, suppression rows listed."""

    removed: dict[str, list[str]]  # split -> sample ids removed
    erased_content_keys: list[str]
    suppression_rows: int
    applied_at: float


class Versioned(_Step):
    data_md5: str | None  # data.dvc's md5 after `dvc add data`


class Rebuilt(_Step):
    """The serving path re-run: what retrained, what each cluster serves now."""

    stages: list[str]
    rebuilt: list[int]
    retired: list[int]
    prompts: dict[str, str]
    seeds: dict[str, int]
    accuracy: float | None
    dvc_lock_sha256: str | None
    superseded: list[str]  # sha256 of prompts no longer served anywhere: the purge deletes them

    @property
    def changed(self) -> list[int]:
        return sorted(set(self.rebuilt) | set(self.retired))


class Purged(_Step):
    omitted_when_empty = ("artifact_stores_unreachable",)

    artifact_files_removed: int
    feature_cache_rows_removed: int
    registry: dict
    dvc_gc: bool
    remotes_gc: list[str]
    remotes_failed: list[str]
    remote_gc: bool
    artifact_stores_unreachable: list[str] = []


class Verified(_Step):
    scan: dict  # the scan's summary and its first hits (lmeraser/audit/scan.py)
    clusters_as_planned: bool
    planned_clusters: list[int]
    changed_clusters: list[int]
    membership_inference: dict
    forgetting_audit: dict | None = None  # the record's section (lmeraser/audit/forgetting.py)


class Recorded(_Step):
    record: int
    sha256: str
    commit: str | None


RESULTS: dict[str, type[_Step]] = {
    "capture": Capture,
    "apply": Applied,
    "version": Versioned,
    "rebuild": Rebuilt,
    "purge": Purged,
    "verify": Verified,
    "record": Recorded,
}


class BatchState(BaseModel):
    """`audit/batches/<batch_id>.json`: the batch's requests and each finished step's result."""

    model_config = ConfigDict(extra="forbid")
    batch_id: str
    requests: list[Request]
    done: dict[str, _Step] = {}
    seconds: dict[str, float] = {}
    started_at: float | None = None
    git_commit: bool = True
    # The stages the rebuild ran, saved before dvc.lock records them: a rebuild resumed after a
    # kill past that write finds nothing left to run, and still knows what ran (the record's
    # `stages_run`, the tracking hand-on).
    stages_ran: list[dict] = []
    # The superseded prompts the rebuild deleted from the store before that write (the purge counts them).
    prompts_removed: list[str] = []

    @classmethod
    def from_json(cls, obj: dict) -> BatchState:
        """Parse a batch file's JSON (raises ValueError or ValidationError on anything else).

        Args:
            obj: a batch file's parsed JSON (what `to_json` wrote).
        """
        if not isinstance(obj, dict) or not isinstance(obj.get("done"), dict):
            raise ValueError("not a batch state")
        unknown = sorted(set(obj["done"]) - set(RESULTS))
        if unknown:
            raise ValueError(f"unknown step {unknown[0]}")
        done = {step: RESULTS[step].model_validate(result) for step, result in obj["done"].items()}
        return cls.model_validate({**obj, "done": {}}).model_copy(update={"done": done})

    def to_json(self) -> dict:
        # stages_ran and prompts_removed only while they hold something: a batch file of earlier
        # code reads and writes back unchanged
        empty = {name for name in ("stages_ran", "prompts_removed") if not getattr(self, name)}
        out = self.model_dump(mode="json", exclude={"done"} | empty)
        out["done"] = {step: result.to_json() for step, result in self.done.items()}
        return out
