"""`audit verify`: every signature, the hash chain, and the deployed artifacts against the latest record."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from lmeraser.errors import LmeraserError
from lmeraser.lineage import keys
from lmeraser.lineage.log import Record
from lmeraser.lineage.records import deployed_subjects, lineage_log
from lmeraser.workspace import Workspace


def public_key(ws: Workspace, pubkey: Path | None = None) -> Ed25519PublicKey:
    """The key to verify with: an exported public key if given, else this workspace's signing key."""
    if pubkey is not None:
        return keys.load_public_key(pubkey)
    import os

    path = ws.signing_key_file
    if not path.exists() and not os.environ.get(keys.KEY_ENV):
        raise LmeraserError(f"{path}: no signing key here; pass --pubkey with the exported public key.")
    return keys.load_or_create_key(path).public_key()


def verified_records(ws: Workspace, key: Ed25519PublicKey) -> list[Record]:
    """Every record, its signature and chain checked; raises naming the first bad record."""
    log = lineage_log(ws)
    records = log.verify(key)
    if not records:
        raise LmeraserError(f"{log.path}: no lineage records.")
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
