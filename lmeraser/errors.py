"""User-facing errors: each carries one sentence that names what is wrong."""


class LmeraserError(Exception):
    """A problem with the user's input or environment; the CLI prints it and exits non-zero."""


class ConfigError(LmeraserError):
    """params.yaml (or an override) holds a missing, unknown or out-of-range value."""


class DataError(LmeraserError):
    """A data source or split is missing, unreadable, truncated or inconsistent."""


class ValidationFailed(LmeraserError):
    """The Great Expectations suite rejected the splits."""
