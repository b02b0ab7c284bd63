"""Forget and rectify requests, their validation, and the durable request journal.

A request is validated against the data before anything changes, then appended to
`audit/journal.jsonl` as `received`; processing appends `applied` and `verified`. The journal is
append-only, fsynced, and guarded by a file lock, so concurrent commands serialise and no
request is lost; a torn last line (a crash mid-append) is ignored and repaired.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from lmeraser.errors import LmeraserError
from lmeraser.io import atomic_write_bytes
from lmeraser.salt import Keyer
from lmeraser.workspace import SPLITS, Workspace


class RequestSpec(BaseModel):
    """One line of a requests file, or one CLI invocation."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["forget", "rectify"] = "forget"
    sample_ids: list[str] = []
    subjects: list[str] = []
    label: int | None = None
    input: str | None = None  # path of a corrected image (.npy or .png), rectify only
    allow_backbone_rebuild: bool = False

    @model_validator(mode="after")
    def _shape(self) -> RequestSpec:
        if self.kind == "forget":
            if not self.sample_ids and not self.subjects:
                raise ValueError("a forget request needs sample_ids or subjects")
            if self.label is not None or self.input is not None:
                raise ValueError("label and input belong to rectify requests")
        else:
            if len(self.sample_ids) != 1 or self.subjects:
                raise ValueError("a rectify request names exactly one sample id")
            if (self.label is None) == (self.input is None):
                raise ValueError("a rectify request needs exactly one of label or input")
        return self


def parse_requests_file(path: Path) -> list[RequestSpec]:
    """Parse a JSONL file; any bad line refuses the whole file, naming the line."""
    if not path.exists():
        raise LmeraserError(f"{path}: requests file not found.")
    specs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            specs.append(RequestSpec.model_validate(json.loads(line)))
        except json.JSONDecodeError as error:
            raise LmeraserError(f"{path} line {number}: not valid JSON ({error.msg}); nothing was applied.") from None
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise LmeraserError(
                f"{path} line {number}: {where + ': ' if where else ''}{first['msg'].removeprefix('Value error, ')}; nothing was applied."
            ) from None
    if not specs:
        raise LmeraserError(f"{path}: no requests in the file.")
    return specs


def hash_subject(ws: Workspace, subject: str) -> str:
    """A subject id as records state it: keyed with the workspace's secret salt."""
    return Keyer(ws).subject(subject)


@dataclass
class ResolvedRequest:
    """A validated request, ready for the journal (no raw subject ids)."""

    request_id: str
    kind: str
    sample_ids: list[str]  # targets that still exist (to act on)
    already_forgotten: list[str]  # targets that were forgotten before: idempotent no-ops
    subject_hashes: list[str]
    public: bool = False
    subjects_already_forgotten: list[str] = field(default_factory=list)  # keyed hashes: no-ops too
    label: int | None = None
    input_path: str | None = None
    received_at: float = field(default_factory=time.time)

    def event(self, state: str, **extra) -> dict:
        return {"request_id": self.request_id, "state": state, "time": time.time(), **extra}

    def to_json(self) -> dict:
        return {
            "request_id": self.request_id,
            "kind": self.kind,
            "sample_ids": self.sample_ids,
            "already_forgotten": self.already_forgotten,
            "subjects_already_forgotten": self.subjects_already_forgotten,
            "subject_hashes": self.subject_hashes,
            "public": self.public,
            "label": self.label,
            "input_path": self.input_path,
            "received_at": self.received_at,
        }


def forgotten_subjects(ws: Workspace) -> set[str]:
    """Keyed hashes of the subjects of every forget request an exact batch completed."""
    return {
        h
        for entry in Journal(ws).requests().values()
        if entry["state"] == "verified" and entry.get("request", {}).get("kind") == "forget"
        for h in entry["request"]["subject_hashes"]
    }


def _shown(text: str, limit: int = 80) -> str:
    """User text as an error may echo it: printable and short."""
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[:limit] + "…"


