"""User-facing errors: each carries one sentence that names what is wrong."""

from pathlib import Path

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
