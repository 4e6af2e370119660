"""Errors that the command line reports as one line (no traceback)."""

import errno
import importlib
import json
from pathlib import Path


class UnipoolError(Exception):
    """Base class for user-facing errors: bad config, missing files, corrupt data or checkpoints."""


class DiskFullError(UnipoolError):
    """A write failed because the file system is full (or over quota)."""


# The install extras (pyproject.toml) and what each brings; `require` names them in its one line.
EXTRAS = {"hf": "transformers", "eval": "lm-evaluation-harness", "data": "zstandard, pyarrow, datasets",
          "tensorboard": "tensorboard"}


class MissingExtraError(UnipoolError):
    """An optional dependency is not installed."""


def require(module: str, extra: str, what: str):
    """Import `module`, or fail in one line naming what needs it and the install command of its extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"{what} needs {module.split('.')[0]}, which is not installed: "
                                f"pip install 'unipool[{extra}]'") from None


def is_disk_full(e: BaseException | None) -> bool:
    """ENOSPC/EDQUOT from Python I/O, or the same failure as text from a native writer (safetensors
    reports "No space left on device (os error 28)" inside its own exception type), anywhere in the
    exception's chain (torch.save's zip writer raises its own error while closing after the OSError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


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


def json_object(raw, path: Path, error: type[UnipoolError] = UnipoolError) -> dict:
    """`raw`, parsed from `path`, if it is a JSON object (config.json, an index); else `error` in one line."""
    if not isinstance(raw, dict):
        raise error(f"{path} holds a JSON {type(raw).__name__}, not an object")
    return raw


def read_json_object(path: Path, error: type[UnipoolError] = UnipoolError) -> dict:
    """A JSON file that must hold an object: read_json, then json_object."""
    return json_object(read_json(path, error), path, error)
