"""Verify an lmeraser lineage log without lmeraser: the DSSE spec, Ed25519 and the hash chain, in
about sixty lines an auditor can read (only the `cryptography` package and the standard library).

    python docs/examples/verify_lineage.py audit/lineage.jsonl audit/lineage-public-key.pem

Checks, for every line of the log: the envelope's Ed25519 signature by the given key over
PAE(payloadType, payload) (DSSE v1), that the payload is an in-toto v1 Statement, that its
`sequence` is the line's number and that `previous_record_sha256` is the sha256 of the previous
line (so no record was removed, reordered or inserted); then that the signed head names the last
line. A key rotation record (signed by the old key, countersigned by the new) hands the checks
over to the new key. Prints one line per record and exits 1 on the first failure.

What it cannot catch on its own: a log and head rolled back together to an earlier genuine state
(both are validly signed). Compare the record count with the copy you kept, or with the git
history of audit/ (`lmeraser audit verify` does).
"""

import base64
import hashlib
import json
import sys
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
ROTATION_TYPE = "https://github.com/lmeraser/lmeraser/key-rotation/v1"


def pae(payload_type: str, payload: bytes) -> bytes:
    return b"DSSEv1 %d %s %d %s" % (len(payload_type), payload_type.encode(), len(payload), payload)


def key_id(public_key) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()


def open_envelope(envelope: dict, public_key) -> dict:
    """The Statement, if `public_key` signed this envelope; raises otherwise."""
    if envelope["payloadType"] != PAYLOAD_TYPE:
        raise ValueError(f"payloadType {envelope['payloadType']!r}")
    payload = base64.b64decode(envelope["payload"], validate=True)
    mine = [s for s in envelope["signatures"] if s["keyid"] == key_id(public_key)]
    if not mine:
        raise ValueError(f"no signature by {key_id(public_key)}")
    public_key.verify(
        base64.b64decode(mine[0]["sig"], validate=True), pae(PAYLOAD_TYPE, payload)
    )  # InvalidSignature if not
    statement = json.loads(payload)
    if statement.get("_type") != STATEMENT_TYPE:
        raise ValueError("not an in-toto v1 Statement")
    return statement


def verify(log: Path, pem: Path) -> int:
    key = serialization.load_pem_public_key(pem.read_bytes())
    previous = "0" * 64
    raw = log.read_bytes()
    if not raw.endswith(b"\n") or b"\r" in raw:
        print("log: FAILED (every record is one line ending in a single newline; this file is not that)")
        return 1
    lines = raw[:-1].split(b"\n")  # the chain hashes each line's exact bytes, without its newline
    for number, line in enumerate(lines, start=1):
        try:
            statement = open_envelope(json.loads(line), key)
            predicate = statement["predicate"]
            if predicate["sequence"] != number or predicate["previous_record_sha256"] != previous:
                raise ValueError("the hash chain is broken here")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, InvalidSignature) as error:
            print(f"record {number}: FAILED ({error.__class__.__name__}: {error})")
            return 1
        if statement["predicateType"] == ROTATION_TYPE:  # the new key signs from here on
            key = serialization.load_pem_public_key(predicate["new_public_key"].encode())
        method = predicate.get("method", "?")
        print(
            f"record {number}: OK ({method}, batch {predicate.get('batch_id', '-')}, "
            f"{len(predicate.get('requests', []))} request(s))"
        )
        previous = hashlib.sha256(line).hexdigest()
    head = log.with_name(log.stem + ".head.json")
    try:
        named = open_envelope(json.loads(head.read_bytes()), key)["predicate"]
        if named["records"] != len(lines) or named["last_record_sha256"] != previous:
            raise ValueError("the head does not name the last record")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError, InvalidSignature) as error:
        print(f"signed head: FAILED ({error.__class__.__name__}: {error})")
        return 1
    print(f"signed head: OK ({len(lines)} records, all verified)")
    return 0


if __name__ == "__main__":
    sys.exit(verify(Path(sys.argv[1]), Path(sys.argv[2])))
