"""The exceptions the CLI turns into one line on stderr (no traceback).

Anything else that escapes a command is a bug in embedcache and keeps its traceback: a
``ValueError`` from our own code is never mistaken for a user's mistake.
"""


def reason(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type where it has none), for a one-line error."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


class EmbedcacheError(Exception):
    """A problem with the user's input or environment, phrased as `what: why; how to fix` (exit code 1)."""


class UsageError(EmbedcacheError):
    """Options that do not fit together or lie out of range (exit code 2, as click's own usage errors)."""


class CacheMismatchError(EmbedcacheError):
    """A cache was made by another backbone, checkpoint, preprocessing or label set."""
