"""The workspace's secret salt and the keyed hashes made with it.

Published hashes of forgotten images would be a membership oracle: anyone holding a candidate
image could check whether it was in the training data. Everything that outlives an erasure
(tombstones, the suppression list, lineage records, data docs) therefore holds HMAC-SHA256 keys
of content hashes and subject ids: the controller, and an auditor given the salt, can check
them; the public cannot. The salt is created once (0600, 32 bytes) and never enters a log or a
record. It is a trust anchor: read only as a regular file of exactly 32 bytes that no one but
its owner can read, never through a link, never blocking; and once anything was keyed with it (a
lineage record, the suppression list, a tombstone, a journaled subject) a missing salt is an
error, never silently replaced: a new salt would void every keyed hash, so `audit scan` would
miss forgotten data and re-ingestion would bring it back.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import tempfile

from lmeraser.errors import DataError, LmeraserError
from lmeraser.io import MissingFile, canonical_json, read_trusted
from lmeraser.workspace import Workspace

SALT_BYTES = 32
# Keyed subject ids, per salt (by its fingerprint), for the process's life: at most this many
# (about 250 bytes each), then started again.
SUBJECT_MEMO_MAX = 200_000
_SUBJECT_MEMO: dict[str, dict[str, str]] = {}
_SUBJECT_MARK = b'"subject_hashes": ["'  # a journaled request that keyed a subject (json.dumps, sort_keys)


def keyed_evidence(ws: Workspace) -> str | None:
    """What in the workspace was keyed with its salt (so the salt must exist), or None."""
    if _nonempty(ws.lineage_file):
        return "lineage records"
    if os.path.lexists(ws.suppression_file):
        return "the suppression list"
    if _lines(ws.tombstones_file, 2):
        return "tombstones"
    if _contains(ws.journal_file, _SUBJECT_MARK):
        return "journaled subjects"
    return None


def _nonempty(path) -> bool:
    try:
        return os.lstat(path).st_size > 0 or not os.path.isfile(path)
    except FileNotFoundError:
        return False


def _lines(path, wanted: int) -> bool:
    """Whether `path` holds at least `wanted` lines (a header and a row); anything there that is
    not a readable regular file counts as holding them."""
    return _evidence_in(path, lambda handle: handle.read(1 << 20).count(b"\n") >= wanted)


def _contains(path, mark: bytes) -> bool:
    def search(handle) -> bool:
        tail = b""
        while block := handle.read(1 << 20):
            if mark in tail + block:
                return True
            tail = block[-len(mark) :]
        return False

    return _evidence_in(path, search)


def _evidence_in(path, test) -> bool:
    """`test(handle)` on the file at `path`, opened without following a link or blocking; False
    when there is no file, True when something there is not a readable regular file (it may hide
    keyed hashes: the salt must then not be made anew)."""
    if not os.path.lexists(path):
        return False
    try:
        with open(path, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW | os.O_NONBLOCK)) as handle:
            return True if not os.path.isfile(path) else test(handle)
    except OSError:
        return True


def _restore(ws: Workspace, evidence: str) -> DataError:
    return DataError(
        f"{ws.subject_salt_file}: the workspace's secret salt is missing, though {evidence} are keyed with it; "
        "restore it from your secret store "
        "(it is never committed, and a new salt would void every keyed hash of erased data)."
    )


def _read(ws: Workspace) -> bytes:
    """The salt's bytes, checked: a regular 0600 file of exactly SALT_BYTES bytes."""
    path = ws.subject_salt_file
    try:
        data = read_trusted(path, "secret salt", 4096, secret=True)
    except MissingFile:
        raise
    except LmeraserError as error:
        raise DataError(str(error)) from None
    if len(data) != SALT_BYTES:
        raise DataError(
            f"{path}: the secret salt is {len(data)} bytes, not {SALT_BYTES} (it was truncated or replaced); "
            "restore it from your secret store."
        )
    recorded = recorded_fingerprint(ws)
    if recorded is not None and fingerprint(data) != recorded[1]:
        raise DataError(
            f"{path}: not the secret salt lineage record {recorded[0]} was keyed with (its fingerprint differs): "
            "every keyed hash would be wrong and `audit scan` blind; restore the original from your secret store."
        )
    return data


FINGERPRINT_MESSAGE = b"lmeraser salt fingerprint v1"


def fingerprint(value: bytes) -> str:
    """A public fingerprint of a salt: HMAC of a fixed message, which reveals nothing of the salt
    but tells a replaced salt from the one the records were keyed with."""
    return hmac.new(value, FINGERPRINT_MESSAGE, hashlib.sha256).hexdigest()


def recorded_fingerprint(ws: Workspace) -> tuple[int, str] | None:
    """(record number, salt fingerprint) of the latest lineage record that states one, or None.
    Read unverified, from the envelopes' payloads (verifying the log is `audit verify`'s job; the
    data layers that key hashes must not depend on the lineage package), and a line that cannot
    be read names no fingerprint here."""
    if not _nonempty(ws.lineage_file):
        return None
    try:
        lines = read_trusted(ws.lineage_file, "lineage log", 1 << 30).splitlines()
    except LmeraserError:
        return None
    for number in range(len(lines), 0, -1):
        try:
            predicate = json.loads(base64.b64decode(json.loads(lines[number - 1])["payload"]))["predicate"]
        except (ValueError, RecursionError, KeyError, TypeError):
            continue
        if isinstance(predicate, dict) and predicate.get("salt_fingerprint"):
            return number, str(predicate["salt_fingerprint"])
    return None


