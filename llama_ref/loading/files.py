"""Opening checkpoint files safely: every path is checked to be a readable regular file before it
is opened, and every OS error becomes a one-line message naming the file.

Why before: opening a FIFO blocks until a writer appears (a hang, not an error), a directory in place
of a file fails deep inside safetensors or ``torch.load``, and a broken symlink (a partial Hugging
Face cache download) only says "No such file" about a path the user never typed.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from contextlib import contextmanager
from typing import Any, BinaryIO, Iterator

from ..config_files import MAX_JSON_BYTES, DuplicateKeyError, no_duplicate_keys
from .errors import CheckpointError


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def check_file(path: str, what: str = "file") -> int:
    """Raise unless ``path`` is (a symlink to) a regular file; return its size in bytes.

    ``FileNotFoundError`` for a missing file or broken symlink, ``PermissionError`` when it cannot
    be inspected, ``CheckpointError`` for a directory, FIFO, socket or device.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            raise FileNotFoundError(f"{what} {path} is a broken symbolic link (its target {target} does not exist; "
                                    "an incomplete download?)") from None
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except PermissionError:
        raise PermissionError(f"cannot read {what} {path}: permission denied") from None
    except OSError as e:
        raise CheckpointError(f"cannot access {what} {path}: {_reason(e)}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        raise CheckpointError(f"{what} {path} is {kind}, expected a regular file")
    return st.st_size


@contextmanager
def open_binary(path: str, what: str = "file") -> Iterator[BinaryIO]:
    """``open(path, "rb")`` after :func:`check_file`, with OS errors turned into one-line messages."""
    check_file(path, what)
    try:
        f = open(path, "rb")
    except PermissionError:
        raise PermissionError(f"cannot read {what} {path}: permission denied") from None
    except OSError as e:
        raise CheckpointError(f"cannot open {what} {path}: {_reason(e)}") from None
    with f:
        try:
            yield f
        except PermissionError:
            raise PermissionError(f"cannot read {what} {path}: permission denied") from None
        except OSError as e:
            raise CheckpointError(f"cannot read {what} {path}: {_reason(e)}") from None


def read_json_file(path: str, what: str) -> Any:
    """Parse a small JSON file; ``CheckpointError`` naming the file for binary data, bad UTF-8, bad JSON,
    duplicate keys (JSON would silently keep the last one) or a file too large to be one."""
    size = check_file(path, what)
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{what} {path} is {size:,} bytes, too large to be one (limit {MAX_JSON_BYTES:,}); "
                              "is it the right file?")
    with open_binary(path, what) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{what} {path} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                              "a binary or corrupt file?") from None
    try:
        return json.loads(text, object_pairs_hook=no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what} {path} is not valid JSON ({e})") from None
    except DuplicateKeyError as e:
        raise CheckpointError(f"{what} {path} has the key {e.args[0]!r} more than once; "
                              "which one is meant is ambiguous") from None
    except RecursionError:
        raise CheckpointError(f"{what} {path} is not valid JSON (nested too deeply)") from None
    except ValueError as e:  # int() of a number with thousands of digits
        raise CheckpointError(f"{what} {path} is not usable JSON ({e})") from None


def _reason(e: OSError) -> str:
    return e.strerror or errno.errorcode.get(e.errno or 0, "") or str(e) or type(e).__name__


__all__ = ["DuplicateKeyError", "MAX_JSON_BYTES", "check_file", "no_duplicate_keys", "open_binary", "read_json_file"]
