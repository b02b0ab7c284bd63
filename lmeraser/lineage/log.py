"""The append-only, hash-chained, anchored lineage log `audit/lineage.jsonl`.

One DSSE envelope per line. Each Statement's predicate holds its sequence number and the sha256
of the previous line's bytes, so editing any byte, removing a record or reordering records
breaks verification at a named record. The chain alone cannot show that trailing records were
removed, so every append also re-signs the log's head (`lineage.head.json`: the record count and
the last line's hash). Records written with a head say so (`anchored`), so deleting the head is
caught too; a log that does not verify is never extended, so a record number is never reused.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from lmeraser.errors import LmeraserError
from lmeraser.io import atomic_write_bytes, canonical_json
from lmeraser.lineage.dsse import open_envelope, sign, statement
from lmeraser.lineage.keys import key_id

GENESIS = "0" * 64
HEAD_TYPE = "https://github.com/lmeraser/lmeraser/lineage-head/v1"


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


@dataclass(frozen=True)
class Head:
    records: int
    last_record_sha256: str


class LineageLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.stem + ".head.json")

    def _lines(self) -> list[bytes]:
        if not self.path.exists():
            return []
        if not self.path.is_file():
            raise LmeraserError(f"{self.path}: not a regular file.")
        raw = self.path.read_bytes()
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

        The whole log is verified first: a damaged or truncated log is never extended."""
        self.verify(key.public_key())
        lines = self._lines()
        previous = hashlib.sha256(lines[-1]).hexdigest() if lines else GENESIS
        body = {**predicate, "sequence": len(lines) + 1, "previous_record_sha256": previous, "anchored": True}
        stmt = statement(subjects, body)
        line = canonical_json(sign(stmt, key))
        atomic_write_bytes(self.path, b"".join(existing + b"\n" for existing in [*lines, line]))
        # Killed here, the log holds one validly signed record past its head: verify accepts it
        # (only the key's holder can sign one) and the next append re-anchors.
        record = Record(len(lines) + 1, hashlib.sha256(line).hexdigest(), stmt)
        self._write_head(Head(record.number, record.line_sha256), key)
        return record

    def _write_head(self, head: Head, key: Ed25519PrivateKey) -> None:
        stmt = statement(
            {self.path.name: head.last_record_sha256},
            {"records": head.records, "last_record_sha256": head.last_record_sha256, "signer": key_id(key.public_key())},
            HEAD_TYPE,
        )
        atomic_write_bytes(self.head_path, canonical_json(sign(stmt, key)) + b"\n")

    def head(self, public_key: Ed25519PublicKey) -> Head | None:
        """The signed head, checked; None if there is none."""
        if not self.head_path.exists():
            return None
        where = f"{self.head_path}"
        try:
            stmt = open_envelope(json.loads(self.head_path.read_bytes()), public_key)
            predicate = stmt["predicate"]
            if stmt.get("predicateType") != HEAD_TYPE:
                raise ValueError("not a lineage head")
            head = Head(int(predicate["records"]), str(predicate["last_record_sha256"]))
        except (ValueError, RecursionError, KeyError, TypeError) as error:  # JSON errors are ValueErrors
            raise LmeraserError(f"{where}: {_reason(error)} (the signed head was altered or signed by another key).") from None
        return head

    def verify(self, public_key: Ed25519PublicKey) -> list[Record]:
        """Check every signature, the chain and the signed head; raise LmeraserError naming the
        first bad record. Any byte-level damage is named, never raised as another error."""
        records, previous = [], GENESIS
        for number, line in enumerate(self._lines(), start=1):
            stmt = _open(line, public_key, f"{self.path} record {number}")
            where = f"{self.path} record {number}"
            predicate = stmt["predicate"]
            if predicate.get("sequence") != number:
                raise LmeraserError(
                    f"{where}: sequence number is {str(predicate.get('sequence'))[:20]}, expected {number} (records were removed or reordered)."
                )
            if predicate.get("previous_record_sha256") != previous:
                raise LmeraserError(f"{where}: previous-record hash does not match record {number - 1} (records were removed, reordered or altered).")
            if not isinstance(stmt.get("subject"), list) or not all(_is_subject(s) for s in stmt["subject"]):
                raise LmeraserError(f"{where}: malformed subjects (the record was altered).")
            previous = hashlib.sha256(line).hexdigest()
            records.append(Record(number, previous, stmt))
        head = self.head(public_key)
        if head is None:
            anchored = [r.number for r in records if r.predicate.get("anchored")]
            if anchored:
                raise LmeraserError(
                    f"{self.head_path}: the signed head is missing, though record {anchored[0]} was anchored to it "
                    "(it was deleted: removed trailing records could not be detected)."
                )
            return records
        if len(records) < head.records:
            raise LmeraserError(
                f"{self.path}: {head.records - len(records)} trailing record(s) were removed: the signed head lists "
                f"{head.records} record(s), the log holds {len(records)}."
            )
        if head.records < 1 or records[head.records - 1].line_sha256 != head.last_record_sha256:
            raise LmeraserError(f"{self.path} record {head.records}: does not match the signed head (records were replaced).")
        return records

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


def _is_subject(subject) -> bool:
    return isinstance(subject, dict) and isinstance(subject.get("name"), str) and isinstance(subject.get("digest"), dict) and "sha256" in subject["digest"]


def _reason(error: BaseException) -> str:
    if isinstance(error, UnicodeDecodeError):
        return "not UTF-8"
    if isinstance(error, json.JSONDecodeError):
        return "not valid JSON"
    return f"malformed ({error.__class__.__name__})"
