"""Errors that the command line reports as one line (no traceback)."""

import json
from pathlib import Path


class UnipoolError(Exception):
    """Base class for user-facing errors: bad config, missing files, corrupt data or checkpoints."""


def read_json(path: Path, error: type[UnipoolError] = UnipoolError) -> dict:
    """A JSON file's content; a missing or unparsable file raises `error` with a one-line message."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"missing {path}") from None
    except json.JSONDecodeError as e:
        raise error(f"corrupt {path}: {e}") from None
