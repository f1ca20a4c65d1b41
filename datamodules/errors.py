"""User-facing errors: each one is a single line that names the problem and the fix."""


class LitMetaError(Exception):
    """Base class of errors caused by a user's input (config, data, checkpoint).

    The CLI prints ``error: <message>`` and exits with status 2 instead of a traceback.
    """


class ConfigError(LitMetaError, ValueError):
    """An argument or configuration value is invalid."""


class DataError(LitMetaError):
    """Data on disk is missing, incomplete or unreadable."""


def require_positive(**values: int) -> None:
    """Raise :class:`ConfigError` naming the first value that is not a positive integer."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
