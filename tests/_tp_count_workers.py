"""Rank functions of the tensor-parallel counting tests (importable by the spawned processes)."""

from __future__ import annotations

import io
import os
from contextlib import redirect_stderr, redirect_stdout


def cli_as_torchrun(rank: int, argv_list: list) -> list:
    """``llama-ref`` run on this rank as if torchrun had started it (the world is already up, its rendezvous
    variables set): for each argv, (exit status, stdout, stderr) of this rank."""
    from counters import cli

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "0")  # never used: the world exists already
    out = []
    for argv in argv_list:
        stdout, stderr = io.StringIO(), io.StringIO()
        with redirect_stdout(stdout), redirect_stderr(stderr):
            try:
                code = cli.main(list(argv))
            except SystemExit as e:  # the ranks that do not report exit with rank 0's status
                code = e.code
        out.append((code, stdout.getvalue(), stderr.getvalue()))
    return out
