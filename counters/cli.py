"""``llama-ref``: count MACs/FLOPs of a Llama model with several counters and prove they agree.

A plain dispatcher: each subcommand is a module with ``HELP``, ``add_arguments(parser)`` and
``run(args) -> exit status``. Errors are turned into exit statuses here, once, for every command:

====  ======================================================================
0     ok
1     counters disagree (or a measured check failed)
2     bad input: one line on stderr names the problem
3     uncounted work under ``--strict``
4     internal error (a bug): one line; ``--debug`` prints the traceback
130   interrupted (Ctrl-C): one line, at any moment, ``import torch`` included
====  ======================================================================

The module's own imports are light (the standard library and :mod:`counters.commands.common`): the
commands, and torch with them, are imported inside :func:`main`, so that a Ctrl-C while they load is
caught like any other (:mod:`counters.interrupt`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from types import ModuleType
from typing import Optional, Sequence

from .commands.common import (
    EXIT_BAD_INPUT,
    EXIT_DISAGREE,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_STATUSES,
    EXIT_UNCOUNTED,
    BadInput,
)
from .interrupt import EXIT_INTERRUPTED, InterruptWatch, report_interrupt, watch_interrupts

__all__ = ["EXIT_BAD_INPUT", "EXIT_DISAGREE", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_UNCOUNTED",
           "SUBCOMMANDS", "build_parser", "main"]

SUBCOMMANDS = ("count", "schedules", "params", "roofline", "mfu", "memory")
# Errors that mean the user's input (arguments, files) is wrong, from our checks and the libraries'.
BAD_INPUT_ERRORS = (BadInput, ValueError, OSError, MemoryError)


def _subcommands() -> dict[str, ModuleType]:
    """The command modules, imported on first use (they import torch)."""
    from .commands import count, memory, mfu, params, schedules
    from .studies import roofline_command

    return {"count": count, "schedules": schedules, "params": params, "roofline": roofline_command, "mfu": mfu,
            "memory": memory}

logger = logging.getLogger("llama_ref.cli")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (importing the commands, and torch with them). A usage error, ours or
    argparse's, is exactly one line on stderr and exit status 2 (``llama_ref.usage.OneLineParser``)."""
    from llama_ref.usage import OneLineParser

    parser = OneLineParser(
        prog="llama-ref", description=__doc__.split("\n")[0],
        epilog="exit status: " + "; ".join(f"{k} {v}" for k, v in EXIT_STATUSES.items()))
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module in _subcommands().items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    prog = "llama-ref"
    try:
        with watch_interrupts() as interrupts:
            return _main(argv, interrupts)
    except KeyboardInterrupt:  # anywhere: the imports of the commands (and torch), the run, the report
        command = _command_name(sys.argv[1:] if argv is None else argv)
        return report_interrupt(f"{prog} {command}" if command else prog)


def _command_name(argv: Sequence[str]) -> Optional[str]:
    return next((str(a) for a in argv if str(a) in SUBCOMMANDS), None)


def _main(argv: Optional[Sequence[str]], interrupts: InterruptWatch) -> int:
    parser = build_parser()
    interrupts.check()  # a Ctrl-C that the commands' imports (torch's) caught and went on from
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, message already on stderr)
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    from .hooks import UncountedModuleError
    from .ops import UncountedOpError
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
    except Exception as e:  # noqa: BLE001 - the one place a bug becomes an exit status
        _report(prog, f"internal error ({type(e).__name__})", e, debug,
                hint="; please report it (rerun with --debug for the traceback)")
        return EXIT_INTERNAL


def _report(prog: str, what: str, e: BaseException, debug: bool, hint: str = "") -> None:
    if debug:
        traceback.print_exception(e, file=sys.stderr)
    from llama_ref.usage import one_line

    print(f"{prog}: {what}: {one_line(e)}{'' if debug else hint}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
