"""Errors that the command line reports as one line (no traceback)."""


class UnipoolError(Exception):
    """Base class for user-facing errors: bad config, missing files, corrupt data or checkpoints."""
