"""The append-only, hash-chained lineage log `audit/lineage.jsonl`.

One DSSE envelope per line. Each Statement's predicate holds its sequence number and the sha256
of the previous line's bytes, so editing any byte, removing a record or reordering records
breaks verification at a named record.
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

GENESIS = "0" * 64


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


class LineageLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _lines(self) -> list[bytes]:
        if not self.path.exists():
            return []
        return [line for line in self.path.read_bytes().split(b"\n") if line.strip()]

    def append(self, subjects: dict[str, str], predicate: dict, key: Ed25519PrivateKey) -> Record:
        """Sign and append a record chained to the current last line (atomic rewrite)."""
        lines = self._lines()
        previous = hashlib.sha256(lines[-1]).hexdigest() if lines else GENESIS
        body = {**predicate, "sequence": len(lines) + 1, "previous_record_sha256": previous}
        stmt = statement(subjects, body)
        line = canonical_json(sign(stmt, key))
        atomic_write_bytes(self.path, b"".join(existing + b"\n" for existing in [*lines, line]))
        return Record(len(lines) + 1, hashlib.sha256(line).hexdigest(), stmt)

    def verify(self, public_key: Ed25519PublicKey) -> list[Record]:
        """Check every signature and the chain; raise LmeraserError naming the first bad record."""
        records, previous = [], GENESIS
        for number, line in enumerate(self._lines(), start=1):
            where = f"{self.path} record {number}"
            try:
                envelope = json.loads(line)
            except json.JSONDecodeError:
                raise LmeraserError(f"{where}: not valid JSON (the record was altered).") from None
            try:
                stmt = open_envelope(envelope, public_key)
            except ValueError as error:
                raise LmeraserError(f"{where}: {error} (the record was altered or signed by another key).") from None
            predicate = stmt.get("predicate", {})
            if predicate.get("sequence") != number:
                raise LmeraserError(f"{where}: sequence number is {predicate.get('sequence')}, expected {number} (records were removed or reordered).")
            if predicate.get("previous_record_sha256") != previous:
                raise LmeraserError(f"{where}: previous-record hash does not match record {number - 1} (records were removed, reordered or altered).")
            previous = hashlib.sha256(line).hexdigest()
            records.append(Record(number, previous, stmt))
        return records

    def read_unverified(self) -> list[Record]:
        """Parse records without checking signatures (for display only)."""
        out = []
        for number, line in enumerate(self._lines(), start=1):
            envelope = json.loads(line)
            out.append(Record(number, hashlib.sha256(line).hexdigest(), json.loads(base64.b64decode(envelope["payload"]))))
        return out
