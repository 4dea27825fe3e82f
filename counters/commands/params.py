"""``llama-ref params``: the exact parameter count, by tensor kind, checked against a meta-device model."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from llama_ref.model import Llama

from ..analytic import param_breakdown, param_count
from ..models import resolve_model
from .common import EXIT_DISAGREE, EXIT_OK, add_model_arguments

HELP = "exact parameter count breakdown"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--format", default="table", choices=("table", "json"))


def run(args: argparse.Namespace) -> int:
    source = resolve_model(args.model, vocab_size=args.vocab_size, revision=args.revision)
    config = source.config
    parts = param_breakdown(config)
    total = param_count(config)
    numel = Llama(config, device="meta", dtype=torch.bfloat16).num_params()
    if args.format == "json":
        sys.stdout.write(json.dumps({"model": config.name, "config": config.to_dict(), "params": total,
                                     "breakdown": parts, "meta_model_numel": numel,
                                     "agree": numel == total}, indent=2) + "\n")
    else:
        lines = [f"{config.name}: dim {config.dim}, {config.n_layers} layers, {config.n_heads} heads "
                 f"({config.n_kv_heads} kv heads, head_dim {config.head_dim}), FFN {config.hidden_dim}, "
                 f"vocab {config.vocab_size}"]
        for name, n in parts.items():
            lines.append(f"  {name:<26} {n:>16,}  ({100 * n / total:5.2f}%)")
        lines.append(f"  {'TOTAL params':<26} {total:>16,}")
        lines.append(f"  meta-model numel {numel:,}: " + ("equal" if numel == total else "DIFFERENT"))
        print("\n".join(lines))
    return EXIT_OK if numel == total else EXIT_DISAGREE
