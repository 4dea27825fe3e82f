"""``llama-ref mfu``: model FLOPs utilization of a measured throughput, exactly, beside the published formulas.

MFU = T x (model FLOPs per token) / (K x peak FLOP/s of the hardware in the compute dtype), where T is
the total throughput over K devices and the FLOPs per token are the exact count of one sequence of N
tokens divided by N (:mod:`counters.estimates`, from the work table): matrix products only, dense
attention as the math kernel computes it, no recompute; training = forward + backward = 3 x forward,
inference = forward only. With ``--recompute`` (activation checkpointing per decoder layer) also
HFU = T x (executed FLOPs per token) / (K x peak), executed = model + one more forward of every
decoder-layer run.

Every figure is exact: T is read as the decimal it is written as (``3000.5`` is 6001/2), a table peak
is an integer number of FLOP/s, and the ratios are fractions, printed as floats and given exactly in
JSON (``mfu_exact``: ``"p/q"``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from fractions import Fraction
from typing import Any, Optional

from llama_ref.schedule import format_schedule, resolve_schedule

from ..analytic import analyze, macs_polynomial
from ..estimates import (ESTIMATES, FORWARD_ESTIMATES, Exact, exact_executed_flops_per_token,
                         exact_model_flops_per_token, mfu, relative_error)
from .models import resolve_model
from ..studies.hardware import DTYPE_NAMES, HARDWARE_NAMES, Hardware, get_hardware
from .common import EXIT_OK, BadInput, add_model_arguments, check_int

HELP = "MFU (and HFU) of a measured throughput from the exact FLOPs per token, beside the published formulas"
DEFAULT_TOKENS = 2048
#: Far beyond any real job either way (1e-9: one token in about 32 years), and every figure stays a
#: finite, non-zero float in between.
MAX_TOKENS_PER_SECOND = 10 ** 18
MIN_TOKENS_PER_SECOND = Fraction(1, 10 ** 9)
MAX_DEVICES = 1 << 24
# A plain decimal: mantissa and exponent read apart, so that "1e999999999" is never built as a
# billion-digit integer (at most 64 characters: the mantissa alone cannot bring such an exponent back).
_DECIMAL = re.compile(r"(?P<mantissa>\d+(?:\.\d*)?|\.\d+)(?:[eE](?P<exponent>[+-]?\d+))?")
CONVENTIONS = ("model FLOPs = 2 x MACs of matrix products only (non-matmul work is not model FLOPs); attention "
               "dense over the N x N scores of every query head, as the math kernel computes it; training = "
               "forward + backward = 3 x forward MACs, no recompute; inference = forward only; per token = "
               "one sequence of N tokens / N (batch-independent)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--tokens-per-second", "-T", dest="tokens_per_second", required=True, metavar="T",
                   help="measured throughput: tokens per second in total over all --devices (a decimal from 1e-9 "
                        "to 1e18, read exactly)")
    p.add_argument("--hardware", required=True, choices=HARDWARE_NAMES,
                   help="peak table entry, or 'cpu' to measure this machine's matmul peak now")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None,
                   help="compute dtype, which selects the peak (default bf16 for GPUs, fp32 for cpu)")
    p.add_argument("--train", action="store_true",
                   help="a training step: forward + backward = 3 x forward (default: inference, forward only)")
    p.add_argument("--recompute", action="store_true",
                   help="with --train: activation checkpointing per decoder layer (each layer's forward rerun once "
                        "in the backward); adds HFU from the executed FLOPs")
    p.add_argument("--tokens", "-N", type=int, default=None,
                   help=f"tokens per sequence N (default {DEFAULT_TOKENS}, or the model's max_seq_len if shorter)")
    p.add_argument("--devices", "-K", type=int, default=1, help="devices the throughput is spread over (default 1)")
    p.add_argument("--schedule", default=None,
                   help="layer schedule for the exact count: preset name or list like '0-23,27-31' (default all "
                        "layers; the published formulas always assume all layers)")
    p.add_argument("--format", default="table", choices=("table", "json"))


# ---------------------------------------------------------------- input
def parse_tokens_per_second(text: str) -> Fraction:
    """The throughput as the exact decimal written: a positive number from 1e-9 to 1e18."""
    s = text.strip()
    match = _DECIMAL.fullmatch(s) if len(s) <= 64 else None
    if match is None:
        raise BadInput(f"--tokens-per-second must be a positive finite number (a decimal like 3000 or 2.5e4), "
                       f"got {text!r}")
    mantissa = Fraction(match["mantissa"])  # at most 64 digits
    if mantissa == 0:
        raise BadInput(f"--tokens-per-second must be a positive finite number, got {text!r}")
    exponent = int(match["exponent"] or 0)
    # 0 < mantissa < 1e64 and >= 1e-63: beyond +-200 the exponent alone puts the value out of range
    if exponent > 200 or (exponent >= -200 and mantissa * Fraction(10) ** exponent > MAX_TOKENS_PER_SECOND):
        raise BadInput(f"--tokens-per-second must be <= 1e18, got {text!r}")
    if exponent < -200 or mantissa * Fraction(10) ** exponent < MIN_TOKENS_PER_SECOND:
        raise BadInput(f"--tokens-per-second must be >= 1e-9 (one token in about 32 years), got {text!r}")
    return mantissa * Fraction(10) ** exponent


def _exact_str(x: Exact) -> Any:
    """An int stays an int (JSON number); a non-integral fraction becomes ``"p/q"``."""
    x = Fraction(x)
    return int(x) if x.denominator == 1 else str(x)


def _json_number(x: float) -> Any:
    return int(x) if float(x).is_integer() else x


def _pct(err: Fraction) -> str:
    return "exact" if err == 0 else f"{float(err * 100):+.4f}%"


def _flops_rate(x: float) -> str:
    return f"{x / 1e12:,.4g} TFLOP/s" if x >= 1e12 else f"{x / 1e9:,.4g} GFLOP/s"


# ---------------------------------------------------------------- the computation
def compute(config, *, tokens_per_second: Fraction, seqlen: int, hardware: Hardware, devices: int, train: bool,
            recompute: bool, schedule=None) -> dict:
    """Every figure of the command as a JSON-ready dict (exact values as ints or ``"p/q"`` strings)."""
    if recompute and not train:
        raise BadInput("--recompute is activation checkpointing, which only a training step does: add --train")
    order = resolve_schedule(schedule, config.n_layers)
    peak = Fraction(hardware.peak_flops)  # a float, converted exactly
    model_flops = exact_model_flops_per_token(config, seqlen, train=train, schedule=order)
    a, b = macs_polynomial(config, order)
    factor = 6 if train else 2  # 2 FLOPs per MAC, x3 for forward + backward
    linear, attention = factor * a, factor * b * seqlen
    if linear + attention != model_flops:  # two readings of one table: a bug, never a silent wrong number
        raise ArithmeticError(f"{factor} x (a + b x N) = {linear + attention:,} but the table gives {model_flops:,}")
    util = mfu(model_flops, tokens_per_second, peak, devices)
    # The least work any kernel can do for these tokens: the linear layers and the causal half of the scores.
    causal = Fraction(factor * analyze(config, seqlen=seqlen, schedule=order).macs_causal, seqlen)
    floor = mfu(causal, tokens_per_second, peak, devices)
    if floor > 1 and not hardware.measured:
        raise BadInput(
            f"--tokens-per-second {float(tokens_per_second):,.6g} is more than {devices} x {hardware.name} can do "
            f"({hardware.dtype} peak {_flops_rate(hardware.peak_flops)} each): even the linear layers and the causal "
            f"half of the attention need {float(floor):.4g} x the peak (MFU would be {float(util):.4g}); T is the "
            "total over all devices: check T, --devices, --hardware and --dtype")
    doc: dict = {
        "model": config.name, "config": config.to_dict(),
        "mode": "train" if train else "inference", "recompute": recompute,
        "tokens": seqlen, "schedule": format_schedule(order), "layer_runs": len(order),
        "all_layers": list(order) == list(range(config.n_layers)),
        "tokens_per_second": float(tokens_per_second), "tokens_per_second_exact": _exact_str(tokens_per_second),
        "devices": devices, "hardware": hardware.to_dict(), "dtype": hardware.dtype,
        "peak_flops": _json_number(hardware.peak_flops), "peak_flops_total": _exact_str(peak * devices),
        "model_flops_per_token": model_flops,
        "model_flops_parts": {"factor": factor, "matmul_params": a, "matmul_flops_per_token": linear,
                              "attention_macs_per_token_sq": b, "attention_flops_per_token": attention},
        "model_flops_per_second": float(tokens_per_second * model_flops),
        "mfu": float(util), "mfu_exact": str(util),
    }
    top = util
    if recompute:
        executed = exact_executed_flops_per_token(config, seqlen, recompute=True, schedule=order)
        hfu = mfu(executed, tokens_per_second, peak, devices)
        doc.update(executed_flops_per_token=executed, recompute_flops_per_token=executed - model_flops,
                   hfu=float(hfu), hfu_exact=str(hfu))
        top = hfu
    table = ESTIMATES if train else FORWARD_ESTIMATES
    details = {}
    for name, estimate in table.items():
        value = estimate(config, seqlen)
        err = relative_error(value, model_flops)
        got = mfu(value, tokens_per_second, peak, devices)
        details[name] = {"flops_per_token": _exact_str(value), "relative_error": float(err),
                         "relative_error_exact": str(err), "mfu": float(got), "mfu_exact": str(got)}
    doc["estimates"] = {name: d["flops_per_token"] for name, d in details.items()}
    doc["estimate_details"] = details
    doc["estimates_assume"] = f"all {config.n_layers} layers (the published formulas know no schedule)"
    if not train:
        doc["estimates_inference"] = ("each is its training formula's forward share: a third of it (flash-attn: "
                                      "its benchmark's fwd mode)")
    warnings = []
    if top > 1:
        peak_kind = "the measured peak" if hardware.measured else "the peak"
        warnings.append(
            f"{'HFU' if recompute else 'MFU'} {float(top):.4f} is above 1: {float(tokens_per_second):,.6g} tokens/s "
            f"needs more FLOP/s than {peak_kind} of {devices} x {hardware.name} ({hardware.dtype}) by this count; "
            "possible only if the kernels skip work it includes (causal attention skips half the scores)"
            + (" or the measured peak is low" if hardware.measured else "")
            + ". Check T (the total over all devices), --devices, --hardware and --dtype")
    doc["warnings"] = warnings
    doc["conventions"] = CONVENTIONS
    return doc


# ---------------------------------------------------------------- output
def render(doc: dict) -> str:
    hw, parts, train = doc["hardware"], doc["model_flops_parts"], doc["mode"] == "train"
    what = ("training step: forward + backward = 3 x forward" if train else "inference: one forward")
    attn_kernel = "math kernel, dense attention, " + ("activation recompute per layer" if doc["recompute"] else "no recompute")
    layers = (f"all {doc['layer_runs']} layers" if doc["all_layers"]
              else f"schedule {doc['schedule']} ({doc['layer_runs']} layer runs)")
    peak = _flops_rate(hw["peak_flops"]) + (" measured" if hw["measured"] else "")
    w = 30
    lines = [
        f"{doc['model']}: {what} ({attn_kernel})",
        f"N = {doc['tokens']:,} tokens per sequence, {layers}; {doc['tokens_per_second']:,.6g} tokens/s over "
        f"{doc['devices']} x {hw['name']} ({doc['dtype']} peak {peak} each)",
        "",
        f"{'model FLOPs per token':<{w}}{doc['model_flops_per_token']:>22,}  = {parts['factor']} x (a + b x N), "
        "matrix products only",
        f"{'  ' + str(parts['factor']) + ' x matmul params':<{w}}{parts['matmul_flops_per_token']:>22,}  "
        f"(a = {parts['matmul_params']:,} MACs/token: one per weight per use)",
        f"{'  attention, dense':<{w}}{parts['attention_flops_per_token']:>22,}  "
        f"({parts['factor']} x b x N, b = {parts['attention_macs_per_token_sq']:,})",
    ]
    if doc["recompute"]:
        lines.append(f"{'executed FLOPs per token':<{w}}{doc['executed_flops_per_token']:>22,}  = model + "
                     f"{doc['recompute_flops_per_token']:,} (every decoder-layer run's forward again)")
    lines.append(f"{'MFU':<{w}}{doc['mfu']:>22.6f}  = {100 * doc['mfu']:.4f}% "
                 f"({_flops_rate(doc['model_flops_per_second'])} of model FLOPs)")
    if doc["recompute"]:
        lines.append(f"{'HFU (executed FLOPs)':<{w}}{doc['hfu']:>22.6f}  = {100 * doc['hfu']:.4f}%")
    lines += ["", f"{'published estimate':<20}{'FLOPs per token':>24}{'MFU it gives':>14}{'error vs exact':>16}"]
    for name, d in doc["estimate_details"].items():
        value = d["flops_per_token"]
        shown = f"{value:,}" if isinstance(value, int) else f"{float(Fraction(value)):,.2f}"
        lines.append(f"{name:<20}{shown:>24}{d['mfu']:>14.6f}{_pct(Fraction(d['relative_error_exact'])):>16}")
    lines.append(f"The estimates assume {doc['estimates_assume']}.")
    if "estimates_inference" in doc:
        lines.append(f"Inference: {doc['estimates_inference']}.")
    lines += [
              "Their sources and assumptions: docs/errata.md, section \"Training FLOPs\"."]
    lines += [f"WARNING: {w_}" for w_ in doc["warnings"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    # ---- every input checked before any work: bad input -> exit 2, one line
    tokens_per_second = parse_tokens_per_second(args.tokens_per_second)
    check_int("devices", args.devices, 1, MAX_DEVICES)
    if args.tokens is not None:
        check_int("tokens", args.tokens, 1)
    if args.recompute and not args.train:
        raise BadInput("--recompute is activation checkpointing, which only a training step does: add --train")
    source = resolve_model(args.model, vocab_size=args.vocab_size, revision=args.revision)
    config = source.config
    seqlen = args.tokens if args.tokens is not None else min(DEFAULT_TOKENS, config.max_seq_len)
    if seqlen > config.max_seq_len:
        raise BadInput(f"--tokens {seqlen} exceeds the model's max_seq_len {config.max_seq_len}")
    order = resolve_schedule(args.schedule, config.n_layers)
    dtype: Optional[str] = args.dtype or ("fp32" if args.hardware == "cpu" else "bf16")
    hardware = get_hardware(args.hardware, dtype)  # for cpu: measured now, the only work besides arithmetic
    doc = compute(config, tokens_per_second=tokens_per_second, seqlen=seqlen, hardware=hardware,
                  devices=args.devices, train=args.train, recompute=args.recompute, schedule=order)
    doc["model_source"] = {"spec": args.model, "kind": source.kind}
    if args.format == "json":
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        for w in doc["warnings"]:
            print(f"llama-ref mfu: warning: {w}", file=sys.stderr)
    else:
        print(render(doc))
    return EXIT_OK
