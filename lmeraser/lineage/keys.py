"""The Ed25519 signing key: created on first use with 0600 permissions, or read from the
environment. Its id is the fingerprint (sha256) of the raw public key. Never logged."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from lmeraser.errors import LmeraserError
from lmeraser.io import MissingFile, atomic_write_bytes, read_trusted

KEY_ENV = "LMERASER_SIGNING_KEY"  # PEM (PKCS#8) text of the private key, for CI / secret stores
_taken: str | None = None  # the key's PEM once take_key_from_environment() removed it from os.environ
MAX_KEY_FILE = 16 << 10  # a PEM Ed25519 key is ~120 bytes


def take_key_from_environment() -> None:
    """Move $LMERASER_SIGNING_KEY out of os.environ into this process's memory, so that no child
    process (Prefect's server, dvc, git, anything a library starts) ever inherits it."""
    global _taken
    pem = os.environ.pop(KEY_ENV, None)
    if pem:
        _taken = pem


# Where the key file lives: Workspace.signing_key_file ($LMERASER_SIGNING_KEY_FILE, else audit/keys/).


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()


def load_or_create_key(path: str | Path, create: bool = True) -> Ed25519PrivateKey:
    """The signing key from $LMERASER_SIGNING_KEY, else from `path`, created (0600 from its first
    byte) if absent and `create` allows it. Callers forbid creation once records exist: a new key
    in place of a missing one would leave a log that verifies with neither."""
    if key_from_environment():
        return parse_private_key(key_from_environment().encode(), f"${KEY_ENV}")
    path = Path(path)
    try:
        # A regular 0600 file, never read through a link, a FIFO or a device.
        return parse_private_key(read_trusted(path, "signing key", MAX_KEY_FILE, secret=True), str(path))
    except MissingFile:
        if not create:
            raise LmeraserError(
                f"{path}: signing key not found, and records, a pinned signer or $LMERASER_SIGNING_KEY_FILE "
                "say one exists; restore it (no new key is made in its place)."
            ) from None
    key = Ed25519PrivateKey.generate()
    write_private_key(path, key)
    return key


def key_from_environment() -> str | None:
    """The signing key's PEM from $LMERASER_SIGNING_KEY (or taken from it at start-up), if any."""
    return os.environ.get(KEY_ENV) or _taken


def write_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Write `key` (PKCS#8 PEM) to `path`, 0600 from its first byte, in a 0700 directory."""
    pem_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write_bytes(path, pem_bytes, mode=0o600)


def parse_private_key(pem: bytes, origin: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise LmeraserError(f"{origin}: not a PEM private key.") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise LmeraserError(f"{origin}: the signing key must be Ed25519.")
    return key


def public_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(path: str | Path, follow_links: bool = False) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file. The pinned signer is a trust anchor: a regular file
    of at most 16 KiB, never read through a link; `follow_links` only for a path the user named
    (`--pubkey`). A FIFO or device is refused without blocking."""
    path = Path(path)
    try:
        raw = read_trusted(path, "public key", MAX_KEY_FILE, follow_links=follow_links)
    except MissingFile:
        raise LmeraserError(f"{path}: public key file not found.") from None
    return parse_public_key(raw, str(path))


def parse_public_key(pem: bytes, origin: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise LmeraserError(f"{origin}: not a PEM public key.") from None
    if not isinstance(key, Ed25519PublicKey):
        raise LmeraserError(f"{origin}: not an Ed25519 public key.")
    return key


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)
