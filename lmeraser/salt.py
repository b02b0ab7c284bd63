"""The workspace's secret salt and the keyed hashes made with it.

Published hashes of forgotten images would be a membership oracle: anyone holding a candidate
image could check whether it was in the training data. Everything that outlives an erasure
(tombstones, the suppression list, lineage records, data docs) therefore holds HMAC-SHA256 keys
of content hashes and subject ids: the controller, and an auditor given the salt, can check
them; the public cannot. The salt is created once (0600) and never enters a log or a record.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from lmeraser.errors import DataError
from lmeraser.io import atomic_write_bytes
from lmeraser.workspace import Workspace


def salt(ws: Workspace, create: bool = True) -> bytes:
    path = ws.subject_salt_file
    if not path.exists():
        if not create:
            raise DataError(
                f"{path}: the workspace's secret salt is missing, and the keyed hashes of erased data (suppression list, "
                "tombstones, records) mean nothing without it; restore it from your secret store (it is never committed)."
            )
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_bytes(path, secrets.token_bytes(32), mode=0o600)
    return path.read_bytes()


class Keyer:
    """Keyed hashes with one workspace's salt (read once)."""

    def __init__(self, ws: Workspace, create: bool = True):
        self._salt = salt(ws, create)

    def subject(self, subject_id: str) -> str:
        return hmac.new(self._salt, subject_id.encode(), hashlib.sha256).hexdigest()

    def content(self, content_hash: str) -> str:
        # Domain-separated from subject keys: a content key never equals a subject key.
        return hmac.new(self._salt, b"content:" + content_hash.encode(), hashlib.sha256).hexdigest()
