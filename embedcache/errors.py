"""The one exception type the CLI turns into a one-line error (no traceback)."""


class EmbedcacheError(Exception):
    """A problem with the user's input or environment, phrased as `what: why; how to fix`."""


class CacheMismatchError(EmbedcacheError):
    """A cache was made by another backbone, checkpoint, preprocessing or label set."""