def resolve(spec: RequestSpec, ws: Workspace) -> ResolvedRequest:
    """Check every target against the data; refuse unknown ids and public samples."""
    manifests = {split: ws.manifest(split) for split in SPLITS}
    tomb = ws.tombstones()
    forgotten = set(tomb["sample_id"].dropna()) if "sample_id" in tomb else set()
    where = {sid: split for split, frame in manifests.items() for sid in frame["sample_id"]}
    targets = list(dict.fromkeys(spec.sample_ids))
    private = manifests["private"]
    keyer = Keyer(ws)
    erased_subjects = forgotten_subjects(ws)
    subjects_gone = []
    for subject in spec.subjects:
        members = private.loc[private["subject_id"] == subject, "sample_id"].tolist()
        if not members:
            if keyer.subject(subject) in erased_subjects:
                subjects_gone.append(keyer.subject(subject))  # forgotten before: a recorded no-op, like an id
                continue
            raise LmeraserError(f"subject {_shown(subject)} has no private samples and was never forgotten.")
        targets.extend(m for m in members if m not in targets)
    live, gone = [], []
    for sid in targets:
        if sid in forgotten:
            gone.append(sid)
            continue
        split = where.get(sid)
        if split is None:
            raise LmeraserError(f"sample id {sid} is unknown: not in data/ and never forgotten.")
        if split == "test":
            raise LmeraserError(f"sample id {sid} is in the test split, which trains nothing; remove it from the evaluation data instead.")
        if split == "public" and not spec.allow_backbone_rebuild:
            raise LmeraserError(
                f"sample id {sid} is public: the backbone and the prototypes were trained on it, so removing it means "
                "rebuilding the whole pipeline; pass --allow-backbone-rebuild to do that."
            )
        live.append(sid)
    if spec.kind == "rectify":
        if gone:
            raise LmeraserError(f"sample id {gone[0]} was forgotten and cannot be rectified.")
        if spec.label is not None:
            classes = int(max(frame["label"].max() for frame in manifests.values())) + 1
            if not 0 <= spec.label < classes:
                raise LmeraserError(f"label {spec.label} is outside the label domain 0..{classes - 1}.")
        if spec.input is not None:
            load_corrected_image(Path(spec.input), tuple(ws.source_info()["image_shape"]))
    is_public = any(where.get(sid) == "public" for sid in live)
    return ResolvedRequest(
        request_id=f"req-{uuid.uuid4().hex[:12]}",
        kind=spec.kind,
        sample_ids=live,
        already_forgotten=gone,
        subject_hashes=[hash_subject(ws, s) for s in spec.subjects],
        subjects_already_forgotten=subjects_gone,
        public=is_public,
        label=spec.label,
        input_path=str(Path(spec.input).resolve()) if spec.input else None,
    )


def load_corrected_image(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    if not path.exists():
        raise LmeraserError(f"{path}: corrected input not found.")
    if path.suffix == ".npy":
        try:
            image = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as error:
            raise LmeraserError(f"{path}: unreadable .npy ({error}).") from None
    else:
        from PIL import Image

        try:
            image = np.asarray(Image.open(path).convert("L"))
        except OSError as error:
            raise LmeraserError(f"{path}: unreadable image ({error}).") from None
    if image.shape != tuple(shape):
        raise LmeraserError(f"{path}: corrected input has shape {image.shape}, expected {tuple(shape)}.")
    if not np.issubdtype(image.dtype, np.integer) or image.min() < 0 or image.max() > 255:
        raise LmeraserError(f"{path}: pixels must be integers in 0..255.")
    return image.astype(np.uint8)


class Journal:
    """`audit/journal.jsonl`: one JSON event per line (`received`, `applied`, `verified`)."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        self.path = ws.journal_file

    def _repair(self) -> None:
        # A crash mid-append can leave a last line without its newline: drop it (it was never
        # acknowledged to the caller, who sees a failure and may resubmit).
        if self.path.exists():
            raw = self.path.read_bytes()
            if raw and not raw.endswith(b"\n"):
                atomic_write_bytes(self.path, raw[: raw.rfind(b"\n") + 1])

    def append(self, events: list[dict]) -> None:
        with self.ws.lock("journal"):
            self._repair()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as handle:
                handle.write(b"".join(json.dumps(e, sort_keys=True).encode() + b"\n" for e in events))
                handle.flush()
                os.fsync(handle.fileno())

    def events(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_bytes().split(b"\n"):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # torn last line
        return out

    def requests(self) -> dict[str, dict]:
        """request_id -> {"request": <received payload>, "state": <latest state>, ...}."""
        out: dict[str, dict] = {}
        for event in self.events():
            entry = out.setdefault(event["request_id"], {"state": None})
            if event["state"] == "received":
                entry["request"] = event["request"]
            entry["state"] = event["state"]
            entry.setdefault("history", []).append(event)
        return out

    def pending(self) -> list[dict]:
        """Received but not yet verified, in arrival order."""
        return [e["request"] for e in self.requests().values() if e["state"] != "verified" and "request" in e]

    def submit(self, resolved: list[ResolvedRequest], method: str = "exact") -> None:
        self.append([r.event("received", request=r.to_json(), method=method) for r in resolved])

    def awaiting_influence(self) -> list[dict]:
        """Requests submitted with `--method influence` whose influence update is not applied yet."""
        return [e["request"] for e in self.requests().values() if e["state"] == "received" and "request" in e and e["history"][0].get("method") == "influence"]
