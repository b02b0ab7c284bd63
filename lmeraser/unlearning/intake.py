"""Intake: requests from a requests file, the CLI or an HTTP body, checked against the params
and the data, then journaled as `received`, all or none. The CLI and the HTTP service both
submit through `submit`.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from pydantic import ValidationError

from lmeraser.config import load_params
from lmeraser.errors import LmeraserError, shown
from lmeraser.io import read_input_text
from lmeraser.journal import Journal, Submission
from lmeraser.request import (
    MAX_LINE,
    MAX_REQUESTS_FILE,
    Request,
    RequestSpec,
    decode_corrected_image,
    load_corrected_image,
)
from lmeraser.salt import Keyer
from lmeraser.workspace import SPLITS, Workspace


def parse_requests_file(path: Path, kind: str) -> list[RequestSpec]:
    """Parse a JSONL file of `kind` requests; any bad line refuses the whole file, naming the line.

    Args:
        path: the requests file (a regular file of at most 16 MiB; one JSON object per line).
        kind: "forget" or "rectify": the kind every line must be.

    Raises:
        LmeraserError: naming the file, the line and the field; nothing was applied.
    """
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
            raise LmeraserError(
                f"{where}: not valid JSON (a number too long or nesting too deep); nothing was applied."
            ) from None
        if isinstance(obj, dict) and "allow_backbone_rebuild" in obj:
            raise LmeraserError(
                f"{where}: a requests file cannot grant allow_backbone_rebuild; pass --allow-backbone-rebuild; "
                "nothing was applied."
            )
        try:
            spec = RequestSpec.model_validate(obj)
        except ValidationError as error:
            first = error.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise LmeraserError(
                f"{where}: {shown(field) + ': ' if field else ''}{first['msg'].removeprefix('Value error, ')}; "
                "nothing was applied."
            ) from None
        if spec.kind != kind:
            raise LmeraserError(
                f"{where}: a {spec.kind} request, but `lmeraser {kind} --file` takes {kind} requests only; "
                "nothing was applied."
            )
        specs.append(spec)
    if not specs:
        raise LmeraserError(f"{shown(path, 200)}: no requests in the file.")
    return specs


def erased_ids(tombstones) -> set[str]:
    """Sample ids the tombstones say were erased: forget rows only. A corrected label or image is
    listed too, but a rectified sample is still in the data and can be forgotten later.

    Args:
        tombstones: the workspace's tombstones table (`Workspace.tombstones`), with its `reason` and `sample_id`
            columns.
    """
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
        # Columns as lists first: iterating a pandas string column costs several times as much.
        self.where = {sid: split for split, frame in manifests.items() for sid in frame["sample_id"].tolist()}
        private = manifests["private"]
        self.members: dict[str, list[str]] = {}
        for sid, subject in zip(private["sample_id"].tolist(), private["subject_id"].tolist()):
            self.members.setdefault(subject, []).append(sid)
        tombstones = ws.tombstones()
        self.forgotten = erased_ids(tombstones)
        # Contents that must never come back: a corrected image equal to one is refused.
        self.erased_contents = set(tombstones.loc[tombstones["reason"] == "forget", "content_key"]) - {""}
        self.erased_subjects = Journal(ws).forgotten_subjects()
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

    def resolve(self, spec: RequestSpec, upload: bytes | None = None) -> Submission:
        """Check every target against the data; refuse unknown ids and public samples. A sample
        still in the data is acted on, whatever the tombstones say; "already forgotten" is said
        only of an id that the tombstones list as erased and that no split holds.

        Args:
            spec: the request as asked (a requests file's line, CLI options or an HTTP body).
            upload: a corrected image's bytes sent over HTTP (then `spec.input` only names it); None: the image, if any,
                is read from `spec.input`.

        Returns:
            The `Request` (subjects not yet keyed) with the raw subjects and the corrected image, for `Journal.submit`.
        """
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
                raise LmeraserError(
                    f"sample id {shown(sid)} is in the test split, which trains nothing; "
                    "remove it from the evaluation data instead."
                )
            if split == "public" and not spec.allow_backbone_rebuild:
                raise LmeraserError(
                    f"sample id {shown(sid)} is public: the backbone and the prototypes were trained on it, "
                    "so removing it means rebuilding the whole pipeline; pass --allow-backbone-rebuild to do that."
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
            from lmeraser.data.splits import content_hash  # only for an image correction after an erasure

            if self.keyer.content(content_hash(image)) in self.erased_contents:
                raise LmeraserError(
                    f"the corrected image for sample {shown(live[0] if live else '')} is the image of an erased sample "
                    "(on the suppression list): it can never enter the data; nothing was applied."
                )
        is_public = any(self.where.get(sid) == "public" for sid in live)
        request_id = f"req-{uuid.uuid4().hex[:12]}"
        request = Request(
            request_id=request_id,
            kind=spec.kind,
            sample_ids=tuple(live),
            already_forgotten=tuple(gone),
            subjects_already_forgotten=tuple(subjects_gone),
            public=is_public,
            label=spec.label,
            input_path=Workspace.corrected_input(request_id) if image is not None else None,
            received_at=time.time(),
        )
        return Submission(request, list(spec.subjects), image)


def resolve(spec: RequestSpec, ws: Workspace, upload: bytes | None = None) -> Submission:
    """Resolve one request against the data (see Resolver.resolve), writing nothing.

    Args:
        spec: the request as asked.
        ws: the workspace whose data it names.
        upload: a corrected image's bytes sent over HTTP (then `spec.input` only names it).

    Returns:
        The `Request` (subjects not yet keyed) with the raw subjects and the image, for
        `Journal.submit`.
    """
    return Resolver(ws).resolve(spec, upload)


def submit(
    specs: list[RequestSpec], ws: Workspace, method: str = "exact", uploads: list[bytes | None] | None = None
) -> list[Request]:
    """Validate every request against the params and the data, then journal them all as `received`
    (all or none). The CLI and the HTTP service both submit through here.

    Args:
        specs: the requests as asked (a requests file's lines, CLI options or HTTP bodies).
        ws: the workspace.
        method: "exact" (checked for params an exact batch can run with) or "influence" (checked
            for an update that can be applied, and a key that can sign it).
        uploads: request i's corrected image as bytes sent over HTTP, or None.

    Returns:
        The requests as journaled (subjects keyed, corrected images copied into the workspace).
    """
    with ws.lock("submit"):
        load_params(ws.params_file)  # params, data and every request validated before anything is written
        uploads = uploads or [None] * len(specs)
        resolver = Resolver(ws)
        resolved = [resolver.resolve(spec, upload) for spec, upload in zip(specs, uploads, strict=True)]
        if method == "influence":
            from lmeraser.unlearning.influence_update import check_influence  # torch: influence requests only
            from lmeraser.unlearning.preflight import check_signer

            check_influence([s.request for s in resolved], ws)
            check_signer(ws)  # an update is served only with its signed record
        else:
            from lmeraser.unlearning.exact import rebuild_params  # the batch module, for exact requests only

            rebuild_params(ws)  # an exact batch must be able to run with these params
        return Journal(ws).submit(resolved, method)
