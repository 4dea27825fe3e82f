"""Getting a ``torch.distributed`` world to run tensor-parallel ranks in.

* :func:`init_torchrun` joins the world ``torchrun`` set up (NCCL when CUDA is available, else gloo).
* :func:`spawn` starts N local processes itself (gloo on CPU by default), runs a function on each and
  returns what each returned; a failing rank's exception is re-raised here, with its traceback as a note.
* :func:`fake_world` is a world of N ranks inside this one process with torch's "fake" backend: its
  collectives move no data, which is exactly right on the meta device (shapes only), e.g. to build and
  run a 70B or 405B tensor-parallel layout for counting.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from multiprocessing import resource_tracker

from .collectives import TPGroup
from .layout import check_world_size

logger = logging.getLogger(__name__)

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# After one rank fails, how long the others get to report their own error before they are stopped
# (they may be blocked in a collective waiting for the failed rank, which would otherwise hang).
_FAILURE_GRACE_S = 2.0


def in_torchrun() -> bool:
    """True when this process was started by ``torchrun`` (its rendezvous variables are set)."""
    return all(k in os.environ for k in TORCHRUN_ENV)


def default_backend(device: Optional[torch.device] = None) -> str:
    """NCCL for CUDA, gloo otherwise."""
    if device is None:
        return "nccl" if torch.cuda.is_available() else "gloo"
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_torchrun(backend: Optional[str] = None, timeout_s: float = 1800.0) -> TPGroup:
    """Join the world ``torchrun`` started (or return the already initialized one).

    With NCCL, this process's CUDA device is set to ``cuda:LOCAL_RANK`` first.
    """
    if dist.is_initialized():
        return TPGroup.of()
    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise ValueError(
            f"not running under torchrun (environment variable(s) {', '.join(missing)} not set); launch with "
            "`torchrun --standalone --nproc-per-node N ...`"
        )
    backend = backend or default_backend()
    if backend == "nccl":
        local_rank = int(os.environ["LOCAL_RANK"])
        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            raise ValueError(f"backend nccl needs CUDA device {local_rank} (LOCAL_RANK) but "
                             f"{torch.cuda.device_count()} device(s) are available")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return TPGroup.of()


@contextlib.contextmanager
def fake_world(world_size: int, rank: int = 0) -> Iterator[TPGroup]:
    """A ``world_size``-rank world in this process, as rank ``rank``, with torch's "fake" backend.

    Its collectives communicate nothing (outputs have the right shapes, not the right values): use it
    on the meta device. Needs a process with no initialized world; the world is destroyed on exit.
    """
    world_size = check_world_size(world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank!r} is outside a world of size {world_size}")
    if dist.is_initialized():
        raise ValueError(
            f"a torch.distributed world ({dist.get_backend()}, {dist.get_world_size()} ranks) is already "
            "initialized in this process; fake_world needs a process without one (use that world instead)"
        )
    dist.init_process_group("fake", rank=rank, world_size=world_size)
    try:
        yield TPGroup.of()
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- spawn
def spawn(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo", timeout_s: float = 600.0,
          threads: Optional[int] = None) -> list[Any]:
    """Run ``fn(rank, *args)`` on ``world_size`` fresh local processes forming one world.

    Processes come from a fork server (``multiprocessing``'s "forkserver", with torch preloaded) or are
    spawned; either way ``fn`` must be importable by name (a module-level function, not a lambda) and
    a script calling ``spawn`` needs the usual ``if __name__ == "__main__":`` guard.

    The default process group (``backend``; a file store in a private temporary directory, so no port
    is needed) is initialized before ``fn`` runs and destroyed after it returns. ``args`` and the return
    values must be picklable. Returns the values in rank order.

    If a rank raises, its exception is re-raised here (same type and message, the rank and its
    traceback added as a note) and the other ranks are stopped; a rank that dies without a result
    raises ``RuntimeError``; ranks still running after ``timeout_s`` are stopped and ``TimeoutError`` is
    raised. ``threads``: torch intra-op threads per rank (default: the CPU count divided among the ranks).
    With ``backend="nccl"`` rank r uses ``cuda:r``.

    Ctrl-C leaves nothing behind, whenever it comes: the ranks are started and stopped with SIGINT held
    (:func:`_sigint_held`: an interrupted ``Process.start`` would leave a rank this process has no handle
    on), so a ``KeyboardInterrupt`` is raised only once every started rank is known, and then every rank
    is stopped before it propagates. The ranks and the fork server inherit SIGINT blocked: a terminal's
    Ctrl-C, sent to the whole process group, reaches only this process, which stops them (no traceback
    of theirs). The fork server and ``multiprocessing``'s resource tracker exit with this process.
    """
    world_size = check_world_size(world_size)
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"backend nccl with {world_size} ranks needs {world_size} CUDA devices, "
                         f"{torch.cuda.device_count()} available")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // world_size)
    ctx = _context()
    # Started now, not inside the first Process.start below: starting it unblocks SIGINT (CPython's
    # resource_tracker.ensure_running), which would undo _sigint_held there.
    resource_tracker.ensure_running()
    tmp = tempfile.mkdtemp(prefix="llama_ref_spawn_")
    procs = []
    finished = False
    try:
        store = os.path.join(tmp, "store")
        with _sigint_held():  # a Ctrl-C now is raised after the loop, with every started rank in procs
            for rank in range(world_size):
                p = ctx.Process(target=_worker, args=(fn, rank, world_size, backend, store, tmp, threads, timeout_s,
                                                      args), name=f"llama_ref-rank{rank}")
                p.start()
                procs.append(p)
        results = _wait(procs, tmp, timeout_s)
        finished = True
    finally:
        # Ranks that returned exit by themselves; after a failure (or Ctrl-C) the others may be blocked in a
        # collective. A second Ctrl-C waits until they are stopped.
        with _sigint_held():
            _stop(procs, grace_s=30.0 if finished else 0.0)
            shutil.rmtree(tmp, ignore_errors=True)
    return results


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Hold SIGINT (Ctrl-C) for the block, then deliver it: a ``KeyboardInterrupt`` comes after the block,
    never inside it. SIGINT is blocked in this thread, so processes started inside inherit it blocked (the
    fork server passes that on to the ranks it forks), and recorded by a Python handler meanwhile (another
    thread of this process may take the signal). Outside the main thread (no handlers there): nothing."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:  # None: set outside Python
        yield
        return
    held: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if hasattr(signal, "pthread_sigmask") else None
    try:
        yield
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a pending SIGINT arrives here, and is held
        signal.signal(signal.SIGINT, previous)
        if held:
            signal.raise_signal(signal.SIGINT)  # now, to the handler it was meant for


def _context():
    """A fork server that has imported torch once forks every rank in milliseconds (a spawned process
    spends seconds importing torch); plain spawn where there is no fork server. Neither inherits this
    process's threads or CUDA state."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed", "llama_ref.parallel"])
        return ctx
    return mp.get_context("spawn")


def _result_path(tmp: str, rank: int) -> str:
    return os.path.join(tmp, f"rank{rank}.result")


def _worker(fn, rank, world_size, backend, store, tmp, threads, timeout_s, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    initialized = False
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        initialized = True
        payload = ("ok", fn(rank, *args), None, time.time())
    except BaseException as e:  # reported to the parent, which re-raises it
        # When it failed (same host clock for every rank): the earliest failure is the likeliest cause.
        payload = ("error", e, traceback.format_exc(), time.time())
    try:
        data = pickle.dumps(payload)
    except Exception as e:  # an unpicklable return value or exception
        kind = "return value" if payload[0] == "ok" else "exception"
        data = pickle.dumps(("error", RuntimeError(f"rank {rank}: cannot send its {kind} to the parent ({e})"),
                             payload[2], payload[3]))
    partial = _result_path(tmp, rank) + ".partial"
    with open(partial, "wb") as f:
        f.write(data)
    os.replace(partial, _result_path(tmp, rank))
    if initialized and payload[0] == "ok" and dist.is_initialized():  # fn may have destroyed it itself
        dist.destroy_process_group()
    # The result is handed over: skip the interpreter's teardown (seconds with torch loaded).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _wait(procs: list, tmp: str, timeout_s: float) -> list[Any]:
    n = len(procs)
    results: dict[int, tuple] = {}  # rank -> (status, value or exception, traceback, time)
    deadline = time.monotonic() + timeout_s
    failed_at: Optional[float] = None
    while len(results) < n:
        for rank in range(n):
            if rank not in results and os.path.exists(_result_path(tmp, rank)):
                with open(_result_path(tmp, rank), "rb") as f:
                    results[rank] = pickle.load(f)
        # A rank that exited without writing a result crashed (killed, out of memory, os._exit).
        dead = [r for r, p in enumerate(procs)
                if r not in results and not p.is_alive() and not os.path.exists(_result_path(tmp, r))]
        if failed_at is None and (dead or any(res[0] == "error" for res in results.values())):
            failed_at = time.monotonic()
        now = time.monotonic()
        if failed_at is not None and (now - failed_at > _FAILURE_GRACE_S or len(results) + len(dead) == n):
            break
        if now > deadline:
            pending = [r for r in range(n) if r not in results]
            raise TimeoutError(f"rank(s) {pending} of {n} did not finish within {timeout_s:g} s and were stopped")
        time.sleep(0.02)
    # The first rank to fail is the likeliest cause: others may fail because it left a collective.
    errors = sorted((r for r in results if results[r][0] == "error"), key=lambda r: (results[r][3], r))
    if errors:
        first = errors[0]
        exc, tb = results[first][1], results[first][2]
        note = f"raised on rank {first} of {n} (llama_ref.parallel.spawn); its traceback:\n{tb}"
        others = [f"rank {r}: {type(results[r][1]).__name__}: {results[r][1]}" for r in errors[1:]]
        if others:
            note += "other ranks failed too:\n  " + "\n  ".join(others)
        if isinstance(exc, BaseException):
            exc.add_note(note)
            raise exc
        raise RuntimeError(f"rank {first} failed: {exc!r}\n{note}")
    missing = [r for r in range(n) if r not in results]
    if missing:
        codes = ", ".join(f"rank {r} exit code {procs[r].exitcode}" for r in missing)
        raise RuntimeError(f"rank(s) {missing} of {n} exited without a result ({codes}): killed or out of memory?")
    return [results[r][1] for r in range(n)]


def _stop(procs: list, grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=2.0)
        if p.is_alive():
            p.kill()
            p.join(timeout=2.0)
