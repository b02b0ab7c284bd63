"""`audit verify`: every signature, the hash chain, the signed head, the chain of signers (key
rotations), the pinned signer and its git history, the journal against the log (no rollback), and
the deployed artifacts against the latest record. Each failed check is one sentence naming it."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from lmeraser.errors import LmeraserError, shown
from lmeraser.io import MissingFile, read_trusted
from lmeraser.journal import Journal
from lmeraser.lineage import keys
from lmeraser.lineage.log import MAX_HEAD, Chain, Record
from lmeraser.lineage.records import deployed_subjects, lineage_log
from lmeraser.versioning import child_env
from lmeraser.workspace import Workspace

MAX_VERSIONS = 10_000  # committed versions of one audit file read back (newest first)


def _pinned_bytes(ws: Workspace) -> bytes | None:
    """The pinned signer's bytes, read as a trust anchor; None if there is none."""
    try:
        return read_trusted(ws.signer_file, "pinned signer", keys.MAX_KEY_FILE)
    except MissingFile:
        return None


def public_key(ws: Workspace, pubkey: Path | None = None) -> Ed25519PublicKey:
    """The key to verify with: the one an auditor was handed (`--pubkey`), else the pinned signer
    (audit/lineage-public-key.pem: a regular file, never read through a link) as committed. Never
    the private key beside the log: whoever can rewrite the log could re-sign it with a key of
    their own. A pin that differs from its committed version is accepted only when the log hands
    over from the committed key to it by signed key rotations (a rotation not yet committed).

    Args:
        ws: the workspace whose pinned signer (and its git history) is read.
        pubkey: a public key file an auditor was handed (`--pubkey`), read even through a link; None: the pinned signer.
    """
    if pubkey is not None:
        return keys.load_public_key(pubkey, follow_links=True)
    pinned = ws.signer_file
    raw = _pinned_bytes(ws)
    if raw is None:
        raise LmeraserError(f"{pinned}: no pinned signer; pass --pubkey with the public key you were given.")
    key = keys.parse_public_key(raw, str(pinned))
    committed = _committed_versions(ws, pinned, limit=1)
    if committed and committed[0][1] != raw:
        rotated = False
        try:
            old = keys.parse_public_key(committed[0][1], f"{pinned} (committed)")
            rotated = keys.key_id(lineage_log(ws).chain(old).current) == keys.key_id(key)
        except LmeraserError:
            pass
        if not rotated:
            raise LmeraserError(
                f"{pinned}: differs from the committed version; the signer was replaced "
                "(verify with --pubkey and the key you were given)."
            )
    return key


def verified_records(ws: Workspace, key: Ed25519PublicKey) -> list[Record]:
    """Every record, its signature, chain and signer checked, and the log checked against the
    pinned signer, the git history of the pin and of the head, and the journal; raises naming the
    first failed check (and the record, where there is one).

    Args:
        ws: the workspace whose audit/ log, pinned signer, git history and journal are checked.
        key: the public key the log must be signed by (the pinned signer, or the auditor's copy).
    """
    log = lineage_log(ws)
    chain = log.chain(key)
    if not chain.records:
        raise LmeraserError(f"{log.path}: no lineage records.")
    for record, signer in zip(chain.records, chain.signed_by, strict=True):
        if record.predicate.get("signer", signer) != signer:
            raise LmeraserError(
                f"{log.path} record {record.number}: states signer {shown(record.predicate['signer'])}, not {signer}."
            )
    _check_pin(ws, chain)
    _check_git_history(ws, chain)
    _check_journal(ws, chain.records)
    return chain.records


def verify(ws: Workspace, key: Ed25519PublicKey) -> list[Record]:
    """Verified records whose latest vouches for exactly the artifacts deployed now; where this
    machine holds the salt, it is the one the records' keyed hashes were made with.

    Args:
        ws: the workspace whose audit/ log is verified.
        key: the public key the log must be signed by (the pinned signer, or the auditor's copy).

    Raises:
        LmeraserError: naming the first record, head or artifact that does not verify.
    """
    records = verified_records(ws, key)
    if os.path.lexists(ws.subject_salt_file):
        from lmeraser.salt import salt

        salt(ws, create=False)  # a replaced salt is one sentence, naming the record it differs from
    batches = [r for r in records if not r.is_rotation]
    if not batches:
        raise LmeraserError(f"{lineage_log(ws).path}: no lineage records of a batch (only key rotations).")
    latest = records[-1]  # a rotation repeats the previous record's subjects (checked by the log)
    deployed = deployed_subjects(ws)
    if deployed != latest.subjects:
        differing = sorted(set(deployed.items()) ^ set(latest.subjects.items()))
        raise LmeraserError(
            f"deployed artifacts do not match lineage record {latest.number}: {differing[0][0]} differs."
        )
    return records


# -- the pinned signer ----------------------------------------------------------------------------


