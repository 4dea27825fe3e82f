"""``llama-ref count MODEL --tp N``: count every rank of an N-way tensor-parallel model (Meta's layout).

Where the ranks run:

* **meta** (the default for models too large for random weights here, or ``--device meta``): all N ranks
  in this process, one after another, each as rank r of a fake N-rank world (no data to communicate;
  :func:`count_meta_ranks`). A checkpoint is checked per rank (each rank's files and shapes) but
  not loaded.
* **cpu / cuda**, outside ``torchrun``: N local processes are spawned (gloo on CPU, NCCL on CUDA,
  ``llama_ref.parallel.spawn``); each builds its rank - loads only its part of a checkpoint
  (``load_tp_pretrained``), or random weights for a config or preset - counts it with every counter
  asked and sends its counts (plain data) back here, where they are cross-checked and reported.
* **under torchrun** (``in_torchrun()``): the world torchrun started is used (it must have N ranks);
  rank 0 gathers the counts and prints the report, the other ranks print nothing and exit with the same
  status.

One forward per rank (``--tokens``, ``--cached``, ``--batch``). ``--train`` and ``--prompt/--generate``
are refused with ``--tp``: a training step's backward all-reduces (``CopyToTensorParallel``) and a decode
loop's per-step collectives have no rows yet.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import sys
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from llama_ref.config import LlamaConfig
from llama_ref.parallel import (
    TPGroup,
    TPLayout,
    default_backend,
    fake_world,
    in_torchrun,
    init_torchrun,
    load_tp_pretrained,
    spawn,
    tensor_parallel_llama,
)
from llama_ref.schedule import format_schedule, resolve_schedule

from ..hooks import UncountedModuleError
from .models import DTYPES, choose_device, resolve_model
from ..ops import UncountedOpError
from ..result import COUNTER_NAMES
from ..tp import TPReport, combine, count_rank, rank_report
from ..tp_report import render_tp_csv, render_tp_table, tp_to_json
from .common import (
    EXIT_BAD_INPUT,
    EXIT_DISAGREE,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_UNCOUNTED,
    BadInput,
    check_int,
    write_output,
)

logger = logging.getLogger(__name__)

#: Largest --tp accepted before the model's own checks (no Llama has more heads than this).
MAX_TP = 1 << 12


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tensor parallelism (Meta's layout)")
    g.add_argument("--tp", type=int, default=None, metavar="N",
                   help="count each of N tensor-parallel ranks (spawned gloo processes on cpu, all ranks in this "
                        "process on meta, or the torchrun world) and check them against one process")


# ---------------------------------------------------------------- every rank in this process, on meta
def count_meta_ranks(config: LlamaConfig, tp: int, *, batch: int = 1, seqlen: int, start_pos: int = 0,
                     schedule=None, counters: Optional[Sequence[str]] = None, strict: bool = False,
                     dtype: torch.dtype = torch.bfloat16, compute_dtype: Optional[torch.dtype] = None,
                     attn_kernel: str = "math",
                     build: Optional[Callable[[int], Any]] = None) -> TPReport:
    """Count all ``tp`` ranks of ``config`` one after another in this process, each as rank r of a fake
    ``tp``-rank world on the meta device (shapes only: no weights, no data communicated), and combine them.

    ``build(rank)``, called inside rank r's fake world, builds that rank's model (default: a random-free
    meta ``tensor_parallel_llama`` of ``config`` in ``dtype``); e.g. ``load_tp_pretrained(path,
    device="meta")`` checks a checkpoint's files for that rank. The report's ``dtype`` is the weights'
    dtype of the ranks as built (a checkpoint's own dtype when ``build`` loads one without a dtype)."""
    TPLayout(config, tp)  # every divisibility problem, before any rank is built
    names = list(COUNTER_NAMES if counters is None else counters)
    reports = []
    wb = ab = None
    weight_dtypes = set()
    for rank in range(tp):
        with fake_world(tp, rank=rank) as group:
            if build is None:
                model = tensor_parallel_llama(config, group=group, device="meta", dtype=dtype, schedule=schedule,
                                              attn_kernel=attn_kernel, compute_dtype=compute_dtype)
            else:
                model = build(rank)
            wb, ab = model.tok_embeddings.weight.dtype.itemsize, model.compute_dtype.itemsize
            weight_dtypes.add(str(model.tok_embeddings.weight.dtype).replace("torch.", ""))
            compute = (str(model.compute_dtype).replace("torch.", ""), model.compute_dtype_reason)
            tokens = torch.zeros((batch, seqlen), dtype=torch.long, device="meta")
            results = count_rank(model, tokens, start_pos=start_pos, counters=names, strict=strict)
            reports.append(rank_report(results, config=model.config, tp=tp, rank=rank, schedule=tuple(model.schedule),
                                       batch=batch, seqlen=seqlen, start_pos=start_pos, counters=names,
                                       weight_dtype_bytes=wb, act_dtype_bytes=ab))
            del model
    out = combine(reports, weight_dtype_bytes=wb, act_dtype_bytes=ab)
    out.device, out.mode = "meta", f"{tp} ranks counted one after another in this process (fake process group, meta device)"
    # the dtype the ranks were built in (``build`` may load a checkpoint in its own dtype, not ``dtype``)
    out.dtype = ",".join(sorted(weight_dtypes))
    out.compute_dtype, out.compute_dtype_reason = compute
    return out


# ---------------------------------------------------------------- one rank's work (any process)
def _job(args, source, config, schedule, names, device: str, dtype: Optional[torch.dtype]) -> dict:
    """Everything a rank needs, as plain picklable data."""
    return {"config": config, "checkpoint_dir": source.checkpoint_dir, "device": device, "dtype": dtype,
            "schedule": tuple(schedule), "kernel": args.kernel, "seed": args.seed, "batch": args.batch,
            "tokens": args.tokens, "cached": args.cached, "counters": list(names), "strict": args.strict}


def _build_rank(job: dict, group: TPGroup, device: torch.device):
    if job["checkpoint_dir"] is not None:
        return load_tp_pretrained(job["checkpoint_dir"], group=group, device=device, dtype=job["dtype"],
                                  attn_kernel=job["kernel"], schedule=job["schedule"])
    # Random weights (counts do not depend on values): the layers' own init, seeded per rank.
    torch.manual_seed(job["seed"] + group.rank)
    model = tensor_parallel_llama(job["config"], group=group, device=device, dtype=job["dtype"] or torch.float32,
                                  schedule=job["schedule"], attn_kernel=job["kernel"])
    return model.requires_grad_(False).eval()


def _all_ranks_ok(error: Optional[BaseException]) -> None:
    """Every rank says whether it got here without an error; if any did not, all raise (the first error),
    instead of the others waiting forever in the forward's first collective."""
    statuses: list = [None] * dist.get_world_size()
    dist.all_gather_object(statuses, None if error is None else (type(error).__name__, str(error)))
    if error is not None:
        raise error
    failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
    if failed:
        r, (kind, message) = failed[0]
        raise RuntimeError(f"rank {r} failed to build its model: {kind}: {message}")


def _rank_body(rank: int, job: dict) -> dict:
    """Build rank ``rank`` in the initialized world and count it; the counts as plain data."""
    group = TPGroup.of()
    device = torch.device("cuda", torch.cuda.current_device()) if job["device"].startswith("cuda") else torch.device("cpu")
    model = error = None
    try:
        model = _build_rank(job, group, device)
    except Exception as e:  # noqa: BLE001 - reported to every rank, then raised
        error = e
    _all_ranks_ok(error)
    gen = torch.Generator().manual_seed(job["seed"])  # the same tokens on every rank
    tokens = torch.randint(0, job["config"].vocab_size, (job["batch"], job["tokens"]), generator=gen).to(device)
    results = count_rank(model, tokens, start_pos=job["cached"], counters=job["counters"], strict=job["strict"])
    return {"rank": rank, "results": results, "config": model.config, "schedule": tuple(model.schedule),
            "weight_dtype_bytes": model.tok_embeddings.weight.dtype.itemsize,
            "act_dtype_bytes": model.compute_dtype.itemsize,
            "dtype": str(model.tok_embeddings.weight.dtype).replace("torch.", ""),
            "compute_dtype": str(model.compute_dtype).replace("torch.", ""),
            "compute_dtype_reason": model.compute_dtype_reason}


def count_spawned_rank(rank: int, job: dict) -> dict:
    """The function each process started by ``llama_ref.parallel.spawn`` runs (importable by name)."""
    return _rank_body(rank, job)


# ---------------------------------------------------------------- assembling
def _reports(outs: list[dict], job: dict, tp: int) -> TPReport:
    reports = [rank_report(o["results"], config=o["config"], tp=tp, rank=o["rank"], schedule=o["schedule"],
                           batch=job["batch"], seqlen=job["tokens"], start_pos=job["cached"],
                           counters=job["counters"], weight_dtype_bytes=o["weight_dtype_bytes"],
                           act_dtype_bytes=o["act_dtype_bytes"]) for o in outs]
    report = combine(reports, weight_dtype_bytes=outs[0]["weight_dtype_bytes"],
                     act_dtype_bytes=outs[0]["act_dtype_bytes"])
    report.dtype = outs[0]["dtype"]
    report.compute_dtype, report.compute_dtype_reason = outs[0]["compute_dtype"], outs[0]["compute_dtype_reason"]
    return report


def _picklable(e: BaseException) -> BaseException:
    """``e``, or a RuntimeError with its message if it would not survive the trip to rank 0."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - any pickling problem
        return RuntimeError(f"{type(e).__name__}: {e}")


def _exit_status_of(e: BaseException) -> int:
    """The status ``counters.cli.main`` gives ``e`` (for the ranks that do not print it)."""
    if isinstance(e, (UncountedOpError, UncountedModuleError)):
        return EXIT_UNCOUNTED
    if isinstance(e, (BadInput, ValueError, OSError, MemoryError)):
        return EXIT_BAD_INPUT
    return EXIT_INTERNAL


def _output(args, report: TPReport, *, title: Callable[[str], str], extra: dict) -> int:
    """Print or write ``report``; ``title(dtype)`` is the table's first line, given the dtype the ranks used."""
    if args.format == "json":
        text = json.dumps(tp_to_json(report, extra=extra), indent=2) + "\n"
    elif args.format == "csv":
        text = render_tp_csv(report)
    else:
        text = render_tp_table(report, detail=args.detail, title=title(report.dtype)) + "\n"
    if args.out:
        write_output(args.out, text)
        verdict = "counters agree" if report.agree else f"counters DISAGREE ({len(report.mismatches)} mismatches)"
        total = report.totals()[report.reference]["macs"]
        print(f"wrote {args.out}: {report.tp} ranks, {verdict}; MACs summed over the ranks {total:,}")
    else:
        sys.stdout.write(text)
    if not report.agree:
        rank, first = report.mismatches[0]
        where = "the ranks together" if rank is None else f"rank {rank}"
        print(f"llama-ref count: counters disagree: {len(report.mismatches)} mismatch(es), first ({where}): {first}",
              file=sys.stderr)
        return EXIT_DISAGREE
    return EXIT_OK


# ---------------------------------------------------------------- the command
def run(args: argparse.Namespace, *, names: list[str], training=None, generation=None) -> int:
    """``count`` with ``--tp N``; called by :func:`counters.commands.count.run` after its input checks.

    Under torchrun only rank 0 reports, errors included: the other ranks exit with the same status, silently."""
    if in_torchrun() and os.environ.get("RANK", "0") != "0":
        try:
            return _run(args, names=names, training=training, generation=generation)
        except SystemExit:
            raise
        except BaseException as e:  # noqa: BLE001 - rank 0 reports the same error
            raise SystemExit(_exit_status_of(e)) from None
    return _run(args, names=names, training=training, generation=generation)


def _run(args: argparse.Namespace, *, names: list[str], training=None, generation=None) -> int:
    n = check_int("tp", args.tp, 1, MAX_TP)
    if training is not None or args.train:
        raise BadInput("--train with --tp: a tensor-parallel training step is not counted (its backward "
                       "all-reduces have no rows yet); count the forward (drop --train) or one process (drop --tp)")
    if generation is not None:
        raise BadInput("--prompt/--generate with --tp: a tensor-parallel generation loop is not counted; count "
                       "one forward per rank (--tokens N --cached C) or drop --tp")
    source = resolve_model(args.model, vocab_size=args.vocab_size, revision=args.revision)
    config = source.config
    TPLayout(config, n)  # one line naming every dimension N does not divide (exit 2)
    schedule = resolve_schedule(args.schedule, config.n_layers)
    end = args.cached + args.tokens
    if end > config.max_seq_len:
        raise BadInput(f"--cached {args.cached} + --tokens {args.tokens} = {end} exceeds the model's max_seq_len "
                       f"{config.max_seq_len}")
    dtype = DTYPES[args.dtype] if args.dtype else None
    dtype_bytes = dtype.itemsize if dtype else (4 if not source.has_weights else 2)
    # The N ranks together hold about one model and run about one forward's activations.
    device, reason = choose_device(args.device, source, dtype_bytes, batch=args.batch, seqlen=args.tokens,
                                   start_pos=args.cached, n_runs=len(schedule), attn_kernel=args.kernel)
    cpus = os.cpu_count() or 1
    if device == "cpu" and args.device is None and n > cpus and not in_torchrun():
        # Chosen, not asked for: N real ranks would oversubscribe this machine; meta counts the same.
        device, reason = "meta", f"{n} ranks are more than this machine's {cpus} CPU(s): counted on meta"
    logger.info("device %s: %s", device, reason)
    job = _job(args, source, config, schedule, names, device, dtype)
    torchrun = in_torchrun()
    weights = ("checkpoint weights, each rank its part" if source.has_weights and device != "meta"
               else "checkpoint checked per rank, not loaded (meta)" if source.has_weights
               else "no weights (meta)" if device == "meta" else "random weights")

    def title(weight_dtype: str) -> str:  # the dtype is known once the ranks are built
        return (f"{config.name} split {n} ways: schedule {format_schedule(schedule)} ({len(schedule)} layer runs), "
                f"batch {args.batch}, {args.tokens} new + {args.cached} cached tokens, device {device} ({weights}, "
                f"{weight_dtype}), kernel {args.kernel}")
    extra = {"model_source": {"spec": args.model, "kind": source.kind, "checkpoint_dir": source.checkpoint_dir},
             "weights": weights, "device_reason": reason}

    if device == "meta":
        if torchrun:
            raise BadInput("--tp on the meta device counts every rank in one process: run it without torchrun "
                           "(under torchrun, give --device cpu or cuda to count the real ranks)")
        build = None
        if source.has_weights:
            def build(rank: int):
                return load_tp_pretrained(source.checkpoint_dir, device="meta", dtype=dtype, attn_kernel=args.kernel,
                                          schedule=schedule)
        # without --dtype: bf16 for a config (no weights), the checkpoint's own dtype when one is checked
        report = count_meta_ranks(config, n, batch=args.batch, seqlen=args.tokens, start_pos=args.cached,
                                  schedule=schedule, counters=names, strict=args.strict,
                                  dtype=dtype or torch.bfloat16, attn_kernel=args.kernel, build=build)
        report.attn_kernel = args.kernel  # report.dtype: what the ranks were built in (count_meta_ranks)
        return _output(args, report, title=title, extra=extra)

    backend = default_backend(torch.device(device))
    if torchrun:
        return _run_torchrun(args, job, n, backend, title=title, extra=extra)
    if backend == "gloo" and n > cpus:
        raise BadInput(f"--tp {n} on the cpu spawns {n} processes but this machine has {cpus} CPU(s); "
                       "use --tp <= the CPU count, or --device meta (counts are the same)")
    if backend == "nccl" and torch.cuda.device_count() < n:
        raise BadInput(f"--tp {n} on cuda needs {n} CUDA devices, {torch.cuda.device_count()} available")
    outs = spawn(count_spawned_rank, n, job, backend=backend)
    report = _reports(outs, job, n)
    report.device, report.attn_kernel = device, args.kernel
    report.mode = f"{n} spawned {backend} processes on this machine, one per rank"
    return _output(args, report, title=title, extra=extra)


def _run_torchrun(args, job: dict, n: int, backend: str, *, title: Callable[[str], str], extra: dict) -> int:
    group = init_torchrun(backend)
    if group.world_size != n:
        raise BadInput(f"--tp {n} but torchrun started {group.world_size} rank(s): give --nproc-per-node {n} "
                       f"(or --tp {group.world_size})")
    rank = group.rank
    try:
        payload: Any = ("ok", _rank_body(rank, job))
    except Exception as e:  # noqa: BLE001 - rank 0 reports it
        payload = ("error", _picklable(e))
    gathered: Optional[list] = [None] * n if rank == 0 else None
    dist.gather_object(payload, gathered, dst=0)
    status, error = EXIT_OK, None
    if rank == 0:
        try:
            errors = [p[1] for p in gathered if p[0] == "error"]
            if errors:
                raise errors[0]
            report = _reports([p[1] for p in gathered], job, n)
            report.device, report.attn_kernel = job["device"], args.kernel
            report.mode = f"the torchrun world ({backend}, {n} ranks); rank 0 reports"
            status = _output(args, report, title=title, extra=extra)
        except BaseException as e:  # noqa: BLE001 - the others learn the status first
            error, status = e, _exit_status_of(e)
    box = [status]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if rank != 0 and box[0] != EXIT_OK:
        raise SystemExit(box[0])  # same status, nothing printed (rank 0 reported)
    return box[0]
