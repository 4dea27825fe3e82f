"""Ctrl-C as one line on stderr and exit status 130, whenever it comes.

Python turns Ctrl-C (SIGINT) into ``KeyboardInterrupt`` wherever the program is, most often inside
``import torch`` (the first second or two of every command): uncaught, that prints a traceback of a
dozen frames or more. An entry point therefore catches it around *everything*, imports included, and
needs a module to do so that imports nothing heavy itself: this one (standard library only; so is the
``counters`` package's ``__init__``).

* ``llama-ref`` (``counters.cli:main``) keeps its top-level imports light and imports the commands
  inside ``main``, under its ``except KeyboardInterrupt``.
* Each script in ``scripts/`` runs its ``main``, import included, inside :func:`exit_on_interrupt`.

Both also remember the interrupt (:func:`watch_interrupts`), since a library may catch the
``KeyboardInterrupt`` and go on: the run still ends with the one line and status 130.

Left to Python: a Ctrl-C while the interpreter itself starts (before the entry module runs, a few tens
of milliseconds) or finishes.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from typing import Iterator

__all__ = ["EXIT_INTERRUPTED", "InterruptWatch", "exit_on_interrupt", "report_interrupt", "watch_interrupts"]

#: 128 + SIGINT: what a shell reports for a process that Ctrl-C ended.
EXIT_INTERRUPTED = 128 + int(signal.SIGINT)


def report_interrupt(prog: str) -> int:
    """Say so in one line on stderr; returns :data:`EXIT_INTERRUPTED`."""
    try:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr closed or gone: the status still says it
        pass
    return EXIT_INTERRUPTED


class InterruptWatch:
    """The SIGINTs seen while :func:`watch_interrupts` is active."""

    def __init__(self) -> None:
        self.seen = 0

    def _handler(self, signum, frame) -> None:
        self.seen += 1
        raise KeyboardInterrupt

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if a SIGINT came, whatever became of the one raised then."""
        if self.seen:
            raise KeyboardInterrupt


@contextlib.contextmanager
def watch_interrupts() -> Iterator[InterruptWatch]:
    """SIGINT raises ``KeyboardInterrupt`` as usual, and is remembered: code that catches that exception
    and goes on cannot lose the interrupt (``import torch`` does so at one point of its start-up, and the
    command would then run to the end as if no Ctrl-C had come). Call ``check()`` after such code; the
    block also ends in ``KeyboardInterrupt`` (instead of returning, exiting or raising) once a SIGINT came.
    The previous handler is restored on the way out. Outside the main thread: no handler, nothing seen."""
    watch = InterruptWatch()
    previous = signal.getsignal(signal.SIGINT)
    try:
        if previous is None:  # a handler set outside Python: leave it alone
            raise ValueError("SIGINT handler not set from Python")
        signal.signal(signal.SIGINT, watch._handler)
    except ValueError:  # not the main thread, or the above
        yield watch
        return
    try:
        yield watch
    except BaseException:
        if watch.seen:
            raise KeyboardInterrupt from None
        raise
    else:
        watch.check()
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def exit_on_interrupt(prog: str) -> Iterator[InterruptWatch]:
    """Run the block under :func:`watch_interrupts`; a Ctrl-C becomes one line and ``SystemExit(130)``.

    For a process's outermost code only (a script's body): the process is ending, so a second Ctrl-C
    is ignored from then on instead of interrupting the report."""
    try:
        with watch_interrupts() as watch:
            yield watch
    except KeyboardInterrupt:
        with contextlib.suppress(ValueError):  # not the main thread: no handler to change
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise SystemExit(report_interrupt(prog)) from None
