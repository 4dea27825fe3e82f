"""``llama-ref roofline``: per-layer FLOPs, bytes, intensity, bound and predicted time on a device.

Measurement (``--measure``) times every layer run of a locally built model with forward pre/post
hooks (CUDA events on CUDA, ``perf_counter`` elsewhere), median over warm repeats. Weights are
random (timings do not depend on their values). A model is only measured when it fits in the
device's free memory: 7B in fp32 needs ~27 GB, more than a 24 GiB CPU box; use ``--layers K`` to
measure the first K layers of the same shape (every decoder layer of a model costs the same), or
drop ``--measure`` for the prediction alone, which needs no memory (no model is built).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Optional, Union

import torch

from llama_ref.config_files import load_json_file

from ..analytic import analyze
from ..commands.common import (EXIT_OK, BadInput, add_model_arguments, check_input_file, check_int, check_output_dir,
                               write_output)
from ..commands.models import resolve_model
from ..table import BLOCK_ROWS, TOP_ROWS_AFTER, TOP_ROWS_BEFORE, RowKey
from .factory import check_measure_memory, measure
from .hardware import (DTYPE_BYTES, DTYPE_NAMES, HARDWARE_NAMES, LINK_NAMES, available_cpus, get_hardware,
                       get_link)
from .plots import (default_contexts, default_schedules, family_of, plot_family_macs_vs_context, plot_macs_vs_context,
                    plot_roofline)
from .roofline import format_table, roofline_table, summarize

HELP = "per-layer FLOPs, bytes, intensity, bound and predicted time on a device (the roofline)"
MAX_REPEATS = 10_000
#: Row names a timings file may use: every table row, a layer run ("block"), and the timer's own rows.
TIMING_ROWS = frozenset({r.name for r in TOP_ROWS_BEFORE + BLOCK_ROWS + TOP_ROWS_AFTER} | {"block", "(total)"})


def load_timings(path: Union[str, os.PathLike], *, seqlen: Optional[int] = None,
                 start_pos: Optional[int] = None, attn_kernel: Optional[str] = None) -> dict[RowKey, float]:
    """Measured seconds per row from a JSON file written by ``llama-ref roofline --measure`` or
    ``scripts/validate_gpu.py``: a top-level ``"layers"`` list of ``{position, module, measured_s}``,
    or ``"phases"`` (a list of such objects with ``seqlen``/``start_pos``; the one matching is used).
    Every malformed part is a :class:`BadInput` naming the file and the field."""
    where = os.fspath(path)
    try:
        data = load_json_file(path, "timings file")
    except (ValueError, OSError) as e:  # missing, a directory or FIFO, unreadable, not UTF-8 / JSON: names the file
        raise BadInput(f"--timings {e}") from None
    if isinstance(data, dict) and "phases" in data:
        phases = data["phases"]
        if not isinstance(phases, list) or not all(isinstance(p, dict) for p in phases):
            raise BadInput(f"--timings {where}: 'phases' must be a list of objects")
        match = [p for p in phases
                 if (seqlen is None or p.get("n_tokens") == seqlen)
                 and (start_pos is None or p.get("n_cached") == start_pos)
                 and (attn_kernel is None or p.get("attn_kernel", attn_kernel) == attn_kernel)]
        if not match:
            have = ", ".join(f"N={p.get('n_tokens')} C={p.get('n_cached')}"
                             + (f" {p['attn_kernel']}" if "attn_kernel" in p else "") for p in phases) or "none"
            want = f"N={seqlen} C={start_pos}" + (f" kernel {attn_kernel}" if attn_kernel else "")
            raise BadInput(f"--timings {where}: no timings for {want} (file has: {_cut(have)})")
        data = match[0]
    rows = data.get("layers") if isinstance(data, dict) else data
    if not isinstance(rows, list):
        raise BadInput(f"--timings {where}: expected a 'layers' list of {{position, module, measured_s}}")
    out: dict[RowKey, float] = {}
    for i, r in enumerate(rows):
        field = f"--timings {where}: layers[{i}]"
        if not isinstance(r, dict):
            raise BadInput(f"{field} is {_cut(repr(r), 40)}, expected an object {{position, module, measured_s}}")
        module, position = r.get("module"), r.get("position")
        if not isinstance(module, str) or module not in TIMING_ROWS:
            raise BadInput(f"{field}.module is {_cut(repr(module), 60)}, not a row name "
                           f"({', '.join(sorted(TIMING_ROWS))})")
        if position is not None and (isinstance(position, bool) or not isinstance(position, int) or position < 0):
            raise BadInput(f"{field}.position is {_cut(repr(position), 60)}, expected null or a non-negative int")
        s = r.get("measured_s", r.get("seconds"))
        if s is None:
            continue
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not _finite(s) or s < 0:
            raise BadInput(f"{field}.measured_s is {_cut(repr(s), 60)}, expected a finite number of seconds >= 0")
        out[(position, module)] = float(s)
    return out


def _finite(x) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond a float's range
        return False


def _cut(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def check_timings_match(measured: dict[RowKey, float], rows, where: str, level: str) -> None:
    """Every timed row must be a row of this roofline: a timing for position 40 of a 4-layer run, or module
    rows against ``--level layer``, would otherwise be dropped without a word (another model, schedule or
    level than the one the file was measured with)."""
    keys = {(r.position, r.module) for r in rows}
    stray = [k for k in measured if k not in keys and k[1] != "(total)"]
    if stray:
        runs = len({r.position for r in rows if r.position is not None})
        shown = ", ".join(f"(position {p}, {m})" for p, m in stray[:3]) + (" ..." if len(stray) > 3 else "")
        raise BadInput(f"--timings {where}: {len(stray)} timed row(s) match no row of this roofline "
                       f"({runs} layer runs, --level {level}): {shown}; is it the same model, --schedule "
                       "and --level?")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--hardware", default="h100-sxm", choices=HARDWARE_NAMES,
                        help="peak table entry, or 'cpu' to measure this machine (default: h100-sxm)")
    parser.add_argument("--tokens", "-N", type=int, default=2048, help="new tokens per sequence (default 2048)")
    parser.add_argument("--cached", "-C", type=int, default=0, help="cached positions before them (default 0)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--schedule", default=None, help="layer schedule: preset name or list like '0-23,27-31'")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None,
                        help="compute/weight dtype: bytes per element and which peak (default bf16 on GPUs, fp32 on cpu)")
    parser.add_argument("--kv-dtype", choices=sorted(DTYPE_NAMES), default=None, help="KV cache dtype (default: --dtype)")
    parser.add_argument("--level", choices=("layer", "module"), default="layer",
                        help="one row per layer run (default) or per module")
    parser.add_argument("--layers", type=int, default=None,
                        help="use only the first K decoder layers (same shapes): lets --measure fit in memory")
    parser.add_argument("--measure", action="store_true",
                        help="also time each layer run on this machine (cpu for --hardware cpu, else CUDA)")
    parser.add_argument("--timings", default=None, help="JSON with measured per-layer seconds to plot beside the prediction")
    parser.add_argument("--attn-kernel", choices=("math", "sdpa"), default="math",
                        help="kernel for --measure, and the phase of a --timings file to plot when it has both")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for CPU measurement")
    parser.add_argument("--out", default="out/roofline",
                        help="directory for roofline.json and the PNGs (default out/roofline)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNGs")
    tp = parser.add_argument_group("tensor parallelism (one rank of an N-way model, Meta's layout)")
    tp.add_argument("--tp", type=int, default=None, metavar="N",
                    help="predict one rank of N: its share of the work plus its collectives over --link-bandwidth")
    tp.add_argument("--link-bandwidth", default=None, metavar="GBPS|PRESET",
                    help=f"GB/s per GPU and direction, or one of {', '.join(LINK_NAMES)} (with --tp)")
    tp.add_argument("--link-latency-us", type=float, default=0.0,
                    help="latency per collective in microseconds (default 0: the bandwidth model alone)")


def run(args: argparse.Namespace) -> int:
    # ---- every input checked before any work
    check_int("tokens", args.tokens, 1)
    check_int("cached", args.cached, 0)
    check_int("batch", args.batch, 1)
    check_int("warmup", args.warmup, 0, MAX_REPEATS)
    check_int("repeats", args.repeats, 1, MAX_REPEATS)
    if args.threads is not None:
        # More threads than CPUs only measures oversubscription (and 4096 threads take minutes to start).
        check_int("threads", args.threads, 1, available_cpus())
    if args.measure and args.timings:
        raise BadInput("--measure and --timings both give measured times: choose one")
    check_input_file(args.timings, "--timings")
    link = None
    if args.tp is not None:
        check_int("tp", args.tp, 1, 1 << 12)
        if args.link_bandwidth is None:
            raise BadInput(f"--tp {args.tp}: give the link the ranks communicate over, --link-bandwidth GB/s or "
                           f"a preset ({', '.join(LINK_NAMES)})")
        if args.measure or args.timings:
            raise BadInput("--tp predicts one rank of a tensor-parallel model: --measure and --timings time a "
                           "single process here, not comparable; drop one of them")
        latency = args.link_latency_us
        if not (math.isfinite(latency) and 0 <= latency <= 1e9):  # NaN fails every comparison
            raise BadInput(f"--link-latency-us must be a finite number of microseconds >= 0 (at most 1e9), got {latency}")
        link = get_link(args.link_bandwidth, latency * 1e-6)
    elif args.link_bandwidth is not None or args.link_latency_us != 0.0:
        raise BadInput("--link-bandwidth and --link-latency-us describe tensor-parallel ranks: add --tp N")
    check_output_dir(args.out)
    config = resolve_model(args.model, vocab_size=args.vocab_size, revision=args.revision).config
    family = family_of(config)  # of the whole model, before --layers cuts it
    if args.layers is not None:
        check_int("layers", args.layers, 1, config.n_layers)
        config = config.replace(n_layers=args.layers, name=f"{config.name}[:{args.layers} layers]")
    end = args.cached + args.tokens
    if end > config.max_seq_len:
        raise BadInput(f"--cached {args.cached} + --tokens {args.tokens} = {end} exceeds the model's "
                       f"max_seq_len {config.max_seq_len}")
    dtype = args.dtype or ("fp32" if args.hardware == "cpu" else "bf16")
    kv_dtype = args.kv_dtype or dtype
    if args.measure and args.hardware != "cpu" and not torch.cuda.is_available():
        raise BadInput(f"--measure with --hardware {args.hardware} needs a CUDA device and none is available; "
                       "use --hardware cpu to measure this machine")
    device = "cpu" if args.hardware == "cpu" else "cuda"
    if args.measure:  # before the hardware peaks are measured (seconds) or anything is built
        check_measure_memory(config, device=device, dtype=DTYPE_NAMES[dtype], batch=args.batch, seqlen=args.tokens,
                             start_pos=args.cached, schedule=args.schedule, attn_kernel=args.attn_kernel)
    report = analyze(config, batch=args.batch, seqlen=args.tokens, start_pos=args.cached, schedule=args.schedule,
                     weight_dtype_bytes=DTYPE_BYTES[dtype], act_dtype_bytes=DTYPE_BYTES[dtype],
                     kv_dtype_bytes=DTYPE_BYTES[kv_dtype], tp=args.tp)
    rows = report.layer_runs() if args.level == "layer" else report.rows
    measured = None
    if args.timings:
        measured = load_timings(args.timings, seqlen=args.tokens, start_pos=args.cached, attn_kernel=args.attn_kernel)
        check_timings_match(measured, rows, args.timings, args.level)
    if args.threads:
        torch.set_num_threads(args.threads)
    hw = get_hardware(args.hardware, dtype)

    measurement = {"source": str(args.timings)} if args.timings else None
    if args.measure:
        if dtype == "tf32":
            torch.backends.cuda.matmul.allow_tf32 = True
        timing = measure(config, device=device, dtype=DTYPE_NAMES[dtype], batch=args.batch, seqlen=args.tokens,
                         start_pos=args.cached, schedule=args.schedule, attn_kernel=args.attn_kernel,
                         warmup=args.warmup, repeats=args.repeats, level=args.level)
        measured = timing.median
        measurement = {"device": device, "attn_kernel": args.attn_kernel, "warmup": args.warmup,
                       "repeats": args.repeats, "threads": torch.get_num_threads(), "total_s": timing.total_s,
                       "weights": "random (timings do not depend on values)"}

    table = roofline_table(rows, hw, measured, report.collectives, link)
    summary = summarize(table, batch=args.batch, seqlen=args.tokens, link=link)
    title = (f"{config.name} on {hw.name} ({dtype}): batch {args.batch}, N={args.tokens} new, C={args.cached} cached, "
             f"schedule {report.schedule_str}" + ("" if args.tp is None else f", one rank of {args.tp} (tensor parallel)"))
    print(title)
    print(format_table(table, hw, summary, link))

    out = Path(args.out)
    plots = {}
    curves = contexts = family_doc = None
    if not args.no_plot:
        detail = []
        if args.level == "layer":  # the modules of the first layer run, for orientation
            detail = roofline_table([r for r in report.rows if r.position == 0], hw, None, report.collectives, link)
        schedules = default_schedules(config, args.schedule)
        contexts = default_contexts(config.max_seq_len)
        try:
            plots["roofline"] = str(plot_roofline(table, hw, out / "roofline.png", title=title, detail=detail))
            path, curves = plot_macs_vs_context(config, out / "macs_vs_context.png", schedules=schedules,
                                                contexts=contexts)
        except OSError as e:
            raise BadInput(f"--out {args.out}: cannot write a plot ({e.strerror or e})") from None
        plots["macs_vs_context"] = str(path)
        if family is not None:
            fam, preset = family
            path, fam_curves = plot_family_macs_vs_context(fam, out / "macs_vs_context_family.png", highlight=preset)
            plots["macs_vs_context_family"] = str(path)
            family_doc = {"family": fam.key, "title": fam.title, "model_preset": preset,
                          "presets": {n: {"contexts": c.contexts, "macs": c.macs, "a_macs": c.a, "b_macs": c.b}
                                      for n, c in fam_curves.items()}}
        else:
            print(f"no preset family has the shape of {config.name}: no macs_vs_context_family.png")
    doc = {
        "model": {**config.to_dict(), "name": config.name},
        "schedule": report.schedule_str,
        "batch": args.batch, "n_tokens": args.tokens, "n_cached": args.cached,
        "dtype": dtype, "kv_dtype": kv_dtype, "level": args.level,
        "compute_dtype": dtype, "compute_dtype_reason": f"{dtype}: given by --dtype (the roofline's activations; "
                                                        "a --measure run computes in it explicitly)",
        "hardware": hw.to_dict(),
        "tp": args.tp,
        "link": None if link is None else link.to_dict(),
        "collectives": None if args.tp is None else [
            {"position": pos, "module": module, **c.to_dict(), "calls": k}
            for (pos, module), per_row in report.collectives.items() for c, k in sorted(per_row.items())],
        "layers": [r.to_dict() for r in table],
        "total": summary,
        "measurement": measurement,
        "macs_per_token_vs_context": None if curves is None else {"contexts": contexts, "schedules": curves},
        # MACs to decode one token vs context for every preset of MODEL's family (each to its own max context)
        "macs_per_token_vs_context_family": family_doc,
        "plots": plots,
    }
    json_path = out / "roofline.json"
    write_output(str(json_path), json.dumps(doc, indent=2))
    print(f"wrote {json_path}" + "".join(f", {p}" for p in plots.values()))
    return EXIT_OK
