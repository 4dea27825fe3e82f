"""``llama-ref params``: the exact parameter count, by tensor kind, checked against a meta-device model;
``--list``: every preset with its exact total, its model-card figure and its shape."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

import torch

from llama_ref.config import FAMILIES, PRESETS, LlamaConfig
from llama_ref.model import Llama

from ..analytic import param_breakdown, param_count
from .models import resolve_model
from .common import EXIT_DISAGREE, EXIT_OK, BadInput, add_model_arguments

HELP = "exact parameter count breakdown (--list: every preset)"

#: The parameter figure each preset's model card (or release paper) states, as printed. Size classes ("8B")
#: are names, not counts; Llama 3.2's card also gives a count to two decimals (truncated, not rounded:
#: 1,235,814,400 is printed 1.23B). The exact totals and how the figures go wrong: docs/errata.md.
MODEL_CARD_PARAMS: dict[str, str] = {
    "llama-2-7b": "7B", "llama-2-13b": "13B", "llama-2-70b": "70B",
    "llama-3-8b": "8B", "llama-3.1-8b": "8B", "llama-3.1-70b": "70B", "llama-3.1-405b": "405B",
    "llama-3.2-1b": "1B (1.23B)", "llama-3.2-3b": "3B (3.21B)", "llama-3.3-70b": "70B",
    "code-llama-7b": "7B", "code-llama-13b": "13B", "code-llama-34b": "34B",
    "tinyllama-1.1b": "1.1B",
}
_FAMILY_OF = {name: f.key for f in FAMILIES.values() for name in f.presets}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, optional=True, default=None)
    p.add_argument("--list", action="store_true",
                   help="every preset: exact parameters, model-card figure, shape, context, RoPE scaling, tied head")
    p.add_argument("--format", default="table", choices=("table", "json"))


def rope_scaling_text(config: LlamaConfig) -> str:
    """``-`` for plain RoPE, else e.g. ``llama3 x8 (from 8192)`` or ``linear x4``."""
    rs = config.rope_scaling
    if rs is None:
        return "-"
    text = f"{rs.rope_type} x{rs.factor:g}"
    if rs.original_max_position_embeddings is not None:
        text += f" (from {rs.original_max_position_embeddings})"
    return text


def meta_model(config: LlamaConfig) -> Llama:
    """The model on the meta device: its real parameters and their sharing, no weight storage."""
    return Llama(config, device="meta", dtype=torch.bfloat16)


def head_sharing(config: LlamaConfig, model: Llama) -> Optional[dict]:
    """For a tied config: what the output head shares and what counting it twice would give; else None."""
    if not config.tie_word_embeddings:
        return None
    head = config.dim * config.vocab_size  # the output matrix, vocab_size x dim: the embedding itself
    return {"shares": "tok_embeddings", "head_params": head, "params_if_counted_twice": param_count(config) + head,
            "shared_in_meta_model": model.output.weight is model.tok_embeddings.weight}


def preset_rows() -> list[dict]:
    """One dict per preset, in preset order (which groups the families), each checked on a meta model."""
    rows = []
    for name, config in PRESETS.items():
        model = meta_model(config)
        total = param_count(config)
        sharing = head_sharing(config, model)
        rows.append({
            "name": name, "family": _FAMILY_OF.get(name), "params": total,
            "model_card": MODEL_CARD_PARAMS.get(name), "meta_model_numel": model.param_count(),
            "dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
            "n_kv_heads": config.n_kv_heads, "head_dim": config.head_dim, "hidden_dim": config.hidden_dim,
            "vocab_size": config.vocab_size, "max_seq_len": config.max_seq_len, "rope_theta": config.rope_theta,
            "rope_scaling": config.to_dict()["rope_scaling"], "tie_word_embeddings": config.tie_word_embeddings,
            "params_if_head_counted_twice": None if sharing is None else sharing["params_if_counted_twice"],
            "agree": model.param_count() == total and (sharing is None or sharing["shared_in_meta_model"]),
        })
    return rows


def format_preset_table(rows: list[dict]) -> str:
    cols = [("preset", "name", "<"), ("params", "params", ">"), ("card", "model_card", "<"),
            ("dim", "dim", ">"), ("layers", "n_layers", ">"), ("heads", "n_heads", ">"), ("kv", "n_kv_heads", ">"),
            ("head", "head_dim", ">"), ("FFN", "hidden_dim", ">"), ("vocab", "vocab_size", ">"),
            ("context", "max_seq_len", ">"), ("rope theta", "rope_theta", ">"), ("rope scaling", "rope_scaling", "<"),
            ("tied", "tie_word_embeddings", "<")]

    def cell(row: dict, key: str) -> str:
        value = row[key]
        if key == "rope_scaling":
            return rope_scaling_text(PRESETS[row["name"]])
        if key == "tie_word_embeddings":
            return "yes" if value else "no"
        if key == "model_card":
            return value or "-"
        if key == "rope_theta":
            return f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}" if key in ("params", "max_seq_len", "vocab_size") else str(value)
        return str(value)

    cells = [[cell(r, key) for _, key, _ in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _, _) in enumerate(cols)]

    def fmt(values: list[str]) -> str:
        return "  ".join(f"{v:{align}{w}}" for v, w, (_, _, align) in zip(values, widths, cols)).rstrip()

    lines = [fmt([h for h, _, _ in cols]), fmt(["-" * w for w in widths])] + [fmt(c) for c in cells]
    tied = [r for r in rows if r["tie_word_embeddings"]]
    if tied:
        lines.append("tied: the output head is the embedding matrix, counted once ("
                     + "; ".join(f"{r['name']}: {r['params_if_head_counted_twice']:,} if counted twice" for r in tied)
                     + ")")
    bad = [r["name"] for r in rows if not r["agree"]]
    lines.append(f"meta-model numel equal for all {len(rows)} presets" if not bad
                 else f"meta-model numel or head sharing DIFFERENT for {', '.join(bad)}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.list:
        given = [opt for opt, value in (("MODEL", args.model), ("--vocab-size", args.vocab_size),
                                        ("--revision", args.revision)) if value is not None]
        if given:
            raise BadInput(f"--list lists every preset and takes no {', '.join(given)}: give MODEL or --list")
        rows = preset_rows()
        if args.format == "json":
            sys.stdout.write(json.dumps({"presets": rows, "agree": all(r["agree"] for r in rows)}, indent=2) + "\n")
        else:
            print(format_preset_table(rows))
        return EXIT_OK if all(r["agree"] for r in rows) else EXIT_DISAGREE
    if args.model is None:
        raise BadInput("give MODEL (a preset, checkpoint or config; see --help) or --list for every preset")
    source = resolve_model(args.model, vocab_size=args.vocab_size, revision=args.revision)
    config = source.config
    parts = param_breakdown(config)
    total = param_count(config)
    model = meta_model(config)
    numel = model.param_count()
    sharing = head_sharing(config, model)
    agree = numel == total and (sharing is None or sharing["shared_in_meta_model"])
    if args.format == "json":
        sys.stdout.write(json.dumps({"model": config.name, "config": config.to_dict(), "params": total,
                                     "breakdown": parts, "tied_head": sharing, "meta_model_numel": numel,
                                     "agree": agree}, indent=2) + "\n")
    else:
        lines = [f"{config.name}: dim {config.dim}, {config.n_layers} layers, {config.n_heads} heads "
                 f"({config.n_kv_heads} kv heads, head_dim {config.head_dim}), FFN {config.hidden_dim}, "
                 f"vocab {config.vocab_size}" + (", tied embedding/head" if sharing else "")]
        for name, n in parts.items():
            lines.append(f"  {name:<26} {n:>16,}  ({100 * n / total:5.2f}%)")
        if sharing:
            lines.append(f"  {'output (tied)':<26} {'shared':>16}  (is tok_embeddings: its {sharing['head_params']:,} "
                         "are counted once, above)")
        lines.append(f"  {'TOTAL params':<26} {total:>16,}")
        if sharing:
            lines.append(f"  (counting the tied head twice would give {sharing['params_if_counted_twice']:,})")
        check = f"  meta-model numel {numel:,}: " + ("equal" if numel == total else "DIFFERENT")
        if sharing:
            check += ("; output.weight is tok_embeddings.weight: shared" if sharing["shared_in_meta_model"]
                      else "; output.weight is NOT tok_embeddings.weight: DIFFERENT")
        lines.append(check)
        print("\n".join(lines))
    return EXIT_OK if agree else EXIT_DISAGREE
