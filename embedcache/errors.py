"""The exceptions the CLI turns into one line on stderr (no traceback).

Anything else that escapes a command is a bug in embedcache and keeps its traceback: a
``ValueError`` from our own code is never mistaken for a user's mistake.
"""


class EmbedcacheError(Exception):
    """A problem with the user's input or environment, phrased as `what: why; how to fix` (exit code 1)."""


class UsageError(EmbedcacheError):
    """Options that do not fit together or lie out of range (exit code 2, as click's own usage errors)."""


class CacheMismatchError(EmbedcacheError):
    """A cache was made by another backbone, checkpoint, preprocessing or label set."""
