"""The errors that are the user's to fix: printed as a message (exit status 2), never as a traceback."""


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any compute."""


class DataError(ConfigError):
    """The data a configuration points at cannot be used (a missing file, undecodable text, a bad shard);
    raised while the data is read, before the model, the tracker or any compute exist."""
