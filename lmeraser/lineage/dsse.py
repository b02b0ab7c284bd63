"""DSSE (Dead Simple Signing Envelope) v1 around in-toto Statements.

The signature covers PAE(payloadType, payload), exactly as the DSSE spec defines it, so the
envelopes verify with any DSSE/in-toto tool given the exported public key.
"""

from __future__ import annotations

import json

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from lmeraser.io import canonical_json
from lmeraser.lineage.keys import b64, key_id, unb64

IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://github.com/lmeraser/lmeraser/unlearning-batch/v1"


def pae(payload_type: str, payload: bytes) -> bytes:
    """Pre-Authentication Encoding: 'DSSEv1 <len(type)> <type> <len(body)> <body>'."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def statement(subjects: dict[str, str], predicate: dict, predicate_type: str = PREDICATE_TYPE) -> dict:
    """An in-toto v1 Statement; `subjects` maps artifact name -> sha256 hex digest."""
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": digest}} for name, digest in sorted(subjects.items())],
        "predicateType": predicate_type,
        "predicate": predicate,
    }


def sign(stmt: dict, key: Ed25519PrivateKey, *more: Ed25519PrivateKey) -> dict:
    """The DSSE envelope of `stmt` signed by `key` (and by each of `more`: a key rotation carries
    the old key's signature and the new key's countersignature over the same payload)."""
    payload = canonical_json(stmt)
    message = pae(IN_TOTO_PAYLOAD_TYPE, payload)
    return {
        "payloadType": IN_TOTO_PAYLOAD_TYPE,
        "payload": b64(payload),
        "signatures": [{"keyid": key_id(k.public_key()), "sig": b64(k.sign(message))} for k in (key, *more)],
    }


def open_envelope(envelope: dict, public_key: Ed25519PublicKey) -> dict:
    """Verify the envelope's signature with `public_key` and return its Statement.

    Raises ValueError with the reason if the envelope is malformed or no signature verifies.
    """
    try:
        payload_type, payload = envelope["payloadType"], unb64(envelope["payload"])
        signatures = envelope["signatures"]
    except (KeyError, TypeError, AttributeError, ValueError) as error:  # binascii.Error is a ValueError
        raise ValueError(f"malformed envelope ({error.__class__.__name__})") from None
    if payload_type != IN_TOTO_PAYLOAD_TYPE:
        raise ValueError(f"unexpected payloadType {str(payload_type)[:80]!r}")
    if not isinstance(signatures, list):
        raise ValueError("malformed envelope (signatures is not a list)")
    wanted = key_id(public_key)
    message = pae(payload_type, payload)
    for entry in signatures:
        if not isinstance(entry, dict) or entry.get("keyid") != wanted:
            continue
        try:
            public_key.verify(unb64(entry["sig"]), message)
        except (InvalidSignature, KeyError, TypeError, AttributeError, ValueError):
            raise ValueError("signature does not verify") from None
        try:
            stmt = json.loads(payload)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError("payload is not JSON") from None
        if (
            not isinstance(stmt, dict)
            or stmt.get("_type") != STATEMENT_TYPE
            or not isinstance(stmt.get("predicate"), dict)
        ):
            raise ValueError("payload is not an in-toto v1 Statement")
        return stmt
    raise ValueError(f"no signature by key {wanted}")
