"""What every ``llama-ref`` subcommand shares: the exit statuses, the bad-input error, and checks of
arguments and output paths that run before any work."""

from __future__ import annotations

import argparse
import errno
import os
import stat
import tempfile
from typing import Optional

from ..interrupt import EXIT_INTERRUPTED  # 130, Ctrl-C: one line on stderr

EXIT_OK = 0
EXIT_DISAGREE = 1  # counters disagree (or a measured check failed)
EXIT_BAD_INPUT = 2  # the user's input is wrong: one line on stderr says what
EXIT_UNCOUNTED = 3  # --strict met work no formula covers
EXIT_INTERNAL = 4  # a bug of ours: one line, the traceback with --debug
EXIT_STATUSES = {EXIT_OK: "ok", EXIT_DISAGREE: "counters disagree", EXIT_BAD_INPUT: "bad input",
                 EXIT_UNCOUNTED: "uncounted work under --strict", EXIT_INTERNAL: "internal error",
                 EXIT_INTERRUPTED: "interrupted (Ctrl-C)"}

# Largest --batch, --tokens, --cached accepted before any other check: far beyond any real run, small
# enough that every size computed from them stays an exact, cheap Python int.
MAX_COUNT_ARG = 1 << 40


class BadInput(Exception):
    """Bad user input: reported as one line on stderr, exit status 2."""


MODEL_HELP = ("preset name, HF checkpoint dir or config.json, Meta dir or params.json, or a Hugging Face Hub "
              "model id org/name (only its config.json is fetched)")


def add_model_arguments(p: argparse.ArgumentParser, *, optional: bool = False,
                        default: Optional[str] = "llama-2-7b") -> None:
    """MODEL and the options that say how to read it, the same for every command. ``optional``: MODEL may
    be left out, meaning ``default`` (``None``: the command decides what no MODEL means)."""
    if optional:
        p.add_argument("model", metavar="MODEL", nargs="?", default=default,
                       help=MODEL_HELP + (f" (default {default})" if default else ""))
    else:
        p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary size for a Meta params.json saying -1")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a Hub model id (default main)")


def check_int(name: str, value: int, minimum: int, maximum: int = MAX_COUNT_ARG) -> int:
    if not minimum <= value <= maximum:
        bound = f">= {minimum}" if value < minimum else f"<= {maximum:,}"
        raise BadInput(f"--{name} must be {bound}, got {value}")
    return value


def _check_path_text(path: str, option: str) -> None:
    if not path or path.isspace():
        raise BadInput(f"{option} is empty: give a path")
    if "\0" in path:
        raise BadInput(f"{option} {path!r}: a path cannot contain a NUL byte")


def check_input_file(path: Optional[str], option: str) -> None:
    """Fail now, before any work, unless ``path`` is an existing regular file (a directory, FIFO or
    device named here would fail later, or block: opening a FIFO waits for a writer)."""
    if path is None:
        return
    _check_path_text(path, option)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        broken = " (a broken symbolic link)" if os.path.islink(path) else ""
        raise BadInput(f"{option} {path}: no such file{broken}") from None
    except OSError as e:
        raise BadInput(f"{option} {path}: cannot access ({e.strerror or e})") from None
    if stat.S_ISDIR(mode):
        raise BadInput(f"{option} {path} is a directory, not a file")
    if not stat.S_ISREG(mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a device or socket"
        raise BadInput(f"{option} {path} is {kind}, not a regular file")


def check_output_file(path: Optional[str], option: str = "--out") -> None:
    """Fail now, before any work, if ``path`` cannot be written as a file."""
    if path is None:
        return
    _check_path_text(path, option)
    if os.path.isdir(path):
        raise BadInput(f"{option} {path} is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    _check_writable_dir(parent, option, path)
    if os.path.exists(path):
        if stat.S_ISFIFO(os.stat(path).st_mode):
            # A named pipe: probing it by opening and closing it would end a reader's stream, so whether
            # anything reads it is checked when writing (write_output), which never waits.
            return
        try:
            with open(path, "ab"):
                pass
        except OSError as e:
            raise BadInput(f"{option} {path}: the file is not writable ({e.strerror or e})") from None


def check_output_dir(path: str, option: str = "--out") -> None:
    """Fail now, before any work, if ``path`` cannot be (created and) written as a directory. Missing
    folders are created, as ``mkdir -p`` would."""
    _check_path_text(path, option)
    if os.path.exists(path) and not os.path.isdir(path):
        raise BadInput(f"{option} {path} is a file, not a directory")
    in_the_way = _file_in_the_way(path)
    if in_the_way:
        raise BadInput(f"{option} {path}: {in_the_way} is a file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise BadInput(f"{option} {path}: cannot create the directory ({e.strerror or e})") from None
    _check_writable_dir(path, option, path)


def _file_in_the_way(path: str) -> Optional[str]:
    """The nearest existing ancestor of ``path`` when it is a file (no folder can be made under it)."""
    probe = os.path.dirname(os.path.abspath(path))
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    return probe if probe and os.path.exists(probe) and not os.path.isdir(probe) else None


def _check_writable_dir(directory: str, option: str, path: str) -> None:
    if not os.path.isdir(directory):
        # Say which part is wrong: a file in the way, or a missing folder.
        in_the_way = directory if os.path.exists(directory) else _file_in_the_way(os.path.join(directory, "x"))
        if in_the_way:
            raise BadInput(f"{option} {path}: {in_the_way} is a file, not a directory")
        raise BadInput(f"{option} {path}: the folder {directory} does not exist")
    # Ask the file system itself (permission bits do not stop root; a read-only mount does).
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise BadInput(f"{option} {path}: the folder {directory} is not writable ({e.strerror or e})") from None


def write_output(path: str, text: str, option: str = "--out") -> None:
    """Write ``text`` to ``path``; a failure (disk full, a file that became unwritable) names the file.
    A named pipe that nothing reads is refused at once: ``open`` would wait for a reader forever."""
    try:
        with _open_for_writing(path, option) as f:
            f.write(text)
    except OSError as e:
        raise BadInput(f"{option} {path}: cannot write ({e.strerror or e})") from None


def _open_for_writing(path: str, option: str):
    try:
        is_fifo = stat.S_ISFIFO(os.stat(path).st_mode)
    except FileNotFoundError:
        is_fifo = False
    if not is_fifo:
        return open(path, "w", encoding="utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO at once when no process reads the pipe
    except OSError as e:
        if e.errno == errno.ENXIO:
            raise BadInput(f"{option} {path} is a FIFO (named pipe) that nothing reads: writing to it would wait "
                           "forever") from None
        raise
    os.set_blocking(fd, True)
    return os.fdopen(fd, "w", encoding="utf-8")
