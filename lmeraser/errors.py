"""User-facing errors: each carries one sentence that names what is wrong."""

import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

# The kernel's file systems: no user file, workspace or trusted file is read from them.
KERNEL_TREES = (Path("/proc"), Path("/sys"), Path("/dev"))


class LmeraserError(Exception):
    """A problem with the user's input or environment; the CLI prints it and exits non-zero."""


class ConfigError(LmeraserError):
    """params.yaml (or an override) holds a missing, unknown or out-of-range value."""


class DataError(LmeraserError):
    """A data source or split is missing, unreadable, truncated or inconsistent."""


class ValidationFailed(LmeraserError):
    """The Great Expectations suite rejected the splits."""


def shown(text: object, limit: int = 80) -> str:
    """User text as a message may echo it: control characters escaped (no terminal escape
    sequence reaches the terminal) and at most `limit` characters."""
    text = str(text)
    clipped = text if len(text) <= limit else text[:limit] + "…"
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in clipped)


def without_credentials(url: str) -> str:
    """`url` without a user:password@ part, a query or a fragment (a token may ride in either):
    records and logs name stores, never secrets.

    Args:
        url: a store's URL as configured (a DVC remote, an endpoint, an MLflow artifact or tracking URI); a path without
            a scheme is returned as it is.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return _URL_USERINFO.sub(r"\1", url.split("?")[0].split("#")[0])
    if not parts.scheme:
        return url
    if parts.username is None and parts.password is None:  # as given (rebuilt, sqlite:////abs would lose a slash)
        return url.split("?")[0].split("#")[0]
    host = parts.hostname or ""
    return urlunsplit((parts.scheme, host + (f":{port}" if port else ""), parts.path, "", ""))


_URL_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]*@")
_URL_QUERY = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#]*)[?#]\S*")


def reason(error: BaseException) -> str:
    """One line on why a store could not be listed or read: the error's class and the first line
    of its message, with every URL in it stripped of credentials and queries (MLflow's messages
    repeat the tracking URI as given, password included).

    Args:
        error: what listing or reading the store raised.
    """
    first = (str(error).strip().splitlines() or [""])[0][:300]
    first = _URL_QUERY.sub(r"\1", _URL_USERINFO.sub(r"\1", first))[:200]
    return f"{error.__class__.__name__}: {first}" if first else error.__class__.__name__
