"""Errors that the command line reports as one clear line and exit status 2.

Anything raised as an :class:`AkodError` is a problem with the user's input (a config
field, a data file, a checkpoint), never a bug: the CLI prints its message without a
traceback. Every other exception is a bug and keeps its traceback.
"""


class AkodError(Exception):
    """A user-facing error; the message names the field or file at fault."""


class ConfigError(AkodError, ValueError):
    """A configuration field is unknown, of the wrong type, or out of range."""


class DataError(AkodError):
    """A data folder or file is missing, unreadable or corrupt."""


class CheckpointError(AkodError):
    """A checkpoint file is missing, truncated or corrupt."""


class TrainingDivergedError(AkodError):
    """The training loss became NaN or infinite."""


class BrokerTimeoutError(AkodError, TimeoutError):
    """The schedule broker waited longer than its timeout for the other side."""
