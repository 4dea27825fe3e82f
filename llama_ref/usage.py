"""What every command line of the project shares (``llama-ref`` and each script's ``main``): a bad
argument or a bad input file is one line on stderr and exit status 2, never a usage block or a
traceback.

* :class:`OneLineParser`: argparse whose usage errors are one line.
* :data:`BAD_INPUT_ERRORS` and :func:`bad_input`: what a ``main`` turns into that one line.
* :func:`positive_int`, :func:`non_negative_finite`, :func:`positive_finite`: argparse ``type=`` checks.
"""

from __future__ import annotations

import argparse
import math
import sys

__all__ = ["BAD_INPUT_ERRORS", "EXIT_BAD_INPUT", "OneLineParser", "bad_input", "non_negative_finite", "one_line",
           "positive_finite", "positive_int"]

EXIT_BAD_INPUT = 2
#: Errors that mean the user's input (arguments, files) is wrong, from our checks and the libraries'.
BAD_INPUT_ERRORS = (ValueError, OSError, MemoryError)


def one_line(e: BaseException) -> str:
    """The error's message on one line (whitespace runs collapsed; long ones cut at 2000 characters)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 2000 else text[:2000] + " ..."


def bad_input(prog: str, e: BaseException) -> int:
    """Report ``e`` as bad input of ``prog`` in one line on stderr; returns :data:`EXIT_BAD_INPUT`."""
    print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
    return EXIT_BAD_INPUT


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (argparse prints the usage block first) and exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {one_line(Exception(message))} (see {self.prog} --help)\n")

    def _get_values(self, action, arg_strings):
        # argparse (3.11) drops the "--" of "--kernel=--" and hands the command an unchecked empty list,
        # past `choices` and `type`. Take "--" as the value it is, checked like any other.
        if action.option_strings and action.nargs is None and arg_strings == ["--"]:
            value = self._get_value(action, "--")
            self._check_value(action, value)
            return value
        return super()._get_values(action, arg_strings)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _finite(text: str, what: str, ok) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {what} number, got {text!r}") from None
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"expected a {what} number, got {text!r}")
    return value


def non_negative_finite(text: str) -> float:
    """A tolerance: 0 (exact) or more, and finite (``inf`` would pass anything, ``nan`` nothing)."""
    return _finite(text, "non-negative finite", lambda v: v >= 0)


def positive_finite(text: str) -> float:
    return _finite(text, "positive finite", lambda v: v > 0)
