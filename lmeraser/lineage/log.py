"""The append-only, hash-chained, anchored lineage log `audit/lineage.jsonl`.

One DSSE envelope per line. Each Statement's predicate holds its sequence number and the sha256
of the previous line's bytes, so editing any byte, removing a record or reordering records
breaks verification at a named record. The chain alone cannot show that trailing records were
removed, so every append also re-signs the log's head (`lineage.head.json`: the record count and
the last line's hash). Records written with a head say so (`anchored`), so deleting the head is
caught too; a log that does not verify is never extended, so a record number is never reused.

The signer changes only by a key rotation, itself a record of the log (predicate type
ROTATION_TYPE): signed by the old key and countersigned by the new one, it names both public
keys, and every later record and head must be signed by the new key. Verifying walks the chain of
signers from the first; the key it is given (the pinned signer or an auditor's copy) must be one
of them, and the head must be signed by the signer current at the record it lists, so nothing
signed with any other key, or with a retired one after its rotation, verifies.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from lmeraser.errors import LmeraserError
from lmeraser.io import MissingFile, atomic_write_bytes, canonical_json, read_trusted
from lmeraser.lineage.dsse import open_envelope, sign, statement
from lmeraser.lineage.keys import key_id, parse_public_key, public_pem

GENESIS = "0" * 64
HEAD_TYPE = "https://github.com/lmeraser/lmeraser/lineage-head/v1"
ROTATION_TYPE = "https://github.com/lmeraser/lmeraser/key-rotation/v1"
ROTATION_METHOD = "key-rotation"
MAX_HEAD = 64 << 10  # a signed head is under 1 KiB
MAX_LOG = 1 << 30


@dataclass(frozen=True)
class Record:
    number: int  # 1-based position in the log
    line_sha256: str
    statement: dict

    @property
    def predicate(self) -> dict:
        return self.statement["predicate"]

    @property
    def subjects(self) -> dict[str, str]:
        return {s["name"]: s["digest"]["sha256"] for s in self.statement["subject"]}

    @property
    def is_rotation(self) -> bool:
        """A key rotation (no erasure): the old signer hands over to `predicate["new_signer"]`."""
        return self.statement.get("predicateType") == ROTATION_TYPE


@dataclass(frozen=True)
class Head:
    records: int
    last_record_sha256: str


@dataclass(frozen=True)
class Chain:
    """A verified log: its records, every signer in order (the first signer first, then each key
    a rotation handed over to) and the signer of the next record."""

    records: list[Record]
    signers: list[str]
    current: Ed25519PublicKey
    head: Head | None
    signed_by: list[str]  # per record, the key id whose signature verified it


class LineageLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.stem + ".head.json")

    def _lines(self) -> list[bytes]:
        try:
            raw = read_trusted(self.path, "lineage log", MAX_LOG)
        except MissingFile:
            return []
        *lines, tail = raw.split(b"\n")
        # Written whole and atomically, one record per line: any other shape is damage.
        if tail:
            raise LmeraserError(f"{self.path} record {len(lines) + 1}: no final newline (the file was altered).")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                raise LmeraserError(f"{self.path} record {number}: an empty line (the file was altered).")
        return lines

    def envelope(self, number: int) -> bytes:
        """Record `number`'s DSSE envelope exactly as stored (one JSON line, not verified)."""
        lines = self._lines()
        if not 1 <= number <= len(lines):
            raise LmeraserError(f"record {number} does not exist (the log has {len(lines)}).")
        return lines[number - 1]

    def append(self, subjects: dict[str, str], predicate: dict, key: Ed25519PrivateKey) -> Record:
        """Sign and append a record chained to the current last line, then re-sign the head.

        The whole log is verified first: a damaged or truncated log is never extended, and only
        its current signer (after every rotation) may extend it."""
        self._current_signer(key)
        return self._append(subjects, predicate, key, (), None)

    def rotate(self, old: Ed25519PrivateKey, new: Ed25519PrivateKey, details: dict) -> Record:
        """Append a key rotation: a record signed by the current signer `old` and countersigned by
        `new`, naming both public keys; the head is then signed by `new`, and so must every later
        record be. Its subjects repeat the previous record's (a rotation changes no artifact)."""
        chain = self._current_signer(old)
        if key_id(new.public_key()) in chain.signers:
            raise LmeraserError(
                f"{self.path}: the new key {key_id(new.public_key())} already signed this log; "
                "rotate to a key never used before."
            )
        predicate = {
            "method": ROTATION_METHOD,
            **details,
            "old_signer": key_id(old.public_key()),
            "new_signer": key_id(new.public_key()),
            "old_public_key": public_pem(old).decode(),
            "new_public_key": public_pem(new).decode(),
            "signer": key_id(old.public_key()),
        }
        subjects = chain.records[-1].subjects if chain.records else {}
        return self._append(subjects, predicate, old, (new,), ROTATION_TYPE)

    def _current_signer(self, key: Ed25519PrivateKey) -> Chain:
        chain = self.chain(key.public_key())
        if key_id(chain.current) != key_id(key.public_key()):
            raise LmeraserError(
                f"{self.path}: the key {key_id(key.public_key())} was retired by a key rotation; "
                f"the log's signer is now {key_id(chain.current)} (finish an interrupted rotation with rotate_key)."
            )
        return chain

    def _append(
        self, subjects: dict[str, str], predicate: dict, key: Ed25519PrivateKey, more: tuple, predicate_type: str | None
    ) -> Record:
        lines = self._lines()
        previous = hashlib.sha256(lines[-1]).hexdigest() if lines else GENESIS
        body = {**predicate, "sequence": len(lines) + 1, "previous_record_sha256": previous, "anchored": True}
        stmt = statement(subjects, body) if predicate_type is None else statement(subjects, body, predicate_type)
        line = canonical_json(sign(stmt, key, *more))
        atomic_write_bytes(self.path, b"".join(existing + b"\n" for existing in [*lines, line]))
        # Killed here, the log holds one validly signed record past its head: verify accepts it
        # (only the key's holder can sign one) and the next append re-anchors.
        record = Record(len(lines) + 1, hashlib.sha256(line).hexdigest(), stmt)
        self._write_head(Head(record.number, record.line_sha256), more[-1] if more else key)
        return record

    def _write_head(self, head: Head, key: Ed25519PrivateKey) -> None:
        stmt = statement(
            {self.path.name: head.last_record_sha256},
            {
                "records": head.records,
                "last_record_sha256": head.last_record_sha256,
                "signer": key_id(key.public_key()),
            },
            HEAD_TYPE,
        )
        atomic_write_bytes(self.head_path, canonical_json(sign(stmt, key)) + b"\n")

    def _head_envelope(self) -> dict | None:
        """The head's envelope, read as a trust anchor (a regular file of at most 64 KiB, never
        through a link, never blocking); None if there is none."""
        where = f"{self.head_path}"
        try:
            raw = read_trusted(self.head_path, "signed head", MAX_HEAD)
        except MissingFile:
            return None
        try:
            envelope = json.loads(raw)
            if not isinstance(envelope, dict):
                raise TypeError
        except (ValueError, RecursionError, TypeError) as error:
            raise LmeraserError(f"{where}: {_reason(error)} (the signed head was altered).") from None
        return envelope

    def head(self, public_key: Ed25519PublicKey) -> Head | None:
        """The signed head, checked against `public_key`; None if there is none."""
        envelope = self._head_envelope()
        return None if envelope is None else self._open_head(envelope, public_key)

    def _open_head(self, envelope: dict, public_key: Ed25519PublicKey) -> Head:
        try:
            stmt = open_envelope(envelope, public_key)
            predicate = stmt["predicate"]
            if stmt.get("predicateType") != HEAD_TYPE:
                raise ValueError("not a lineage head")
            head = Head(int(predicate["records"]), str(predicate["last_record_sha256"]))
            if predicate.get("signer", key_id(public_key)) != key_id(public_key):
                raise ValueError("its stated signer is not the key that signed it")
        except (ValueError, RecursionError, KeyError, TypeError) as error:  # JSON errors are ValueErrors
            raise LmeraserError(
                f"{self.head_path}: {_reason(error)} (the signed head was altered or signed by another key)."
            ) from None
        return head

    def verify(self, public_key: Ed25519PublicKey) -> list[Record]:
        """Check every signature, the chain of records and of signers, and the signed head; raise
        LmeraserError naming the first bad record. `public_key` must be one of the log's signers."""
        return self.chain(public_key).records

    def chain(self, trusted: Ed25519PublicKey) -> Chain:
        """The verified log (see `verify`), with its signers. Any byte-level damage is named,
        never raised as another error."""
        lines = self._lines()
        signer = self._first_signer(lines, trusted)
        signers, after = [key_id(signer)], [signer]  # after[n]: the signer once record n is in
        records, previous, signed_by = [], GENESIS, []
        for number, line in enumerate(lines, start=1):
            where = f"{self.path} record {number}"
            stmt = _open(line, signer, where)
            signed_by.append(key_id(signer))
            predicate = stmt["predicate"]
            if predicate.get("sequence") != number:
                raise LmeraserError(
                    f"{where}: sequence number is {str(predicate.get('sequence'))[:20]}, expected {number} "
                    "(records were removed or reordered)."
                )
            if predicate.get("previous_record_sha256") != previous:
                raise LmeraserError(
                    f"{where}: previous-record hash does not match record {number - 1} "
                    "(records were removed, reordered or altered)."
                )
            if not isinstance(stmt.get("subject"), list) or not all(_is_subject(s) for s in stmt["subject"]):
                raise LmeraserError(f"{where}: malformed subjects (the record was altered).")
            previous = hashlib.sha256(line).hexdigest()
            record = Record(number, previous, stmt)
            if record.is_rotation:
                signer = self._rotated(record, line, signer, records[-1].subjects if records else {}, where)
                signers.append(key_id(signer))
            records.append(record)
            after.append(signer)
        if key_id(trusted) not in signers:
            raise LmeraserError(
                f"{self.path}: the trusted key {key_id(trusted)} is none of the log's signers ({', '.join(signers)}): "
                "the log was re-signed by another key."
            )
        head = self._checked_head(records, after, signers)
        return Chain(records, signers, signer, head, signed_by)

    def _first_signer(self, lines: list[bytes], trusted: Ed25519PublicKey) -> Ed25519PublicKey:
        """The key that signed record 1: the old key the first rotation names, else `trusted`. Taken
        from the log unverified, it is checked by the walk: every record and rotation must verify
        in turn, and `trusted` must be among the signers the walk reaches."""
        for line in lines:
            try:
                stmt = json.loads(base64.b64decode(json.loads(line)["payload"]))
                if stmt.get("predicateType") != ROTATION_TYPE:
                    continue
                return parse_public_key(str(stmt["predicate"]["old_public_key"]).encode(), "")
            except (ValueError, RecursionError, KeyError, TypeError, AttributeError, LmeraserError):
                return trusted  # damage: the walk names the record
        return trusted

    def _rotated(
        self, record: Record, line: bytes, old: Ed25519PublicKey, previous_subjects: dict, where: str
    ) -> Ed25519PublicKey:
        """The new signer a rotation record hands over to, once its every claim is checked."""
        p = record.predicate
        try:
            if p.get("method") != ROTATION_METHOD or p.get("old_signer") != key_id(old):
                raise ValueError("it does not hand over from the log's signer")
            if key_id(parse_public_key(str(p["old_public_key"]).encode(), "")) != key_id(old):
                raise ValueError("its old public key is not the log's signer")
            new = parse_public_key(str(p["new_public_key"]).encode(), "")
            if p.get("new_signer") != key_id(new):
                raise ValueError("its new signer is not its new public key")
            open_envelope(json.loads(line), new)  # the new key's countersignature
        except (ValueError, KeyError, TypeError, LmeraserError) as error:
            raise LmeraserError(
                f"{where}: not a valid key rotation ({error}; the record was altered or forged)."
            ) from None
        if record.subjects != previous_subjects:
            raise LmeraserError(
                f"{where}: a key rotation whose subjects differ from the previous record's "
                "(a rotation changes no artifact)."
            )
        return new

    def _checked_head(self, records: list[Record], after: list[Ed25519PublicKey], signers: list[str]) -> Head | None:
        envelope = self._head_envelope()
        if envelope is None:
            anchored = [r.number for r in records if r.predicate.get("anchored")]
            if anchored:
                raise LmeraserError(
                    f"{self.head_path}: the signed head is missing, though record {anchored[0]} was anchored to it "
                    "(it was deleted: removed trailing records could not be detected)."
                )
            return None
        # The head is signed by the signer current at the record it lists (the rotation's new key
        # once a rotation is in); a head listing more records than the log holds is tried with each.
        claimed = _claimed_records(envelope)
        if claimed is not None and 0 <= claimed < len(after):
            head = self._open_head(envelope, after[claimed])
        else:
            head = None
            for candidate in {key_id(k): k for k in after}.values():
                try:
                    head = self._open_head(envelope, candidate)
                    break
                except LmeraserError:
                    continue
            if head is None:
                self._open_head(envelope, after[-1])  # raises, naming the head
        if len(records) < head.records:
            raise LmeraserError(
                f"{self.path}: {head.records - len(records)} trailing record(s) were removed: the signed head lists "
                f"{head.records} record(s), the log holds {len(records)}."
            )
        if head.records < 1 or records[head.records - 1].line_sha256 != head.last_record_sha256:
            raise LmeraserError(
                f"{self.path} record {head.records}: does not match the signed head (records were replaced)."
            )
        return head

    def read_unverified(self) -> list[Record]:
        """Parse records without checking signatures (for display only); damage is named."""
        out = []
        for number, line in enumerate(self._lines(), start=1):
            where = f"{self.path} record {number}"
            try:
                stmt = json.loads(base64.b64decode(json.loads(line)["payload"]))
                if not isinstance(stmt, dict) or not isinstance(stmt.get("predicate"), dict):
                    raise ValueError("not a Statement")
            except (ValueError, RecursionError, KeyError, TypeError) as error:
                raise LmeraserError(f"{where}: {_reason(error)} (the record was altered).") from None
            out.append(Record(number, hashlib.sha256(line).hexdigest(), stmt))
        return out


def _open(line: bytes, public_key: Ed25519PublicKey, where: str) -> dict:
    try:
        envelope = json.loads(line)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError
        raise LmeraserError(f"{where}: not valid JSON (the record was altered).") from None
    try:
        return open_envelope(envelope, public_key)
    except ValueError as error:
        raise LmeraserError(f"{where}: {error} (the record was altered or signed by another key).") from None


def _claimed_records(envelope: dict) -> int | None:
    """The record count a head's payload states, unverified (to pick the key to verify it with)."""
    try:
        return int(json.loads(base64.b64decode(envelope["payload"]))["predicate"]["records"])
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError):
        return None


def _is_subject(subject) -> bool:
    return (
        isinstance(subject, dict)
        and isinstance(subject.get("name"), str)
        and isinstance(subject.get("digest"), dict)
        and "sha256" in subject["digest"]
    )


def _reason(error: BaseException) -> str:
    if isinstance(error, UnicodeDecodeError):
        return "not UTF-8"
    if isinstance(error, json.JSONDecodeError):
        return "not valid JSON"
    return f"malformed ({error.__class__.__name__})"
