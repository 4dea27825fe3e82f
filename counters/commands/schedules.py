"""``llama-ref schedules``: the ``a*N + b*N^2`` MACs of every schedule preset, beside the published figures."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

import torch

from llama_ref.config import PRESETS
from llama_ref.model import Llama
from llama_ref.schedule import SCHEDULE_NAMES, format_schedule, resolve_schedule

from ..analytic import macs_polynomial
from ..hooks import count_hooks
from .models import resolve_model
from ..published import REF000_MACS, REF000_SOURCE
from .common import EXIT_DISAGREE, EXIT_OK, BadInput, add_model_arguments

HELP = "a*N + b*N^2 MACs of every schedule preset vs the published figures"
DEFAULT_MEASURE_TOKENS = "16,48"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, optional=True)
    p.add_argument("--measure", action="store_true",
                   help="confirm a, b by counting with hooks on the meta device at two token counts")
    p.add_argument("--measure-tokens", default=None, help="the two N values of --measure (default 16,48)")
    p.add_argument("--format", default="table", choices=("table", "json"))


def measure_polynomial(model, n1: int, n2: int) -> tuple[int, int]:
    """(a, b) solved exactly from hook counts M(N) = a*N + b*N^2 at two token counts."""
    if not 0 < n1 < n2:
        raise ValueError(f"need 0 < N1 < N2, got {n1}, {n2}")
    device = model.device
    m1 = count_hooks(model, torch.zeros((1, n1), dtype=torch.long, device=device)).total.macs
    m2 = count_hooks(model, torch.zeros((1, n2), dtype=torch.long, device=device)).total.macs
    # m1*n2 - m2*n1 = b*n1*n2*(n1 - n2)
    num = m2 * n1 - m1 * n2
    den = n1 * n2 * (n2 - n1)
    if num % den:
        raise ArithmeticError(f"hook counts {m1} (N={n1}), {m2} (N={n2}) are not of the form a*N + b*N^2")
    b = num // den
    a_num = m1 - b * n1 * n1
    if a_num % n1:
        raise ArithmeticError(f"hook counts {m1} (N={n1}), {m2} (N={n2}) are not of the form a*N + b*N^2")
    return a_num // n1, b


def schedule_rows(config, *, measure: bool = False, measure_tokens: tuple[int, int] = (16, 48)) -> list[dict]:
    """One dict per schedule preset: our a, b; the published ones (reference 000, Llama-2-7B only); ratios."""
    is_7b = config == PRESETS["llama-2-7b"]
    model = None
    rows = []
    for name in SCHEDULE_NAMES:
        row: dict = {"schedule": name}
        try:
            order = resolve_schedule(name, config.n_layers)
        except ValueError as e:
            row.update(error=str(e))
            rows.append(row)
            continue
        a, b = macs_polynomial(config, name)
        row.update(layers=format_schedule(order), runs=len(order), a_macs_per_token=a, b_macs_per_token_sq=b)
        pub = REF000_MACS.get(name) if is_7b else None
        if pub:
            label, pa, pb = pub
            row.update(published_label=label, published_a=pa, published_b=pb, ratio_a=pa / a, ratio_b=pb / b)
        if measure:
            if model is None:
                model = Llama(config, device="meta", dtype=torch.bfloat16)
            model.set_schedule(name)
            ma, mb = measure_polynomial(model, *measure_tokens)
            row.update(measured_a=ma, measured_b=mb, measured_ok=(ma, mb) == (a, b))
        rows.append(row)
    return rows


def render(config, rows: list[dict], measure_tokens: Optional[tuple[int, int]]) -> str:
    lines = [f"{config.name}: MACs of one forward of N tokens (batch 1, empty cache) = a*N + b*N^2",
             "a = projections + MLP + output head per token; b = dense QK^T + attention x V per token^2 "
             "(embedding 0 MACs). Published = " + REF000_SOURCE + "."]
    head = (f"{'schedule':<28} {'runs':>4} {'a (MACs/token)':>16} {'b':>9} {'published a':>16} {'published b':>11} "
            f"{'a pub/ours':>10} {'b pub/ours':>10}")
    if measure_tokens:
        head += f"  measured (hooks, meta, N={measure_tokens[0]},{measure_tokens[1]})"
    lines += [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['schedule']:<28} n/a: {r['error']}")
            continue
        pa = f"{r['published_a']:,}" if "published_a" in r else "-"
        pb = f"{r['published_b']:,}" if "published_b" in r else "-"
        ra = f"{r['ratio_a']:.4f}" if "ratio_a" in r else "-"
        rb = f"{r['ratio_b']:.4f}" if "ratio_b" in r else "-"
        line = (f"{r['schedule']:<28} {r['runs']:>4} {r['a_macs_per_token']:>16,} {r['b_macs_per_token_sq']:>9,} "
                f"{pa:>16} {pb:>11} {ra:>10} {rb:>10}")
        if measure_tokens:
            line += ("  confirmed" if r["measured_ok"] else
                     f"  MISMATCH a={r['measured_a']:,} b={r['measured_b']:,}")
        lines.append(line)
    ratios = [r["ratio_a"] for r in rows if "ratio_a" in r]
    if ratios:
        lines.append(f"Published a is {min(ratios):.3f}-{max(ratios):.3f} x ours (MACs and FLOPs mixed, embedding "
                     "counted); published b is right (QK^T doubled, attention x V omitted). See docs/errata.md.")
    return "\n".join(lines)


def _measure_tokens(text: str, max_seq_len: int) -> tuple[int, int]:
    shown = repr(text) if len(text) <= 60 else repr(text[:57]) + "..."
    try:
        n1, n2 = (int(t) for t in text.split(","))
    except ValueError:  # not two parts, not ints (or ints of thousands of digits)
        raise BadInput(f"--measure-tokens needs two integers N1,N2, got {shown}") from None
    if not 0 < n1 < n2 or n2 > max_seq_len:
        raise BadInput(f"--measure-tokens needs 0 < N1 < N2 <= max_seq_len ({max_seq_len}), got {shown}")
    return n1, n2


def run(args: argparse.Namespace) -> int:
    if args.measure_tokens is not None and not args.measure:
        raise BadInput("--measure-tokens applies to --measure only: add --measure or drop it")
    source = resolve_model(args.model, vocab_size=args.vocab_size, revision=args.revision)
    # Checked only when measuring: a model shorter than 48 positions still has its a, b printed.
    n1, n2 = 16, 48
    if args.measure:
        text = DEFAULT_MEASURE_TOKENS if args.measure_tokens is None else args.measure_tokens
        n1, n2 = _measure_tokens(text, source.config.max_seq_len)
    rows = schedule_rows(source.config, measure=args.measure, measure_tokens=(n1, n2))
    if args.format == "json":
        sys.stdout.write(json.dumps({"model": source.config.name, "unit": "macs", "rows": rows}, indent=2) + "\n")
    else:
        print(render(source.config, rows, (n1, n2) if args.measure else None))
    if args.measure and not all(r.get("measured_ok", True) for r in rows):
        return EXIT_DISAGREE
    return EXIT_OK