def _check_pin(ws: Workspace, chain: Chain) -> None:
    """The pinned signer is the log's current signer: any other change of signer than a signed
    key rotation fails."""
    raw = _pinned_bytes(ws)
    if raw is None:
        return  # verifying with --pubkey in a workspace that never pinned (written before pinning)
    pinned = keys.key_id(keys.parse_public_key(raw, str(ws.signer_file)))
    current = keys.key_id(chain.current)
    if pinned != current:
        raise LmeraserError(
            f"{ws.signer_file}: the pinned signer is {pinned}, but the log's signer is {current}; "
            "the signer changes only by a key rotation signed in the log (rotate_key)."
        )


def _check_git_history(ws: Workspace, chain: Chain) -> None:
    """Every committed version of the pinned signer is one of the log's signers (a key committed
    in place of another, with the log re-signed by it, fails), and no committed head listed more
    records than the log holds (a log rolled back to an earlier commit, head and all, fails)."""
    signer, head = ws.signer_file, lineage_log(ws).head_path
    heads = _committed_versions(ws, head)
    pins = _committed_versions(ws, signer)
    if heads and not pins:
        raise LmeraserError(
            f"{signer}: not committed, though the signed head is (commit {heads[0][0][:12]}); "
            "commit the pinned signer with the log (an uncommitted signer cannot be checked)."
        )
    for commit, raw in pins:
        try:
            committed = keys.key_id(keys.parse_public_key(raw, str(signer)))
        except LmeraserError:
            raise LmeraserError(
                f"{signer}: the version of commit {commit[:12]} is not a PEM public key "
                "(the pinned signer was replaced)."
            ) from None
        if committed not in chain.signers:
            raise LmeraserError(
                f"{signer}: commit {commit[:12]} pinned the signer {committed}, which is none of the log's signers "
                f"({', '.join(chain.signers)}): the signer was replaced, not rotated by a signed key rotation."
            )
    held = len(chain.records)
    for commit, raw in heads:
        seen = _head_records(raw)
        if seen is not None and seen > held:
            raise LmeraserError(
                f"{lineage_log(ws).path}: holds {held} record(s), but the signed head committed in {commit[:12]} "
                f"listed {seen}; the log was rolled back to an earlier version."
            )


def _head_records(raw: bytes) -> int | None:
    try:
        records = json.loads(base64.b64decode(json.loads(raw)["payload"]))["predicate"]["records"]
        return records if isinstance(records, int) and not isinstance(records, bool) else None
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError):
        return None


def _git(ws: Workspace, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(
            ["git", *args], cwd=ws.root, input=stdin, capture_output=True, env=child_env(), timeout=120
        )
    except (OSError, subprocess.TimeoutExpired):
        return None


def _committed_versions(ws: Workspace, path: Path, limit: int = MAX_VERSIONS) -> list[tuple[str, bytes]]:
    """(commit, bytes) of every committed version of `path` (a file of the workspace, named as it
    is, never resolved through links), newest first; [] when the workspace is no git work tree or
    the file was never committed."""
    inside = _git(ws, "rev-parse", "--is-inside-work-tree", "--show-prefix")
    if inside is None or inside.returncode != 0:
        return []
    prefix = inside.stdout.decode(errors="replace").splitlines()[1:2]
    name = os.path.relpath(os.path.abspath(path), os.path.abspath(ws.root))
    if name.startswith(".."):
        return []
    full = (prefix[0] if prefix else "") + name
    done = _git(ws, "log", f"--max-count={limit}", "--format=%H", "--", name)
    if done is None or done.returncode != 0:
        return []
    commits = done.stdout.decode().split()
    if not commits:
        return []
    blobs = _git(ws, "cat-file", "--batch", stdin=b"".join(f"{c}:{full}\n".encode() for c in commits))
    if blobs is None or blobs.returncode != 0:
        return []
    out, data, at = [], blobs.stdout, 0
    for commit in commits:
        end = data.index(b"\n", at)
        header = data[at:end].split()
        at = end + 1
        if len(header) != 3:  # "<name> missing": the commit deleted the file
            continue
        size = int(header[2])
        if header[1] == b"blob" and size <= MAX_HEAD:
            out.append((commit, data[at : at + size]))
        at += size + 1
    return out


# -- the journal ----------------------------------------------------------------------------------


def _check_journal(ws: Workspace, records: list[Record]) -> None:
    """Every record the journal names (the `verified` and `approximated` events carry it) exists
    and lists that request: a log rolled back or replaced under a journal that saw later records
    fails."""
    path = ws.journal_file
    # Read and checked as every command reads it (lmeraser/journal.py): the same journal is
    # refused, or accepted, by `audit verify` and by `lmeraser requests` alike.
    for number, event in enumerate(Journal(ws).events(), start=1):
        if event.get("record") is None:
            continue
        named, request = event["record"], shown(event["request_id"], 80)
        if named > len(records):
            raise LmeraserError(
                f"{path} line {number}: request {request} was {shown(event.get('state'), 20)} by lineage "
                f"record {named}, but the log holds {len(records)} record(s); the log was rolled back or truncated."
            )
        listed = {r.get("request_id") for r in records[named - 1].predicate.get("requests", []) if isinstance(r, dict)}
        if event.get("request_id") not in listed:
            raise LmeraserError(
                f"{path} line {number}: request {request} was {shown(event.get('state'), 20)} by lineage "
                f"record {named}, which does not list it; the log was replaced."
            )