def check_salt(ws: Workspace) -> bool:
    """For a batch's capture step, before any data changes: True when the salt exists and is
    sound (a regular 0600 file of 32 bytes, not a link); False when it is absent and nothing was
    ever keyed with it (the first keyed hash creates it); otherwise DataError, one sentence."""
    try:
        _read(ws)
    except MissingFile:
        evidence = keyed_evidence(ws)
        if evidence:
            raise _restore(ws, evidence) from None
        return False
    return True


def salt(ws: Workspace, create: bool = True) -> bytes:
    """The workspace's salt; created (0600 from its first byte) only if `create` allows it and
    nothing in the workspace was keyed with a salt before."""
    try:
        return _read(ws)
    except MissingFile:
        pass
    evidence = keyed_evidence(ws)
    if evidence:
        raise _restore(ws, evidence)
    if not create:
        raise DataError(
            f"{ws.subject_salt_file}: the workspace's secret salt is missing, and the keyed hashes of erased data "
            "(suppression list, tombstones, records) mean nothing without it; restore it from your secret store "
            "(it is never committed)."
        )
    _create(ws)
    return _read(ws)


def _create(ws: Workspace) -> None:
    """A new salt, 0600 from its first byte, linked into place only if none is there: two
    processes making the first salt at once end with one (the second reads the first's)."""
    path = ws.subject_salt_file
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)  # 0600
    try:
        os.write(fd, secrets.token_bytes(SALT_BYTES))
        os.fsync(fd)
        os.close(fd)
        fd = -1
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        if fd >= 0:
            os.close(fd)
        os.unlink(tmp)


_SEALED_PREFIX, _SEALED_MAC = b'{"body":', b',"mac":"'  # the byte form Keyer.seal writes


class Keyer:
    """Keyed hashes with one workspace's salt (read once)."""

    def __init__(self, ws: Workspace, create: bool = True):
        self._salt = salt(ws, create)
        # The HMAC state after the salt and the content domain: `content` copies it (keying every
        # row of a split is a scan's and a check's inner loop; a copy costs half a fresh HMAC).
        self._content_mac = hmac.new(self._salt, b"content:", hashlib.sha256)
        self._subject_mac = hmac.new(self._salt, digestmod=hashlib.sha256)
        self._memo = _SUBJECT_MEMO.setdefault(fingerprint(self._salt), {})

    def subject(self, subject_id: str) -> str:
        """HMAC-SHA256 of `subject_id` under the salt. A scan keys every sample id each new file
        names, and every forget rewrites files naming them all (the assignments, the validation
        summary, their DVC copies: 160,000 ids at 30,000 private samples, ~1 s): an id is keyed
        once per process and salt (the same ids recur in every forget's new files), from a copy of
        the keyed state."""
        keyed = self._memo.get(subject_id)
        if keyed is None:
            mac = self._subject_mac.copy()
            mac.update(subject_id.encode())
            keyed = mac.hexdigest()
            if len(self._memo) >= SUBJECT_MEMO_MAX:
                self._memo.clear()
            self._memo[subject_id] = keyed
        return keyed

    def fingerprint(self) -> str:
        return fingerprint(self._salt)

    def seal(self, purpose: str, body: dict) -> bytes:
        """`body` as canonical JSON with an HMAC under the salt for `purpose`: a cache the product
        trusts to skip work (the scan index, the validation summary) cannot be edited unseen."""
        # canonical_json({"body": body, "mac": mac}), with the body serialised once (these caches
        # hold a row per sample: serialising is most of their cost).
        raw_body = canonical_json(body)
        mac = self._mac_of(purpose, raw_body)
        return _SEALED_PREFIX + raw_body + _SEALED_MAC + mac.encode() + b'"}'

    def unseal(self, purpose: str, raw: bytes) -> tuple[dict | None, str | None]:
        """(the body `seal` wrote, None), or (None, "damaged") when it is not such a document, or
        (None, "altered") when its HMAC does not hold (edited, or sealed under another salt)."""
        # The form `seal` writes: the MAC is checked over the body's bytes, parsed once.
        cut = raw.rfind(_SEALED_MAC)
        if raw.startswith(_SEALED_PREFIX) and raw.endswith(b'"}') and cut > 0:
            raw_body, mac = raw[len(_SEALED_PREFIX) : cut], raw[cut + len(_SEALED_MAC) : -2]
            if hmac.compare_digest(mac, self._mac_of(purpose, raw_body).encode()):
                try:
                    body = json.loads(raw_body)
                except (ValueError, RecursionError):
                    return None, "damaged"
                if isinstance(body, dict):
                    return body, None
        try:
            document = json.loads(raw)
            body, mac = document["body"], document["mac"]
            if not isinstance(body, dict) or not isinstance(mac, str):
                raise TypeError
        except (ValueError, KeyError, TypeError, RecursionError):
            return None, "damaged"
        return (body, None) if hmac.compare_digest(mac, self._seal_mac(purpose, body)) else (None, "altered")

    def _seal_mac(self, purpose: str, body: dict) -> str:
        return self._mac_of(purpose, canonical_json(body))

    def _mac_of(self, purpose: str, raw_body: bytes) -> str:
        return self.subject(f"{purpose}:" + hashlib.sha256(raw_body).hexdigest())

    def content(self, content_hash: str) -> str:
        # Domain-separated from subject keys: a content key never equals a subject key.
        mac = self._content_mac.copy()
        mac.update(content_hash.encode())
        return mac.hexdigest()
