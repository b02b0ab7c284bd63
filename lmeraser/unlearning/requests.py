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
from typing import Annotated, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from lmeraser.errors import LmeraserError, shown
from lmeraser.io import MissingFile, atomic_save_npy, atomic_write_bytes, npy_header, read_input_bytes, read_input_text, read_trusted
from lmeraser.salt import Keyer
from lmeraser.workspace import SPLITS, Workspace, image_channels

# Limits on what a request may carry: far above any real request, far below what could exhaust
# memory or flood a terminal.
MAX_REQUESTS_FILE = 16 << 20
MAX_LINE = 64 << 10
MAX_ID = 256
MAX_IDS = 100_000
MAX_IMAGE_FILE = 16 << 20
MAX_JOURNAL = 1 << 30  # about two million requests


def _plain_id(value: str) -> str:
    if any(not c.isprintable() for c in value):
        raise ValueError(f"id {shown(value)} holds a control character")
    return value


Identifier = Annotated[str, Field(min_length=1, max_length=MAX_ID), AfterValidator(_plain_id)]


class RequestSpec(BaseModel):
    """One line of a requests file, or one CLI invocation."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["forget", "rectify"] = "forget"
    sample_ids: list[Identifier] = Field(default=[], max_length=MAX_IDS)
    subjects: list[Identifier] = Field(default=[], max_length=MAX_IDS)
    label: int | None = Field(default=None, ge=0, lt=1 << 31)
    input: str | None = Field(default=None, max_length=4096)  # path of a corrected image (.npy or .png), rectify only
    allow_backbone_rebuild: bool = False  # from the command line only: a requests file cannot grant it

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


def parse_requests_file(path: Path, kind: str) -> list[RequestSpec]:
    """Parse a JSONL file of `kind` requests; any bad line refuses the whole file, naming the line."""
    text = read_input_text(path, "requests file", MAX_REQUESTS_FILE)
    specs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{shown(path, 200)} line {number}"
        if len(line) > MAX_LINE:
            raise LmeraserError(f"{where}: longer than {MAX_LINE} characters; nothing was applied.")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as error:
            raise LmeraserError(f"{where}: not valid JSON ({error.msg}); nothing was applied.") from None
        except (ValueError, RecursionError):
            raise LmeraserError(f"{where}: not valid JSON (a number too long or nesting too deep); nothing was applied.") from None
        if isinstance(obj, dict) and "allow_backbone_rebuild" in obj:
            raise LmeraserError(f"{where}: a requests file cannot grant allow_backbone_rebuild; pass --allow-backbone-rebuild; nothing was applied.")
        try:
            spec = RequestSpec.model_validate(obj)
        except ValidationError as error:
            first = error.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise LmeraserError(f"{where}: {shown(field) + ': ' if field else ''}{first['msg'].removeprefix('Value error, ')}; nothing was applied.") from None
        if spec.kind != kind:
            raise LmeraserError(f"{where}: a {spec.kind} request, but `lmeraser {kind} --file` takes {kind} requests only; nothing was applied.")
        specs.append(spec)
    if not specs:
        raise LmeraserError(f"{shown(path, 200)}: no requests in the file.")
    return specs


@dataclass
class ResolvedRequest:
    """A validated request, ready for the journal (no raw subject ids)."""

    request_id: str
    kind: str
    sample_ids: list[str]  # targets that still exist (to act on)
    already_forgotten: list[str]  # targets that were forgotten before: idempotent no-ops
    subjects: list[str]  # raw, in memory only: keyed when journaled (Journal.submit)
    public: bool = False
    subjects_already_forgotten: list[str] = field(default_factory=list)  # keyed hashes: no-ops too
    label: int | None = None
    input_path: str | None = None  # the corrected image's copy in the workspace, relative to its root
    received_at: float = field(default_factory=time.time)
    image: np.ndarray | None = None  # the corrected image, validated; copied at submission
    subject_hashes: list[str] = field(default_factory=list)  # the subjects keyed with the salt, at submission

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


def erased_ids(tombstones) -> set[str]:
    """Sample ids the tombstones say were erased: forget rows only. A corrected label or image is
    listed too, but a rectified sample is still in the data and can be forgotten later."""
    if tombstones.empty:
        return set()
    return set(tombstones.loc[tombstones["reason"] == "forget", "sample_id"]) - {""}


class Resolver:
    """What resolving requests needs from the data, read once: the manifests, where each id lives,
    each subject's private samples, the erased ids and subjects. A requests file of any length
    costs one pass over the manifests, not one per line."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        manifests = {split: ws.manifest(split) for split in SPLITS}
        self.where = {sid: split for split, frame in manifests.items() for sid in frame["sample_id"]}
        private = manifests["private"]
        self.members: dict[str, list[str]] = {}
        for sid, subject in zip(private["sample_id"], private["subject_id"]):
            self.members.setdefault(subject, []).append(sid)
        tombstones = ws.tombstones()
        self.forgotten = erased_ids(tombstones)
        # Contents that must never come back: a corrected image equal to one is refused.
        self.erased_contents = set(tombstones.loc[tombstones["reason"] == "forget", "content_key"]) - {""}
        self.erased_subjects = forgotten_subjects(ws)
        self._keyer: Keyer | None = None
        self.classes = int(max(frame["label"].max() for frame in manifests.values() if len(frame)) + 1)
        self.shape = tuple(ws.source_info()["image_shape"])

    @property
    def keyer(self) -> Keyer:
        """The salt's keyed hashes, read (never made) when a check needs them: a salt exists once
        anything was erased, and a plain forget by id needs none."""
        if self._keyer is None:
            self._keyer = Keyer(self.ws, create=False)
        return self._keyer

    def resolve(self, spec: RequestSpec, upload: bytes | None = None) -> ResolvedRequest:
        """Check every target against the data; refuse unknown ids and public samples. A sample
        still in the data is acted on, whatever the tombstones say; "already forgotten" is said
        only of an id that the tombstones list as erased and that no split holds."""
        ws = self.ws
        targets = list(dict.fromkeys(spec.sample_ids))
        subjects_gone = []
        for subject in spec.subjects:
            members = self.members.get(subject, [])
            if not members:
                if self.erased_subjects and self.keyer.subject(subject) in self.erased_subjects:
                    subjects_gone.append(self.keyer.subject(subject))  # forgotten before: a recorded no-op, like an id
                    continue
                raise LmeraserError(f"subject {shown(subject)} has no private samples and was never forgotten.")
            seen = set(targets)
            targets.extend(m for m in members if m not in seen)
        live, gone = [], []
        for sid in targets:
            split = self.where.get(sid)
            if split is None and sid in self.forgotten:
                gone.append(sid)
                continue
            if split is None:
                raise LmeraserError(f"sample id {shown(sid)} is unknown: not in data/ and never forgotten.")
            if split == "test":
                raise LmeraserError(f"sample id {shown(sid)} is in the test split, which trains nothing; remove it from the evaluation data instead.")
            if split == "public" and not spec.allow_backbone_rebuild:
                raise LmeraserError(
                    f"sample id {shown(sid)} is public: the backbone and the prototypes were trained on it, so removing it means "
                    "rebuilding the whole pipeline; pass --allow-backbone-rebuild to do that."
                )
            live.append(sid)
        if spec.kind == "rectify":
            if gone:
                raise LmeraserError(f"sample id {shown(gone[0])} was forgotten and cannot be rectified.")
            if spec.label is not None and not 0 <= spec.label < self.classes:
                raise LmeraserError(f"label {spec.label} is outside the label domain 0..{self.classes - 1}.")
        if upload is not None:
            image = decode_corrected_image(upload, "the uploaded image", upload[:6] == b"\x93NUMPY", self.shape)
        else:
            image = load_corrected_image(Path(spec.input), self.shape) if spec.input is not None else None
        if image is not None and self.erased_contents:
            from lmeraser.data.splits import content_hash

            if self.keyer.content(content_hash(image)) in self.erased_contents:
                raise LmeraserError(
                    f"the corrected image for sample {shown(live[0] if live else '')} is the image of an erased sample "
                    "(on the suppression list): it can never enter the data; nothing was applied."
                )
        is_public = any(self.where.get(sid) == "public" for sid in live)
        request_id = f"req-{uuid.uuid4().hex[:12]}"
        return ResolvedRequest(
            request_id=request_id,
            kind=spec.kind,
            sample_ids=live,
            already_forgotten=gone,
            subjects=list(spec.subjects),
            subjects_already_forgotten=subjects_gone,
            public=is_public,
            label=spec.label,
            input_path=ws.relative(ws.inputs_dir / f"{request_id}.npy") if image is not None else None,
            image=image,
        )


