"""``llama-ref count``: count one forward with every counter and prove they agree, row by row."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from llama_ref.schedule import format_schedule, resolve_schedule

from ..crosscheck import crosscheck, crosscheck_generation
from ..generation import Generation
from .models import DTYPES, build_model, choose_device, resolve_model
from ..report import render_csv, render_table, to_json
from ..result import COUNTER_NAMES
from ..training import LOSSES, Training
from . import count_tp
from .common import (EXIT_DISAGREE, EXIT_OK, BadInput, add_model_arguments, check_int, check_output_file,
                     write_output)

HELP = "count MACs/FLOPs per layer with several counters and check they agree"
DEFAULT_TOKENS = 128

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"new tokens N per sequence (default {DEFAULT_TOKENS})")
    p.add_argument("--cached", type=int, default=0, help="cached tokens C before them (prefilled, not counted)")
    p.add_argument("--batch", type=int, default=1, help="batch size B")
    p.add_argument("--schedule", default=None, help="layer schedule: preset name or list like '0-23,27-31' (default all)")
    p.add_argument("--device", default=None, help="cpu, cuda[:N] or meta (default: chosen by size)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="weight dtype")
    p.add_argument("--counters", default=None, help=f"comma list of {','.join(COUNTER_NAMES)} (default: all)")
    p.add_argument("--format", default="table", choices=("table", "json", "csv"), help="output format")
    p.add_argument("--out", default=None, help="write the output to this file instead of stdout")
    p.add_argument("--kernel", default="math", choices=("math", "sdpa"), help="attention kernel")
    p.add_argument("--strict", action="store_true", help="fail (exit 3) on any op or module without a formula")
    p.add_argument("--detail", action="store_true", help="per-module rows instead of one line per layer run")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights and tokens")
    train = p.add_argument_group("training step (forward + loss + backward)")
    train.add_argument("--train", action="store_true",
                       help="count one training step of --batch x --tokens: forward, backward and loss, per row")
    train.add_argument("--loss", default="cross-entropy", choices=LOSSES, help="the step's loss (with --train)")
    train.add_argument("--recompute", action="store_true",
                       help="activation checkpointing per decoder layer (with --train): executed vs model work")
    task = p.add_argument_group("a whole inference task (the real generation loop)")
    task.add_argument("--prompt", type=int, default=None, metavar="P",
                      help="prompt tokens per sequence; with --generate: prefill of P tokens + decode steps")
    task.add_argument("--generate", type=int, default=None, metavar="G", help="new tokens to generate (with --prompt)")
    task.add_argument("--all-logits", action="store_true",
                      help="the prefill computes every prompt position's logits (scoring the prompt), not the last "
                           "position's only as generation does")
    count_tp.add_arguments(p)


def parse_counters(text):
    if text is None:
        return list(COUNTER_NAMES)
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in COUNTER_NAMES]
    if bad or not names:
        raise BadInput(f"bad --counters {text!r}: choose from {','.join(COUNTER_NAMES)}")
    if len(set(names)) != len(names):
        raise BadInput(f"bad --counters {text!r}: a counter is listed twice")
    return names


def run(args: argparse.Namespace) -> int:
    # ---- every input checked before any model work: bad input -> exit 2, one line
    check_int("tokens", args.tokens, 1)
    check_int("cached", args.cached, 0)
    check_int("batch", args.batch, 1)
    check_int("seed", args.seed, 0, (1 << 63) - 1)
    names = parse_counters(args.counters)
    generation = None
    if (args.prompt is None) != (args.generate is None):
        raise BadInput("--prompt P and --generate G go together (a prefill of P tokens, then G new tokens)")
    if args.prompt is not None:
        check_int("prompt", args.prompt, 1)
        check_int("generate", args.generate, 1)
        if args.train or args.cached:
            raise BadInput("--prompt/--generate count a whole generation (its own prefill and cache): "
                           "drop --train and --cached")
        if args.tokens != DEFAULT_TOKENS:
            raise BadInput("--tokens does not apply to --prompt/--generate (the prompt is --prompt P tokens)")
        if args.counters is None:
            names = ["analytic", "hooks", "torch"]
        elif "fvcore" in names:
            raise BadInput("--counters fvcore: fvcore traces one forward and cannot follow a generation loop")
        generation = Generation(args.prompt, args.generate, all_logits=args.all_logits)
    elif args.all_logits:
        raise BadInput("--all-logits describes the prefill of a generation: add --prompt P --generate G")
    training = None
    if args.train:
        if args.cached:
            raise BadInput(f"--train counts a training step, which has no KV cache: --cached must be 0, got {args.cached}")
        training = Training(loss=args.loss, recompute=args.recompute)
    elif args.recompute or args.loss != "cross-entropy":
        raise BadInput("--recompute and --loss describe a training step: add --train")
    check_output_file(args.out)
    if args.tp is not None:  # every rank of a tensor-parallel model (counters/commands/count_tp.py)
        return count_tp.run(args, names=names, training=training, generation=generation)
    source = resolve_model(args.model, vocab_size=args.vocab_size, revision=args.revision)
    config = source.config
    schedule = resolve_schedule(args.schedule, config.n_layers)
    end = generation.length if generation else args.cached + args.tokens
    if end > config.max_seq_len:
        what = (f"--prompt {args.prompt} + --generate {args.generate}" if generation
                else f"--cached {args.cached} + --tokens {args.tokens}")
        raise BadInput(f"{what} = {end} exceeds the model's max_seq_len {config.max_seq_len}")
    dtype = DTYPES[args.dtype] if args.dtype else None
    dtype_bytes = dtype.itemsize if dtype else (4 if not source.has_weights else 2)
    device, reason = choose_device(args.device, source, dtype_bytes, batch=args.batch,
                                   seqlen=generation.length if generation else args.tokens,
                                   start_pos=0 if generation else args.cached, n_runs=len(schedule),
                                   attn_kernel=args.kernel, training=training)

    logger.info("device %s: %s", device, reason)
    model, weights = build_model(source, device=device, dtype=dtype, schedule=schedule, attn_kernel=args.kernel,
                                 seed=args.seed)
    if device == "meta":
        tokens = torch.zeros((args.batch, args.tokens), dtype=torch.long, device="meta")
    else:
        gen = torch.Generator().manual_seed(args.seed)
        tokens = torch.randint(0, config.vocab_size, (args.batch, args.tokens), generator=gen).to(device)
    if generation:
        report = crosscheck_generation(model, batch=args.batch, generation=generation, counters=names,
                                       strict=args.strict, seed=args.seed)
    else:
        report = crosscheck(model, tokens, start_pos=args.cached, counters=names, strict=args.strict,
                            training=training, weight_dtype_bytes=model.tok_embeddings.weight.dtype.itemsize,
                            act_dtype_bytes=model.compute_dtype.itemsize)
    report.device = device
    report.dtype = str(model.tok_embeddings.weight.dtype).replace("torch.", "")
    report.attn_kernel = args.kernel

    if args.format == "json":
        extra = {"model_source": {"spec": args.model, "kind": source.kind, "checkpoint_dir": source.checkpoint_dir},
                 "weights": weights, "device_reason": reason}
        text = json.dumps(to_json(report, extra=extra), indent=2) + "\n"
    elif args.format == "csv":
        text = render_csv(report, detail=True)  # CSV is for machines: always one line per module row
    else:
        what = ("training step" if training else f"prompt {args.prompt}, {args.generate} new tokens" if generation
                else f"{args.tokens} new + {args.cached} cached tokens")
        if training:
            what = f"{args.tokens} tokens, {what}"
        title = (f"{config.name}: schedule {format_schedule(schedule)} ({len(schedule)} layer runs), "
                 f"batch {args.batch}, {what}, device {device} ({weights}, {report.dtype}), kernel {args.kernel}")
        text = render_table(report, detail=args.detail, title=title) + "\n"
    if args.out:
        write_output(args.out, text)
        verdict = "counters agree" if report.agree else f"counters DISAGREE ({len(report.mismatches)} mismatches)"
        print(f"wrote {args.out}: {verdict}; MACs {report.totals[report.reference]['macs']:,}")
    else:
        sys.stdout.write(text)
    if not report.agree:
        first = report.mismatches[0]
        print(f"llama-ref count: counters disagree: {len(report.mismatches)} mismatch(es), first: {first}",
              file=sys.stderr)
        return EXIT_DISAGREE
    return EXIT_OK
