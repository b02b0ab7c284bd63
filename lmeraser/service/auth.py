"""The service's bearer token: from $LMERASER_API_TOKEN, else `audit/keys/api-token`, created on
first use with 0600 permissions from its first byte. Never logged, never passed to a child process."""

from __future__ import annotations

import hmac
import os
import secrets

from lmeraser.errors import LmeraserError
from lmeraser.io import atomic_write_bytes, read_secret
from lmeraser.workspace import Workspace

TOKEN_ENV = "LMERASER_API_TOKEN"
MIN_LENGTH = 16
_taken: str | None = None  # the token once take_token_from_environment() removed it from os.environ


def take_token_from_environment() -> None:
    """Move $LMERASER_API_TOKEN out of os.environ into this process's memory, so no child process
    (Prefect's server, dvc, git) inherits it."""
    global _taken
    token = os.environ.pop(TOKEN_ENV, None)
    if token:
        _taken = token


def _from_environment() -> str | None:
    return os.environ.get(TOKEN_ENV) or _taken


def token_source(ws: Workspace) -> str:
    """Where the token comes from, for messages (never the token itself)."""
    return f"${TOKEN_ENV}" if _from_environment() else ws.relative(ws.api_token_file)


def api_token(ws: Workspace, create: bool = True) -> str:
    """The token clients must present; made (random, 0600) when none exists and `create` allows."""
    token = _from_environment()
    if token:
        if len(token) < MIN_LENGTH or not token.isprintable() or " " in token:
            raise LmeraserError(
                f"${TOKEN_ENV}: a token needs at least {MIN_LENGTH} printable characters and no spaces "
                "(e.g. `openssl rand -hex 32`)."
            )
        return token
    path = ws.api_token_file
    if path.exists():
        try:
            token = read_secret(path, "API token").decode().strip()
        except UnicodeDecodeError:
            token = ""
        if len(token) < MIN_LENGTH or not token.isprintable():
            raise LmeraserError(f"{path}: not an API token (delete it to have a new one made).")
        return token
    if not create:
        raise LmeraserError(
            f"no API token: set ${TOKEN_ENV} or start `lmeraser serve` once in {ws.root.resolve()} "
            f"(it creates {ws.relative(path)})."
        )
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write_bytes(path, token.encode() + b"\n", mode=0o600)
    return token


def authorized(header: str | None, token: str) -> bool:
    """Whether an `Authorization` header carries `token` as a bearer token (constant-time compare)."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
