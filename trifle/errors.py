"""One exception family, so the CLI can print a single clear line for every user mistake."""


class TrifleError(Exception):
    """A user-facing failure: bad config, bad input file, incompatible checkpoint.

    The message must name the offending file, key or option and say what was expected.
    """


class ConfigError(TrifleError):
    """A configuration value is missing, unknown or out of range."""


class DataError(TrifleError):
    """An input file is missing, corrupt or inconsistent."""


class CheckpointError(TrifleError):
    """A checkpoint cannot be used with the current configuration."""
