"""``llama-ref``: count MACs/FLOPs of a Llama model with several counters and prove they agree.

A plain dispatcher: each subcommand is a module with ``HELP``, ``add_arguments(parser)`` and
``run(args) -> exit status``. Errors are turned into exit statuses here, once, for every command:

====  ======================================================================
0     ok
1     counters disagree (or a measured check failed)
2     bad input: one line on stderr names the problem
3     uncounted work under ``--strict``
4     internal error (a bug): one line; ``--debug`` prints the traceback
====  ======================================================================
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Optional, Sequence

from .commands import count, memory, mfu, params, schedules
from .commands.common import (
    EXIT_BAD_INPUT,
    EXIT_DISAGREE,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_STATUSES,
    EXIT_UNCOUNTED,
    BadInput,
)
from .hooks import UncountedModuleError
from .ops import UncountedOpError
from .studies import roofline_command

__all__ = ["EXIT_BAD_INPUT", "EXIT_DISAGREE", "EXIT_INTERNAL", "EXIT_OK", "EXIT_UNCOUNTED", "SUBCOMMANDS",
           "build_parser", "main"]

SUBCOMMANDS = {"count": count, "schedules": schedules, "params": params, "roofline": roofline_command, "mfu": mfu,
               "memory": memory}
# Errors that mean the user's input (arguments, files) is wrong, from our checks and the libraries'.
BAD_INPUT_ERRORS = (BadInput, ValueError, OSError, MemoryError)

logger = logging.getLogger("llama_ref.cli")


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (argparse prints the usage block first): every bad input
    of every command, ours or argparse's, is exactly one line on stderr and exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")

    def _get_values(self, action, arg_strings):
        # argparse (3.11) drops the "--" of "--kernel=--" and hands the command an unchecked empty list,
        # past `choices` and `type`. Take "--" as the value it is, checked like any other.
        if action.option_strings and action.nargs is None and arg_strings == ["--"]:
            value = self._get_value(action, "--")
            self._check_value(action, value)
            return value
        return super()._get_values(action, arg_strings)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="llama-ref", description=__doc__.split("\n")[0],
        epilog="exit status: " + "; ".join(f"{k} {v}" for k, v in EXIT_STATUSES.items()))
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 2000 else text[:2000] + " ..."


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, message already on stderr)
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    prog = f"llama-ref {args.command}"
    debug = args.debug or args.verbose > 0
    try:
        return args._run(args)
    except BrokenPipeError:  # output piped into e.g. `head`: not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except (UncountedOpError, UncountedModuleError) as e:
        _report(prog, "uncounted work (--strict)", e, debug)
        return EXIT_UNCOUNTED
    except BAD_INPUT_ERRORS as e:
        _report(prog, "error", e, debug)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place a bug becomes an exit status
        _report(prog, f"internal error ({type(e).__name__})", e, debug,
                hint="; please report it (rerun with --debug for the traceback)")
        return EXIT_INTERNAL


def _report(prog: str, what: str, e: BaseException, debug: bool, hint: str = "") -> None:
    if debug:
        traceback.print_exception(e, file=sys.stderr)
    print(f"{prog}: {what}: {_one_line(e)}{'' if debug else hint}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