def resolve(spec: RequestSpec, ws: Workspace, upload: bytes | None = None) -> ResolvedRequest:
    """Resolve one request (see Resolver.resolve); `upload` is a corrected image's bytes sent
    over HTTP (then `spec.input` only names it)."""
    return Resolver(ws).resolve(spec, upload)


def submit(specs: list[RequestSpec], ws: Workspace, method: str = "exact", uploads: list[bytes | None] | None = None) -> list[ResolvedRequest]:
    """Validate every request against the params and the data, then journal them all as `received`
    (all or none). An influence request is checked for an update that can be applied; an exact one
    for params an exact batch can run with. `uploads[i]` is request i's corrected image sent over
    HTTP. The CLI and the HTTP service both submit through here."""
    from lmeraser.config import load_params

    with ws.lock("submit"):
        load_params(ws.params_file)  # params, data and every request validated before anything is written
        uploads = uploads or [None] * len(specs)
        resolver = Resolver(ws)
        resolved = [resolver.resolve(spec, upload) for spec, upload in zip(specs, uploads, strict=True)]
        if method == "influence":
            from lmeraser.unlearning.approximate import check_influence
            from lmeraser.unlearning.preflight import check_signer

            check_influence([r.to_json() for r in resolved], ws)
            check_signer(ws)  # an update is served only with its signed record
        else:
            from lmeraser.unlearning.exact import rebuild_params

            rebuild_params(ws)  # an exact batch must be able to run with these params
        Journal(ws).submit(resolved, method)
    return resolved


