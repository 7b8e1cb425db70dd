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


def one_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (at most 500 characters), or its type."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0][:500] if lines else type(e).__name__


def root_cause(e: BaseException) -> BaseException:
    """The innermost error behind ``e``: through Ray Train's worker failures, Ray's task errors
    (their ``cause``) and chained exceptions."""
    seen = {id(e)}
    while True:
        failures = getattr(e, "worker_failures", None)
        inner = next(iter(failures.values()), None) if isinstance(failures, dict) else None
        if inner is None and isinstance(getattr(e, "cause", None), BaseException):
            inner = e.cause
        inner = inner or e.__cause__
        if inner is None or id(inner) in seen:
            return e
        seen.add(id(inner))
        e = inner
