"""Errors that the command line reports as one line (no traceback)."""

import errno
import json
from pathlib import Path


class UnipoolError(Exception):
    """Base class for user-facing errors: bad config, missing files, corrupt data or checkpoints."""


class DiskFullError(UnipoolError):
    """A write failed because the file system is full (or over quota)."""


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC/EDQUOT from Python I/O, or the same failure as text from a native writer (safetensors
    reports "No space left on device (os error 28)" inside its own exception type)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left on device" in text or "Disk quota exceeded" in text


def read_json(path: Path, error: type[UnipoolError] = UnipoolError) -> dict:
    """A JSON file's content; a missing or unparsable file raises `error` with a one-line message."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"missing {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"corrupt {path}: {e}") from None
    except OSError as e:  # a directory, no permission, an I/O error
        raise error(f"cannot read {path}: {e.strerror or e}") from None