def load_corrected_image(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A corrected image (.npy or .png), read once from a regular file of bounded size."""
    raw = read_input_bytes(path, "corrected input", MAX_IMAGE_FILE)
    return decode_corrected_image(raw, shown(path, 200), path.suffix == ".npy", shape)


def decode_corrected_image(raw: bytes, where: str, is_npy: bool, shape: tuple[int, ...]) -> np.ndarray:
    """A corrected image from its bytes (.npy, or PNG and other Pillow formats); its shape and
    dtype are checked from the header before any pixel is decoded; `where` names it in errors."""
    import io

    if len(raw) > MAX_IMAGE_FILE:
        raise LmeraserError(f"{where}: larger than {MAX_IMAGE_FILE >> 20} MiB.")
    if is_npy:
        try:
            found, dtype = npy_header(raw)
        except ValueError:
            raise LmeraserError(f"{where}: not a .npy array file (save it with numpy.save).") from None
        if tuple(found) != tuple(shape):
            raise LmeraserError(f"{where}: corrected input has shape {shown(found)}, expected {tuple(shape)}.")
        if dtype.kind not in "iu":
            raise LmeraserError(f"{where}: pixels must be integers in 0..255 (the array holds {shown(dtype)}).")
        try:
            image = np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, EOFError, OSError):
            raise LmeraserError(f"{where}: a truncated .npy array file.") from None
    else:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(raw)) as picture:
                rgb = image_channels(shape) == 3
                if rgb and picture.mode != "RGB":
                    raise LmeraserError(f"{where}: a {shown(picture.mode)} image, but the data is RGB; give an RGB image, it is never converted.")
                if not rgb and picture.mode not in ("L", "1"):
                    raise LmeraserError(f"{where}: a {shown(picture.mode)} image, but the data is grey; give a grey (mode L) image, it is never converted.")
                if (picture.height, picture.width) != tuple(shape[:2]):
                    raise LmeraserError(f"{where}: corrected input is {picture.height}x{picture.width}, expected {tuple(shape)}.")
                image = np.asarray(picture if rgb else picture.convert("L"))
        except (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError):
            raise LmeraserError(f"{where}: not a readable PNG or other image file.") from None
    if image.shape != tuple(shape):
        raise LmeraserError(f"{where}: corrected input has shape {image.shape}, expected {tuple(shape)}.")
    if image.min() < 0 or image.max() > 255:
        raise LmeraserError(f"{where}: pixels must be integers in 0..255.")
    return image.astype(np.uint8)


def corrected_image(ws: Workspace, request: dict) -> np.ndarray:
    """A rectify request's corrected image, from its copy in the workspace."""
    return load_corrected_image(ws.root / request["input_path"], tuple(ws.source_info()["image_shape"]))


class Journal:
    """`audit/journal.jsonl`: one JSON event per line (`received`, `applied`, `verified`)."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        self.path = ws.journal_file

    def _repair(self) -> None:
        # A crash mid-append can leave a last line without its newline: drop it (it was never
        # acknowledged to the caller, who sees a failure and may resubmit).
        if os.path.lexists(self.path):
            raw = read_trusted(self.path, "request journal", MAX_JOURNAL)
            if raw and not raw.endswith(b"\n"):
                atomic_write_bytes(self.path, raw[: raw.rfind(b"\n") + 1])

    def append(self, events: list[dict]) -> None:
        """Append events, skipping any that would repeat a request's current state: a step
        re-run after a crash (between its journal write and its own completion) changes nothing."""
        with self.ws.lock("journal"):
            self._repair()
            current = {rid: entry["state"] for rid, entry in self.requests().items()}
            events = [e for e in events if current.get(e["request_id"]) != e["state"]]
            if not events:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as handle:
                handle.write(b"".join(json.dumps(e, sort_keys=True).encode() + b"\n" for e in events))
                handle.flush()
                os.fsync(handle.fileno())

    def events(self) -> list[dict]:
        try:
            # A regular file, never through a link, bounded: a FIFO or device cannot hang a command.
            raw = read_trusted(self.path, "request journal", MAX_JOURNAL)
        except MissingFile:
            return []
        *lines, tail = raw.split(b"\n")  # an unterminated tail is a torn append: ignored
        out = []
        for number, line in enumerate(lines, start=1):
            try:
                event = json.loads(line)
                if not (isinstance(event, dict) and isinstance(event.get("request_id"), str) and isinstance(event.get("state"), str)):
                    raise ValueError
                if event["state"] == "received" and not isinstance(event.get("request"), dict):
                    raise ValueError
            except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError included
                raise LmeraserError(f"{self.path} line {number}: not a journal event (the journal was altered); restore it from git.") from None
            out.append(event)
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
        """Journal the requests as `received`, after copying each corrected image into the
        workspace (0600; deleted when its exact batch is recorded), so nothing outside the
        workspace is read again."""
        keyer = Keyer(self.ws) if any(r.subjects for r in resolved) else None  # the salt is made with the first need
        for request in resolved:
            request.subject_hashes = [keyer.subject(s) for s in request.subjects] if keyer else []
            if request.image is not None:
                atomic_save_npy(self.ws.root / request.input_path, request.image, mode=0o600)
        self.append([r.event("received", request=r.to_json(), method=method) for r in resolved])

    def awaiting_influence(self) -> list[dict]:
        """Requests submitted with `--method influence` whose influence update is not applied yet."""
        return [e["request"] for e in self.requests().values() if e["state"] == "received" and "request" in e and e["history"][0].get("method") == "influence"]
