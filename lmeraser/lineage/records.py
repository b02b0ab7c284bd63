"""The lineage record schema, and the one way a record is signed and appended.

A record is an in-toto v1 Statement in a DSSE envelope (dsse.py), one per line of the
hash-chained log (log.py). Its subjects are the deployed artifacts by sha256; its predicate is
one of the two typed shapes below: an exact batch (data changed, clusters rebuilt, stores
purged, checks run) or an influence update (approximate, superseded by a later exact batch).
The log adds `sequence` and `previous_record_sha256` to every predicate when it appends.

Records hold content hashes and keyed hashes, never raw sample ids of subjects, pixels or keys.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict

from lmeraser.code_identity import code_version
from lmeraser.errors import LmeraserError, shown
from lmeraser.io import MissingFile, atomic_write_bytes, atomic_write_json, read_trusted, sha256_file, sha256_json
from lmeraser.lineage import keys
from lmeraser.lineage.keys import key_id, load_or_create_key, load_public_key, public_pem
from lmeraser.lineage.log import LineageLog, Record
from lmeraser.overlay import Overlay
from lmeraser.request import Request
from lmeraser.versioning import git_commit
from lmeraser.workspace import Workspace


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


LEGAL_BASIS = {"forget": "GDPR Art. 17 (erasure)", "rectify": "GDPR Art. 16 (rectification)"}


def utc(timestamp: float | None = None) -> str:
    """A moment as records state it: UTC, ISO 8601, to the second."""
    moment = datetime.now(UTC) if timestamp is None else datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


class RequestSummary(_Schema):
    """A request as a record states it: ids, kind, legal basis, dates and keyed subject hashes,
    never raw subjects."""

    request_id: str
    kind: Literal["forget", "rectify"]
    legal_basis: str
    samples: int  # targets acted on (ids already forgotten are listed apart)
    subject_hashes: list[str]
    already_forgotten: list[str]  # keyed (HMAC) ids of targets forgotten before (no-ops), never raw ids
    subjects_already_forgotten: list[str] = []  # keyed hashes of subjects forgotten before (no-ops)
    label: int | None = None
    input: Literal["corrected image"] | None = None
    received_at: str
    applied_at: str | None  # when data/ (exact) or the served prompt (influence) changed
    completed_at: str | None  # when the exact erasure was verified and recorded; None: still queued

    @classmethod
    def of(
        cls,
        request: Request,
        applied_at: float | None,
        completed_at: str | None,
        key: Callable[[str], str] | None = None,
    ) -> RequestSummary:
        """The request's fields as the record states them; `key` keys sample ids (the salt's HMAC,
        as scans and audits key them): records name no raw id of a forgotten sample."""
        key = key or _sample_key_unavailable
        return cls(
            request_id=request.request_id,
            kind=request.kind,
            legal_basis=LEGAL_BASIS[request.kind],
            samples=len(request.sample_ids),
            subject_hashes=list(request.subject_hashes),
            already_forgotten=[key("sample:" + sid) for sid in request.already_forgotten],
            subjects_already_forgotten=list(request.subjects_already_forgotten),
            label=request.label,
            input="corrected image" if request.input_path else None,
            received_at=utc(request.received_at),
            applied_at=None if applied_at is None else utc(applied_at),
            completed_at=completed_at,
        )


def _sample_key_unavailable(sample_id: str) -> str:
    raise LmeraserError("a record needs the workspace's salt to key the ids of samples forgotten before.")


class CodeInfo(_Schema):
    git_commit: str
    params_sha256: str
    seed: int


class ClusterRebuilt(_Schema):
    cluster: int
    prompt_sha256_before: str | None  # None: the cluster is new
    prompt_sha256_after: str | None  # None: the cluster was retired (emptied)
    seed: int | None


class DataVersions(_Schema):
    data_dvc_md5_before: str | None
    data_dvc_md5_after: str | None
    dvc_lock_sha256_before: str | None
    dvc_lock_sha256_after: str | None


class BeforeAfter(_Schema):
    before: float | None
    after: float | None


class OutsideChange(_Schema):
    """What changed in the serving path between the previous record and this batch's start, with
    no record of its own (a re-ingestion and `dvc repro`, an upgrade): this record names it."""

    since_record: int
    subjects_changed: list[str]  # deployed artifacts whose sha256 differs from the previous record's
    clusters_changed: list[ClusterRebuilt]  # served prompts that differ (before: the previous record's)


class ExactPredicate(_Schema):
    """An exact batch: the data changed, the affected clusters were rebuilt from it."""

    batch_id: str
    method: Literal["exact"] = "exact"
    recorded_at: str  # UTC, ISO 8601
    supersedes: list[int]  # influence records whose requests this batch made exact
    signer: str = ""  # filled by sign_and_append
    requests: list[RequestSummary]
    removed_content_keys: list[str]  # keyed (HMAC) content hashes of erased and replaced samples
    samples_affected: int
    backbone_rebuild: bool
    planned_clusters: list[int]  # decided before any change: the targets' and corrected images' clusters
    clusters_rebuilt: list[ClusterRebuilt]
    clusters_untouched: int
    data: DataVersions
    code: CodeInfo
    environment: dict
    seconds: dict[str, float]
    accuracy: BeforeAfter
    stages_run: list[str]
    purge: dict
    verification: dict
    served_prompts: dict[str, str] = {}  # cluster -> sha256 of the prompt it serves after this batch
    outside_change: OutsideChange | None = None  # the serving path changed since the previous record
    salt_fingerprint: str | None = None  # of the salt every keyed hash here was made with (lmeraser/salt.py)
    forgetting_audit: dict | None = None  # the per-request reference audit (lmeraser/audit/forgetting.py)


class InfluencePredicate(_Schema):
    """An influence update: approximate, served at once; the exact batch stays queued."""

    batch_id: str
    method: Literal["influence"] = "influence"
    recorded_at: str
    approximate: Literal[True] = True
    exact_rebuild: str = (
        "queued: the next exact batch changes the data, rebuilds these clusters and supersedes this record"
    )
    signer: str = ""
    requests: list[RequestSummary]
    clusters_edited: list[dict]  # per cluster: prompt hashes, damping, CG residual, losses, timings
    influence: dict  # the influence settings used
    data: dict[str, str | None]  # data.dvc md5 (unchanged by an influence update)
    code: CodeInfo
    environment: dict
    seconds: dict[str, float]
    forgetting_audit: dict | None = None  # the update's measured residue (lmeraser/audit/forgetting.py)


def record_schema() -> dict:
    """The JSON Schema of a lineage record's predicate (the `predicate` of the in-toto Statement
    in each DSSE envelope of audit/lineage.jsonl), generated from the models above; kept as
    docs/record-schema.json (`lmeraser audit schema`; a test checks it is current)."""
    from pydantic.json_schema import models_json_schema

    from lmeraser.lineage.dsse import PREDICATE_TYPE, STATEMENT_TYPE

    _, schema = models_json_schema(
        [(ExactPredicate, "serialization"), (InfluencePredicate, "serialization")], ref_template="#/$defs/{model}"
    )
    chained = {  # what the log adds to every predicate it signs (lmeraser/lineage/log.py)
        "sequence": {"type": "integer", "minimum": 1, "description": "the record's number in the log, from 1"},
        "previous_record_sha256": {
            "type": "string",
            "description": "sha256 of the previous line of the log (64 zeros for the first)",
        },
        "anchored": {"type": "boolean"},
    }
    for name in ("ExactPredicate", "InfluencePredicate"):
        schema["$defs"][name]["properties"].update(chained)
        schema["$defs"][name]["required"] = [*schema["$defs"][name]["required"], *chained]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": PREDICATE_TYPE,
        "title": "lmeraser lineage record predicate",
        "description": (
            f"The predicate of an in-toto Statement ({STATEMENT_TYPE}, predicateType {PREDICATE_TYPE}) "
            "signed in a DSSE envelope, one envelope per line of audit/lineage.jsonl: "
            "an exact batch or an influence update, plus the log's chain fields. Key rotations "
            "(predicateType .../key-rotation/v1) and the signed head are described in docs/auditing.md."
        ),
        "oneOf": [{"$ref": "#/$defs/ExactPredicate"}, {"$ref": "#/$defs/InfluencePredicate"}],
        "$defs": schema["$defs"],
    }


def environment(kind: str, ws: Workspace, threads: int) -> dict:
    """The software and machine a record's computation ran on (what replay compares): `threads`,
    the device, its name and the precision the workspace's backbone records, and the numerics
    this process runs (the numerics asked for, the pins in effect, the numeric fingerprint)."""
    from lmeraser.compute import Compute
    from lmeraser.fingerprint import identity, software
    from lmeraser.numerics import cpu_name

    return {
        **software(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "training_code": code_version(kind),
        "threads": threads,
        **identity(Compute.of(ws.backbone_meta())),
    }


def code_info(ws: Workspace, params) -> CodeInfo:
    return CodeInfo(
        git_commit=git_commit(ws.root), params_sha256=sha256_json(params.model_dump(mode="json")), seed=params.seed
    )


def served_prompts(ws: Workspace) -> dict[str, str]:
    """cluster -> sha256 of the prompt it serves (its influence overlay, if any, else exact)."""
    return {c: sha256 for c, (_, sha256) in Overlay(ws).served(ws.prompt_index_or_empty()).items()}


def deployed_subjects(ws: Workspace) -> dict[str, str]:
    """The serving artifacts a record vouches for (in-toto subjects): name -> sha256."""
    subjects = {
        ws.relative(path): sha256_file(path) for path in (ws.backbone_weights, ws.prototypes_file, ws.prompt_index_file)
    }
    overlay = Overlay(ws)
    subjects.update(dict(overlay.served(ws.prompt_index_or_empty()).values()))
    # The influence overlay and the suppression list: the hash chain covers them too.
    for path in (overlay.path, ws.suppression_file):
        if path.exists():
            subjects[ws.relative(path)] = sha256_file(path)
    return subjects


def lineage_log(ws: Workspace) -> LineageLog:
    return LineageLog(ws.lineage_file)


def signing_key(ws: Workspace) -> Ed25519PrivateKey:
    """The key that signs this workspace's records, checked against the pinned signer (and pinned
    if it is the first). A key is created only for a workspace's first record, and never where
    $LMERASER_SIGNING_KEY_FILE names one: a new key in place of a lost one would leave a log that
    verifies with neither."""
    log, pinned = lineage_log(ws), ws.signer_file
    create = not (os.path.lexists(log.path) or os.path.lexists(pinned) or ws.signing_key_configured)
    key = load_or_create_key(ws.signing_key_file, create=create)
    if os.path.lexists(pinned):
        expected = key_id(load_public_key(pinned))
        if key_id(key.public_key()) != expected:
            raise LmeraserError(
                f"the signing key ({key_id(key.public_key())}) is not the pinned signer {expected} ({pinned}); "
                "restore that key: records signed by another would not verify."
            )
    else:
        log.verify(key.public_key())  # an unpinned log (written before pinning) must be this key's
        atomic_write_bytes(pinned, public_pem(key))
    return key


def rotate_key(ws: Workspace, new_key: Ed25519PrivateKey | None = None, reason: str = "") -> Record:
    """Hand the signing of this workspace's log over to `new_key` (a fresh one if None) by a signed
    key rotation, the only way the signer may change: a record of the log, signed by the current
    (pinned) key and countersigned by the new one, naming both public keys; then the head is
    signed by the new key, the pinned signer becomes the new public key and (unless the key comes
    from $LMERASER_SIGNING_KEY, which you then update yourself, passing `new_key`) the new private
    key replaces the old one in the key file. Commit audit/ afterwards, as after every record.

    Crash-safe and idempotent: the new private key is staged beside the key file (0600) before
    the log changes, and a call after an interruption finishes the hand-over the log already
    records (and makes no second rotation). Returns the rotation record."""
    log, pinned = lineage_log(ws), ws.signer_file
    staged = ws.signing_key_file.with_name(ws.signing_key_file.name + ".next")
    from_environment = keys.key_from_environment() is not None
    if not os.path.lexists(pinned):
        raise LmeraserError(f"{pinned}: no pinned signer, so nothing to rotate (the first record pins the first key).")
    chain = log.chain(load_public_key(pinned))
    if key_id(chain.current) == key_id(load_public_key(pinned)):
        old = signing_key(ws)
        if new_key is None:
            if from_environment:
                raise LmeraserError(
                    f"the signing key comes from ${keys.KEY_ENV}: pass the new key to rotate to "
                    "(and put it there afterwards)."
                )
            new_key = Ed25519PrivateKey.generate()
        if not from_environment:
            keys.write_private_key(staged, new_key)  # before the log names it: a crash never loses it
        log.rotate(old, new_key, {"recorded_at": utc(), "reason": shown(reason, 500)})
        chain = log.chain(new_key.public_key())
    record = next(r for r in reversed(chain.records) if r.is_rotation)
    # The log hands over to chain.current: the pin and the key file follow.
    if not from_environment:
        try:
            pending = keys.parse_private_key(
                read_trusted(staged, "staged signing key", keys.MAX_KEY_FILE, secret=True), str(staged)
            )
        except MissingFile:
            pending = None
        if pending is not None and key_id(pending.public_key()) == key_id(chain.current):
            os.replace(staged, ws.signing_key_file)
        elif key_id(load_or_create_key(ws.signing_key_file, create=False).public_key()) != key_id(chain.current):
            raise LmeraserError(
                f"{log.path} record {record.number} rotated the signer to {key_id(chain.current)}, "
                f"but neither {ws.signing_key_file} nor {staged} holds that key; restore it."
            )
    atomic_write_bytes(pinned, public_pem(chain.current))
    return record


def sign_and_append(ws: Workspace, predicate: ExactPredicate | InfluencePredicate) -> Record:
    """Sign the predicate over the deployed artifacts with the workspace's key and append it."""
    key = signing_key(ws)
    signed = predicate.model_copy(update={"signer": key_id(key.public_key())})
    record = lineage_log(ws).append(deployed_subjects(ws), signed.model_dump(mode="json"), key)
    # The exact prompts this record vouches for stay in the store whatever later train runs do.
    atomic_write_json(
        ws.pins_file,
        {"record": record.number, "keys": sorted(e.key for e in ws.prompt_index_or_empty().clusters.values())},
    )
    return record


