"""Ctrl-C at any moment: one line on stderr, exit status 130, and no process left behind.

Each case starts a real command in a session of its own, sends SIGINT after a delay - to the command's
process (``kill -INT``) or to its whole process group (what a terminal's Ctrl-C does) - and checks the
status, stderr, and that no process of that session is left (a /proc scan: the fork server, the
resource tracker and the ranks of ``count --tp`` are all in it). The delays land in ``import torch``
(the first seconds), in the fork server's start, and while the ranks run; a command that finished
before its signal came would test nothing, so that fails too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what the console script `llama-ref` (counters.cli:main) runs
ENTRY = [sys.executable, "-c", "import sys; from counters.cli import main; sys.exit(main())"]

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists() or not hasattr(os, "killpg"),
                                reason="needs POSIX process groups and /proc")


def _session_processes(sid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every live process in session ``sid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
            if fields[0] != "Z" and int(fields[3]) == sid:
                with open(f"/proc/{entry}/cmdline", encoding="utf-8") as f:
                    found.append((int(entry), f.read().replace("\0", " ")[:200]))
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
    return found


def _wait_for(proc: subprocess.Popen, when) -> None:
    """Until ``when``: a delay in seconds (float), or (int) the moment the session holds that many processes
    (the command, the fork server, the resource tracker, then the ranks). A command that finished first would
    test nothing: that fails."""
    if isinstance(when, float):
        try:
            proc.wait(timeout=when)
        except subprocess.TimeoutExpired:
            return
    else:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if len(_session_processes(proc.pid)) >= when:
                return
            time.sleep(0.02)
    pytest.fail(f"finished (status {proc.returncode}) before the signal ({when}): nothing tested")


def _interrupt(argv: list, when, *, group: bool) -> tuple[int, str, list]:
    """Run ``argv`` in a new session, SIGINT it at ``when`` (see :func:`_wait_for`); (status, stderr, processes
    left)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a leftover child holding it cannot block us
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env, cwd=ROOT)
        left: list = []
        try:
            _wait_for(proc, when)
            if group:
                os.killpg(proc.pid, signal.SIGINT)
            else:
                proc.send_signal(signal.SIGINT)
            status = proc.wait(timeout=90)
            deadline = time.monotonic() + 10  # the fork server and the tracker exit once they see EOF
            while True:
                left = _session_processes(proc.pid)
                if not left or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        finally:
            for pid, _ in _session_processes(proc.pid):  # never leave them to the rest of the suite
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        return status, err.read().decode(errors="replace"), left


def _check(status: int, err: str, left: list, line: str) -> None:
    assert status == 130, err
    assert err.splitlines() == [line], err  # one line: no traceback, from this process or a child
    assert left == [], f"left behind: {left}"


@pytest.mark.parametrize("delay", [0.3, 0.8, 1.5])
def test_ctrl_c_while_the_cli_imports_torch(delay):
    status, err, left = _interrupt([*ENTRY, "count", "llama-2-7b", "--tokens", "2048", "--device", "meta"], delay, group=False)
    _check(status, err, left, "llama-ref count: interrupted")


@pytest.mark.parametrize("delay", [0.5, 1.5])
def test_ctrl_c_in_a_script(delay):
    status, err, left = _interrupt([sys.executable, str(ROOT / "scripts" / "compare_hf.py"), "tiny"], delay, group=True)
    _check(status, err, left, "compare_hf.py: interrupted")


@pytest.mark.slow
@pytest.mark.parametrize("when, group", [(1.0, True), (3, False), (5, True)], ids=lambda v: str(v))
def test_ctrl_c_on_count_tp_leaves_nothing_behind(when, group):
    # import torch (1.0 s in), then by what has started, whatever the machine's speed: the fork server and the
    # resource tracker (3 processes), both ranks (5). Whichever the signal meets, every process of the session
    # is gone and the report is one line.
    argv = [*ENTRY, "count", "tiny", "--tp", "2", "--tokens", "64", "--batch", "2", "--device", "cpu"]
    status, err, left = _interrupt(argv, when, group=group)
    _check(status, err, left, "llama-ref count: interrupted")


def test_an_interrupt_a_library_swallows_is_not_lost(monkeypatch, capsys):
    # import torch catches a KeyboardInterrupt at one point of its start-up and goes on; the watch remembers the
    # SIGINT, so the command ends with the one line and 130 at once instead of running to the end
    from counters import cli
    from counters.commands import params

    real_build_parser = cli.build_parser

    def build_parser_that_swallows():
        try:
            signal.raise_signal(signal.SIGINT)  # the handler raises KeyboardInterrupt here ...
            time.sleep(0.1)
        except KeyboardInterrupt:  # ... and a library catches it and goes on
            pass
        return real_build_parser()

    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(cli, "build_parser", build_parser_that_swallows)
    monkeypatch.setattr(params, "run", lambda args: pytest.fail("the command ran after the interrupt"))
    assert cli.main(["params", "tiny"]) == 130
    assert capsys.readouterr().err == "llama-ref params: interrupted\n"
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored
