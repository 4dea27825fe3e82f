"""``llama-ref memory``: the memory of one request, analytic (the algebra) and measured, category by category,
exactly; the largest batch or context that fits a device.

The request is a forward of ``--batch`` x ``--tokens`` new tokens after ``--cached`` ones, with the KV cache a
generation sets up, or with ``--train`` one training step (forward, loss, backward, optimizer step). The model
runs for real: random or checkpoint weights on the CPU when small, shapes only on meta otherwise; ``--tp N``
measures every rank on meta in a fake N-rank world. ``--max-batch``/``--max-tokens`` search the algebra for
the largest size whose peak fits ``--device-memory`` bytes or the ``--hardware`` entry's memory, then measure
that size (on meta unless ``--device`` says otherwise).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace

import torch

from llama_ref.guards import resolve_compute_dtype
from llama_ref.memory import available_memory_bytes, format_bytes
from llama_ref.memory_algebra import LOSSES, OPTIMIZERS, MemoryRequest, largest_fitting

from ..memory_check import check, measure_for
from ..memory_report import render_csv, render_table, to_json
from ..studies.hardware import HARDWARE_NAMES, table_memory_bytes
from .common import (EXIT_DISAGREE, EXIT_OK, BadInput, add_model_arguments, check_int, check_output_file,
                     write_output)
from .models import DTYPES, build_model, choose_device, resolve_model

HELP = "memory of a forward or a training step: exact per category and layer, measured; the largest batch that fits"
DEFAULT_TOKENS = 128

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"new tokens N per sequence (default {DEFAULT_TOKENS})")
    p.add_argument("--batch", type=int, default=1, help="batch size B")
    p.add_argument("--cached", type=int, default=0, help="positions C already in the KV cache (a decode step: --tokens 1)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="weight dtype (default: fp32 on cpu, bf16 on meta)")
    p.add_argument("--kernel", default="math", choices=("math", "sdpa"), help="attention kernel")
    p.add_argument("--logits", default="all", choices=("all", "last"),
                   help="logits of every position, or of the last only (what generation computes)")
    train = p.add_argument_group("training step (forward + loss + backward + optimizer step)")
    train.add_argument("--train", action="store_true", help="one training step of --batch x --tokens")
    train.add_argument("--optimizer", default=None, choices=OPTIMIZERS, help="optimizer stepped (default adamw)")
    train.add_argument("--recompute", action="store_true", help="activation checkpointing per decoder layer")
    train.add_argument("--loss", default=None, choices=LOSSES, help="the step's loss (default cross-entropy)")
    p.add_argument("--tp", type=int, default=None, metavar="N", help="per rank of an N-way tensor-parallel model")
    size = p.add_argument_group("the largest size that fits")
    size.add_argument("--hardware", default=None, choices=HARDWARE_NAMES, help="device whose memory to fill")
    size.add_argument("--device-memory", default=None, metavar="BYTES", help="device memory in bytes (e.g. 85899345920)")
    size.add_argument("--max-batch", action="store_true", help="the largest --batch whose peak fits")
    size.add_argument("--max-tokens", action="store_true", help="the largest --tokens (context) whose peak fits")
    p.add_argument("--device", default=None, help="where to measure: cpu, meta or cuda[:N] (default: chosen by size)")
    p.add_argument("--no-measure", action="store_true", help="the algebra only (no model is run)")
    p.add_argument("--format", default="table", choices=("table", "json", "csv"), help="output format")
    p.add_argument("--out", default=None, help="write the output to this file instead of stdout")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights and tokens")


def parse_bytes(text: str) -> int:
    """A positive whole number of bytes: digits, optionally with ``_`` separators, or a power like ``80*2**30``
    is refused (give the number)."""
    cleaned = text.replace("_", "").strip()
    if not cleaned.isdigit() or not cleaned.isascii():
        raise BadInput(f"bad --device-memory {text!r}: give a whole number of bytes, e.g. 85899345920")
    value = int(cleaned)
    if value <= 0:
        raise BadInput(f"--device-memory must be at least 1 byte, got {text!r}")
    return value


def _check_arguments(args: argparse.Namespace) -> None:
    check_int("tokens", args.tokens, 1)
    check_int("batch", args.batch, 1)
    check_int("cached", args.cached, 0)
    check_int("seed", args.seed, 0, (1 << 63) - 1)
    if args.tp is not None:
        check_int("tp", args.tp, 1, 1 << 16)
    if not args.train:
        given = [name for name, value in (("--optimizer", args.optimizer), ("--loss", args.loss),
                                          ("--recompute", args.recompute or None)) if value is not None]
        if given:
            raise BadInput(f"{' and '.join(given)} describe a training step: add --train")
    else:
        if args.cached:
            raise BadInput(f"--train measures a training step, which has no KV cache: --cached must be 0, got "
                           f"{args.cached}")
        if args.logits == "last":
            raise BadInput("--logits last is what generation computes; a training step needs every position's logits")
    if args.max_batch and args.max_tokens:
        raise BadInput("--max-batch and --max-tokens: choose one (the other size stays as given)")
    if args.hardware is not None and args.device_memory is not None:
        raise BadInput("--hardware and --device-memory both say how much memory there is: give one")
    if args.device_memory is not None:
        args.device_memory = parse_bytes(args.device_memory)
    if (args.hardware is not None or args.device_memory is not None) and not (args.max_batch or args.max_tokens):
        raise BadInput("--hardware/--device-memory size a search: add --max-batch or --max-tokens")
    if args.max_tokens and args.cached and not args.train:
        pass  # the context searched is --tokens after the --cached positions
    check_output_file(args.out)


def _memory_to_fill(args: argparse.Namespace) -> tuple[int, str, str]:
    """(bytes, where they come from, the device type sized for)."""
    if args.device_memory is not None:
        device_type = "cpu" if (args.device or "").startswith("cpu") else "cuda"
        return args.device_memory, "--device-memory", device_type
    if args.hardware is not None:
        if args.hardware == "cpu":
            avail = available_memory_bytes("cpu")
            if avail is None:
                raise BadInput("--hardware cpu: this machine's available memory is unknown; give --device-memory")
            return avail, "MemAvailable in /proc/meminfo (--hardware cpu)", "cpu"
        return table_memory_bytes(args.hardware), f"the hardware table's {args.hardware}", "cuda"
    device = torch.device(args.device) if args.device and args.device.strip() not in ("", "meta") else None
    if device is not None and device.type in ("cpu", "cuda"):
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BadInput(f"--device {args.device}: no CUDA device available (this torch sees none)")
        avail = (torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else available_memory_bytes("cpu"))
        if avail is not None:
            return int(avail), f"the memory of {device}", device.type
    raise BadInput("--max-batch/--max-tokens need the memory to fill: --hardware H, --device-memory BYTES, or "
                   "--device cpu|cuda")


def run(args: argparse.Namespace) -> int:
    _check_arguments(args)
    source = resolve_model(args.model, vocab_size=args.vocab_size, revision=args.revision)
    config = source.config
    tp = args.tp or 1
    end = args.cached + args.tokens
    if end > config.max_seq_len:
        raise BadInput(f"--cached {args.cached} + --tokens {args.tokens} = {end} exceeds the model's max_seq_len "
                       f"{config.max_seq_len}")
    searching = args.max_batch or args.max_tokens
    fill = _memory_to_fill(args) if searching else None
    weight_dtype = DTYPES[args.dtype] if args.dtype else None
    train = dict(train=args.train, loss=args.loss or "cross-entropy", recompute=args.recompute,
                 optimizer=args.optimizer or "adamw")
    base = MemoryRequest(config, batch=args.batch, seqlen=args.tokens, start_pos=args.cached, attn_kernel=args.kernel,
                         weight_dtype=weight_dtype or torch.bfloat16, last_only=args.logits == "last", tp=tp, **train)

    extra: dict = {"model_source": {"spec": args.model, "kind": source.kind, "checkpoint_dir": source.checkpoint_dir}}
    footer: list = []
    if searching:
        memory_bytes, memory_source, sizing_type = fill
        sizing_dtype = weight_dtype or torch.bfloat16
        if sizing_type == "cuda" and not torch.cuda.is_available():
            # A GPU of the hardware table (or --device-memory), not this machine's: every one of them (sm80+)
            # multiplies fp16 and bf16 natively, so "auto" would compute in the weight dtype there.
            compute = sizing_dtype if sizing_dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
        else:
            compute, _why = resolve_compute_dtype("auto", torch.device(sizing_type), sizing_dtype)
        sizing = replace(base, weight_dtype=sizing_dtype, compute_dtype=compute, device_type=sizing_type)
        what = "batch" if args.max_batch else "tokens"  # the CLI's words (--batch, --tokens)
        best, at = largest_fitting(sizing, "batch" if args.max_batch else "seqlen", memory_bytes)
        key = "max_batch" if args.max_batch else "max_tokens"
        extra.update({key: best, "device_memory_bytes": memory_bytes, "device_memory_source": memory_source,
                      "sizing": {"device_type": sizing_type, "compute_dtype": str(compute).replace("torch.", ""),
                                 "peak_bytes": None if at is None else at.peak,
                                 "where": None if at is None else str(at.where)}})
        if best == 0:
            footer.append(f"{key.replace('_', ' ')}: nothing fits: --{what} 1 already needs more than "
                          f"{format_bytes(memory_bytes)} ({memory_source})")
            return _emit(args, [], extra, footer, title=f"{config.name}: nothing fits")
        footer.append(f"{key.replace('_', ' ')}: {best:,} ({what} whose peak fits {format_bytes(memory_bytes)}, "
                      f"{memory_source}, sized as {sizing_type}: peak {format_bytes(at.peak)} at {at.where})")
        base = replace(base, **{"batch" if args.max_batch else "seqlen": best})
        if args.device is None:
            args.device = "meta"  # the size fills another device: measure it shape-only

    if args.no_measure:
        device_type = args.device.split(":")[0] if args.device else "cpu"
        compute, _why = resolve_compute_dtype("auto", torch.device(device_type), base.weight_dtype)
        checks = [check(replace(base, weight_dtype=weight_dtype or base.weight_dtype, compute_dtype=compute,
                                device_type=device_type if device_type in ("cpu", "cuda", "meta") else "cpu"), None)]
        return _emit(args, checks, extra, footer, title=_title(checks[0], "analytic only"))
    if tp > 1:
        checks = _measure_ranks(args, source, base, weight_dtype)
    else:
        dtype_bytes = weight_dtype.itemsize if weight_dtype else (4 if not source.has_weights else 2)
        device, reason = choose_device(args.device, source, dtype_bytes, batch=base.batch, seqlen=base.seqlen,
                                       start_pos=base.start_pos, attn_kernel=args.kernel,
                                       training=_training(args) if args.train else None)
        logger.info("device %s: %s", device, reason)
        extra["device_reason"] = reason
        model, weights = build_model(source, device=device, dtype=weight_dtype, schedule=None, attn_kernel=args.kernel,
                                     seed=args.seed)
        extra["weights"] = weights
        request = _for_model(base, model)
        checks = [check(request, measure_for(model, request, seed=args.seed))]
    return _emit(args, checks, extra, footer, title=_title(checks[0], f"measured on {checks[0].breakdown.request.device_type}"))


def _training(args):
    from ..training import Training

    return Training(loss=args.loss or "cross-entropy", recompute=args.recompute)


def _for_model(base: MemoryRequest, model) -> MemoryRequest:
    """The request as ``model`` runs it: its weight and compute dtypes and its device."""
    return replace(base, weight_dtype=model.tok_embeddings.weight.dtype, compute_dtype=model.compute_dtype,
                   device_type=model.device.type)


def _measure_ranks(args, source, base: MemoryRequest, weight_dtype) -> list:
    """Every rank of a ``base.tp``-way model on meta, each as rank r of a fake world (shapes only)."""
    from llama_ref.parallel import fake_world, tensor_parallel_llama

    if args.device is not None and args.device.strip() != "meta":
        raise BadInput(f"--tp {base.tp} measures each rank on meta (a fake {base.tp}-rank world): drop --device "
                       f"{args.device} or use --device meta")
    replace(base, device_type="meta").program()  # every divisibility problem, before any rank is built
    checks = []
    for rank in range(base.tp):
        with fake_world(base.tp, rank=rank) as group:
            model = tensor_parallel_llama(source.config, group=group, device="meta",
                                          dtype=weight_dtype or torch.bfloat16, attn_kernel=args.kernel)
            request = _for_model(base, model)
            checks.append(check(request, measure_for(model, request, allocator=False, seed=args.seed)))
    return checks


def _title(c, how: str) -> str:
    r = c.breakdown.request
    what = ("training step" + (" with recompute" if r.recompute else "") + f", {r.loss} loss, optimizer {r.optimizer}"
            if r.train else f"{r.seqlen:,} new + {r.start_pos:,} cached tokens, KV cache, "
                            f"{'last-position' if r.last_only else 'all'} logits")
    dt = lambda d: str(d).replace("torch.", "")  # noqa: E731
    return (f"{r.config.name}: batch {r.batch:,}, {r.seqlen:,} tokens, {what}; weights {dt(r.weight_dtype)}, "
            f"activations {dt(r.compute_dtype or r.weight_dtype)}, kernel {r.attn_kernel}"
            f"{f', tensor parallel {r.tp} ranks' if r.tp > 1 else ''}; {how}")


def _emit(args, checks: list, extra: dict, footer: list, *, title: str) -> int:
    if args.format == "json":
        if checks:
            doc = to_json(checks, extra=extra)
        else:
            doc = {"schema": "llama-ref.memory/1", "agree": True, **extra}
        text = json.dumps(doc, indent=2) + "\n"
    elif args.format == "csv":
        text = render_csv(checks) if checks else "rank,row,analytic_bytes,measured_bytes,agree,source\n"
    else:
        text = render_table(checks, title=title, footer=footer) if checks else "\n".join([title, *footer]) + "\n"
    agree = all(c.agree for c in checks)
    if args.out:
        write_output(args.out, text)
        print(f"wrote {args.out}: {'memory agrees' if agree else 'memory DISAGREES'}")
    else:
        sys.stdout.write(text)
    if not agree:
        bad = [m for c in checks for m in c.mismatches()]
        print(f"llama-ref memory: analytic and measured disagree: {len(bad)} mismatch(es), first: {bad[0]}",
              file=sys.stderr)
        return EXIT_DISAGREE
    return EXIT_OK