def summary_row(record: Record) -> dict[str, str]:
    """One row of `audit show` and of the report's table; influence records leave the exact
    batch's columns empty ("-")."""
    p = record.predicate
    if record.is_rotation:
        return {
            "#": str(record.number),
            "method": "key rotation",
            "batch": "-",
            "requests": "0",
            "clusters changed": "-",
            "untouched": "-",
            "acc before": "-",
            "acc after": "-",
            "scan hits": "-",
            "supersedes": "-",
            "audit": "-",
        }
    if p.get("method") == "influence":
        return {
            "#": str(record.number),
            "method": "influence (approximate)",
            "batch": p["batch_id"],
            "requests": str(len(p["requests"])),
            "clusters changed": ",".join(str(c["cluster"]) for c in p["clusters_edited"]) or "-",
            "untouched": "-",
            "acc before": "-",
            "acc after": "-",
            "scan hits": "-",
            "supersedes": "-",
            "audit": audit_words(p.get("forgetting_audit"), reason=False),
        }
    accuracy = p["accuracy"]
    return {
        "#": str(record.number),
        "method": "exact",
        "batch": p["batch_id"],
        "requests": str(len(p["requests"])),
        "clusters changed": ",".join(str(c["cluster"]) for c in p["clusters_rebuilt"]) or "-",
        "untouched": str(p["clusters_untouched"]),
        "acc before": _fmt(accuracy["before"]),
        "acc after": _fmt(accuracy["after"]),
        "scan hits": str(p["verification"]["scan"]["hits"]),
        "supersedes": ",".join(str(n) for n in p.get("supersedes", [])) or "-",
        "audit": audit_words(p.get("forgetting_audit"), reason=False),
    }


def audit_words(audit: dict | None, reason: bool = True) -> str:
    """A forgetting audit (a record's section) in a few words: its verdict counts ("2 forgotten,
    1 FAIL"), or why there was none (with `reason`), for the CLI's lines and the summary tables."""
    if not audit:
        return "none" if reason else "-"
    if audit.get("status") != "audited":
        return f"{audit.get('status')} ({audit.get('reason')})" if reason else "none"
    return ", ".join(f"{n} {verdict}" for verdict, n in audit.get("verdicts", {}).items() if n) or (
        "no sample" if reason else "-"
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
