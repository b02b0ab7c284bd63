"""`audit verify`: every signature, the hash chain, the signed head, the pinned signer, and the
deployed artifacts against the latest record."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from lmeraser.errors import LmeraserError
from lmeraser.lineage import keys
from lmeraser.lineage.log import Record
from lmeraser.lineage.records import deployed_subjects, lineage_log
from lmeraser.versioning import committed_bytes
from lmeraser.workspace import Workspace


def public_key(ws: Workspace, pubkey: Path | None = None) -> Ed25519PublicKey:
    """The key to verify with: the one an auditor was handed (`--pubkey`), else the pinned signer
    (audit/lineage-public-key.pem) as committed. Never the private key beside the log: whoever can
    rewrite the log could re-sign it with a key of their own."""
    pinned = ws.signer_file
    if pubkey is not None:
        given = keys.load_public_key(pubkey)
        expected = keys.key_id(keys.load_public_key(pinned)) if pinned.exists() else keys.key_id(given)
        if expected != keys.key_id(given):
            raise LmeraserError(f"{pinned}: the pinned signer is {expected}, not the key in {pubkey} ({keys.key_id(given)}).")
        return given
    if not pinned.exists():
        raise LmeraserError(f"{pinned}: no pinned signer; pass --pubkey with the public key you were given.")
    committed = committed_bytes(ws.root, pinned)
    if committed is not None and committed != pinned.read_bytes():
        raise LmeraserError(f"{pinned}: differs from the committed version; the signer was replaced (verify with --pubkey and the key you were given).")
    return keys.load_public_key(pinned)


def verified_records(ws: Workspace, key: Ed25519PublicKey) -> list[Record]:
    """Every record, its signature, chain and signer checked; raises naming the first bad record."""
    log = lineage_log(ws)
    records = log.verify(key)
    if not records:
        raise LmeraserError(f"{log.path}: no lineage records.")
    expected = keys.key_id(key)
    for record in records:
        if record.predicate.get("signer", expected) != expected:
            raise LmeraserError(f"{log.path} record {record.number}: states signer {str(record.predicate['signer'])[:80]}, not {expected}.")
    return records


def verify(ws: Workspace, key: Ed25519PublicKey) -> list[Record]:
    """Verified records whose latest vouches for exactly the artifacts deployed now."""
    records = verified_records(ws, key)
    latest = records[-1]
    deployed = deployed_subjects(ws)
    if deployed != latest.subjects:
        differing = sorted(set(deployed.items()) ^ set(latest.subjects.items()))
        raise LmeraserError(f"deployed artifacts do not match lineage record {latest.number}: {differing[0][0]} differs.")
    return records
