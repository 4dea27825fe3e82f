"""``llama-ref``: count MACs/FLOPs of a Llama model with several counters and prove they agree.

Subcommands (each a pair of functions in :data:`SUBCOMMANDS`; ``roofline`` is registered when
:mod:`counters.roofline` imports)::

    llama-ref count MODEL [--tokens N] [--cached C] [--batch B] [--schedule S] [--device D] [--dtype T]
                          [--counters analytic,hooks,fvcore,torch] [--format table|json|csv] [--out PATH]
                          [--kernel math|sdpa] [--strict] [--detail]
    llama-ref schedules [MODEL] [--measure]
    llama-ref params MODEL

MODEL is a preset name, a Hugging Face checkpoint directory or config.json, or a Meta directory
(params.json). Exit status: 0 success, 1 counters disagree, 2 bad input, 3 uncounted work in
``--strict`` mode.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

EXIT_OK = 0
EXIT_DISAGREE = 1
EXIT_BAD_INPUT = 2
EXIT_UNCOUNTED = 3

# Random weights serve only to run real kernels (counts depend on shapes, never on values), so a
# random-init model is built on the CPU only when it is small; anything larger is counted on meta.
RANDOM_INIT_MAX_BYTES = 1 << 30
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
DEFAULT_TOKENS = 128

logger = logging.getLogger("llama_ref.cli")


class BadInput(Exception):
    """Bad user input: reported as one line on stderr, exit status 2."""


# ====================================================================== model resolution
@dataclass
class ModelSource:
    config: object  # LlamaConfig
    kind: str  # "preset" | "hf" | "meta"
    path: Optional[str] = None  # file or directory given
    checkpoint_dir: Optional[str] = None  # directory holding weights, if any

    @property
    def has_weights(self) -> bool:
        return self.checkpoint_dir is not None


def _weight_files(directory: str) -> list[str]:
    patterns = ("*.safetensors", "pytorch_model*.bin", "consolidated.*.pth")
    return sorted(f for p in patterns for f in glob.glob(os.path.join(directory, p)))


def resolve_model(spec: str, *, vocab_size: Optional[int] = None) -> ModelSource:
    """A preset name, an HF directory / config.json, or a Meta directory / params.json."""
    from llama_ref.config import PRESETS, LlamaConfig

    if spec in PRESETS:
        return ModelSource(PRESETS[spec], "preset")
    if not os.path.exists(spec):
        raise BadInput(f"unknown model {spec!r}: not a preset ({', '.join(sorted(PRESETS))}) "
                       "and no such file or directory")
    directory = spec if os.path.isdir(spec) else os.path.dirname(os.path.abspath(spec))
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "config.json")):
            kind, cfg_file = "hf", os.path.join(spec, "config.json")
        elif os.path.isfile(os.path.join(spec, "params.json")):
            kind, cfg_file = "meta", os.path.join(spec, "params.json")
        else:
            raise BadInput(f"{spec}: directory has neither config.json (Hugging Face) nor params.json (Meta)")
        weights = _weight_files(spec)
    else:
        kind = "meta" if os.path.basename(spec) == "params.json" else "hf"
        cfg_file = spec
        weights = []  # a config file alone: no weights, whatever sits next to it
    if weights:
        # The loader reads the config the way it will load the weights (a Meta params.json says
        # vocab_size -1: the checkpoint's tok_embeddings decides) and checks every tensor header.
        from llama_ref.model import Llama

        config = Llama.from_pretrained(directory, device="meta").config
        if vocab_size is not None and vocab_size != config.vocab_size:
            raise BadInput(f"--vocab-size {vocab_size} contradicts the checkpoint in {directory} "
                           f"(vocab_size {config.vocab_size})")
    elif kind == "hf":
        config = LlamaConfig.from_hf(cfg_file)
        if vocab_size is not None and vocab_size != config.vocab_size:
            raise BadInput(f"--vocab-size {vocab_size} contradicts {cfg_file} (vocab_size {config.vocab_size})")
    else:
        with open(cfg_file, encoding="utf-8") as f:
            try:
                params = json.load(f)
            except json.JSONDecodeError as e:
                raise BadInput(f"{cfg_file}: not valid JSON ({e})") from None
        if not isinstance(params, dict):
            raise BadInput(f"{cfg_file}: expected a JSON object, got {type(params).__name__}")
        file_vocab = params.get("vocab_size", -1)
        if vocab_size is None and (file_vocab is None or (isinstance(file_vocab, int) and file_vocab <= 0)):
            raise BadInput(f"{cfg_file} says vocab_size={file_vocab} (the tokenizer decides) and there is no "
                           "checkpoint to read it from: pass --vocab-size (32000 for Llama-2)")
        config = LlamaConfig.from_meta(cfg_file, vocab_size=vocab_size)
    if config.name in ("hf", "meta", "custom"):  # no name in the files: call it after its directory
        config = config.replace(name=os.path.basename(os.path.normpath(directory)) or config.name)
    return ModelSource(config, kind, path=spec, checkpoint_dir=directory if weights else None)


def choose_device(requested: Optional[str], source: ModelSource, dtype_bytes: int) -> tuple[str, str]:
    """(device, reason). ``--device`` wins; otherwise real weights load on the CPU when they fit in
    RAM, random weights only when small (counts do not depend on values), and everything else runs
    on the meta device (shapes only: seconds and well under 1 GiB even for 70B)."""
    import torch

    from .analytic import param_count
    from .hardware import available_memory_bytes

    if requested:
        if requested == "meta":
            return "meta", "--device meta"
        try:
            dev = torch.device(requested)
        except RuntimeError:
            raise BadInput(f"bad --device {requested!r}: use cpu, meta or cuda[:N]") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BadInput(f"--device {requested}: no CUDA device available")
        if dev.type not in ("cpu", "cuda"):
            raise BadInput(f"bad --device {requested!r}: use cpu, meta or cuda[:N]")
        weight_bytes = param_count(source.config) * dtype_bytes
        avail = (available_memory_bytes("cpu") or 0)
        if dev.type == "cpu" and avail and weight_bytes > avail:
            raise BadInput(f"--device cpu: the weights need {weight_bytes / (1 << 30):.1f} GiB but only "
                           f"{avail / (1 << 30):.1f} GiB of RAM is available; use --device meta (counts are the same)")
        return requested, f"--device {requested}"
    weight_bytes = param_count(source.config) * dtype_bytes
    avail = (available_memory_bytes("cpu") or 0)
    gib = 1 << 30
    if source.has_weights:
        if weight_bytes * 5 // 4 <= avail:
            return "cpu", f"checkpoint weights ({weight_bytes / gib:.1f} GiB) fit in available RAM ({avail / gib:.1f} GiB)"
        return "meta", (f"checkpoint weights ({weight_bytes / gib:.1f} GiB) exceed available RAM "
                        f"({avail / gib:.1f} GiB): counted on meta without loading")
    limit = min(RANDOM_INIT_MAX_BYTES, avail // 2)
    if weight_bytes <= limit:
        return "cpu", f"random weights ({weight_bytes / gib:.2f} GiB) on the CPU"
    return "meta", (f"no checkpoint and random weights would take {weight_bytes / gib:.1f} GiB "
                    f"(> {limit / gib:.1f} GiB): counted on meta (shapes only)")


def build_model(source: ModelSource, *, device: str, dtype_name: Optional[str], schedule, kernel: str, seed: int = 0):
    """The model to count, and a word on its weights."""
    import torch

    from llama_ref.model import Llama

    dtype = getattr(torch, dtype_name) if dtype_name else None
    if source.has_weights:
        # On meta the loader checks the files and returns a shape-only model.
        model = Llama.from_pretrained(source.checkpoint_dir, device=device, dtype=dtype, attn_kernel=kernel,
                                      schedule=schedule)
        return model, ("checkpoint weights" if device != "meta" else "checkpoint not loaded (meta)")
    if dtype is None:
        # On meta nothing is stored: bf16 (as Llama-2 ships) sets the bytes reported; on a real
        # device fp32, the CPU compute dtype.
        dtype = torch.bfloat16 if device == "meta" else torch.float32
    if device != "meta":
        torch.manual_seed(seed)
    model = Llama(source.config, schedule=schedule, device=device, dtype=dtype, attn_kernel=kernel)
    return model, ("no weights (meta)" if device == "meta" else "random weights")


def _parse_counters(text: Optional[str]) -> Optional[list[str]]:
    from .result import COUNTER_NAMES

    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in COUNTER_NAMES]
    if bad or not names:
        raise BadInput(f"bad --counters {text!r}: choose from {','.join(COUNTER_NAMES)}")
    if len(set(names)) != len(names):
        raise BadInput(f"bad --counters {text!r}: a counter is listed twice")
    return names


def _is_uncounted_error(e: BaseException) -> bool:
    from .hooks import UncountedModuleError

    if isinstance(e, UncountedModuleError):
        return True
    try:
        from .ops import UncountedOpError
    except ImportError:
        return False
    return isinstance(e, UncountedOpError)


# ====================================================================== count
def add_count_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="preset name, HF checkpoint dir or config.json, or Meta dir (params.json)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"new tokens N per sequence (default {DEFAULT_TOKENS})")
    p.add_argument("--cached", type=int, default=0, help="cached tokens C before them (prefilled, not counted)")
    p.add_argument("--batch", type=int, default=1, help="batch size B")
    p.add_argument("--schedule", default=None, help="layer schedule: preset name or list like '0-23,27-31' (default all)")
    p.add_argument("--device", default=None, help="cpu, cuda[:N] or meta (default: chosen by size, see --help)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="weight dtype")
    p.add_argument("--counters", default=None, help="comma list of analytic,hooks,fvcore,torch (default: all available)")
    p.add_argument("--format", default="table", choices=("table", "json", "csv"), help="output format")
    p.add_argument("--out", default=None, help="write the output to this file instead of stdout")
    p.add_argument("--kernel", default="math", choices=("math", "sdpa"), help="attention kernel")
    p.add_argument("--strict", action="store_true", help="fail (exit 3) on any op or module without a formula")
    p.add_argument("--detail", action="store_true", help="per-module rows instead of one line per layer run")
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary size for a Meta params.json saying -1")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights and tokens")


def _check_positive(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise BadInput(f"--{name} must be >= {minimum}, got {value}")


def run_count(args: argparse.Namespace) -> int:
    import torch

    from llama_ref.schedule import format_schedule, resolve_schedule

    from .crosscheck import CounterUnavailable, available_counters, crosscheck, load_counter
    from .report import render_csv, render_table, to_json

    prog = "llama-ref count"
    # ---- resolve every input before any model work: bad input -> exit 2, one line
    try:
        _check_positive("tokens", args.tokens, 1)
        _check_positive("cached", args.cached, 0)
        _check_positive("batch", args.batch, 1)
        names = _parse_counters(args.counters)
        if names is None:
            names = available_counters()
        else:
            for n in names:
                if n != "analytic":
                    load_counter(n)
        source = resolve_model(args.model, vocab_size=args.vocab_size)
        config = source.config
        schedule = resolve_schedule(args.schedule, config.n_layers)
        end = args.cached + args.tokens
        if end > config.max_seq_len:
            raise BadInput(f"--cached {args.cached} + --tokens {args.tokens} = {end} exceeds the model's "
                           f"max_seq_len {config.max_seq_len}")
        dtype_name = DTYPES[args.dtype] if args.dtype else None
        dtype_bytes = getattr(torch, dtype_name).itemsize if dtype_name else (4 if not source.has_weights else 2)
        device, reason = choose_device(args.device, source, dtype_bytes)
        if args.out and os.path.isdir(args.out):
            raise BadInput(f"--out {args.out} is a directory")
    except (BadInput, CounterUnavailable, ValueError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    logger.info("device %s: %s", device, reason)
    try:
        model, weights = build_model(source, device=device, dtype_name=dtype_name, schedule=schedule,
                                     kernel=args.kernel, seed=args.seed)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"{prog}: error: cannot build the model: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if device == "meta":
        tokens = torch.zeros((args.batch, args.tokens), dtype=torch.long, device="meta")
    else:
        gen = torch.Generator().manual_seed(args.seed)
        tokens = torch.randint(0, config.vocab_size, (args.batch, args.tokens), generator=gen).to(device)
    weight_bytes = model.tok_embeddings.weight.dtype.itemsize
    act_bytes = model.compute_dtype.itemsize
    try:
        report = crosscheck(model, tokens, n_cached=args.cached, counters=names, strict=args.strict,
                            weight_dtype_bytes=weight_bytes, act_dtype_bytes=act_bytes)
    except Exception as e:  # noqa: BLE001 - only uncounted-work errors are expected here; the rest re-raise
        if _is_uncounted_error(e):
            print(f"{prog}: uncounted work (--strict): {e}", file=sys.stderr)
            return EXIT_UNCOUNTED
        raise
    report.device = device
    report.dtype = str(model.tok_embeddings.weight.dtype).replace("torch.", "")
    report.kernel = args.kernel

    if args.format == "json":
        extra = {"model_source": {"spec": args.model, "kind": source.kind, "checkpoint_dir": source.checkpoint_dir},
                 "weights": weights, "device_reason": reason, "compute_dtype": str(model.compute_dtype).replace("torch.", "")}
        text = json.dumps(to_json(report, extra=extra), indent=2) + "\n"
    elif args.format == "csv":
        text = render_csv(report, detail=True)  # CSV is for machines: always one line per module row
    else:
        title = (f"{config.name}: schedule {format_schedule(schedule)} ({len(schedule)} layer runs), "
                 f"batch {args.batch}, {args.tokens} new + {args.cached} cached tokens, device {device} "
                 f"({weights}, {report.dtype}), kernel {args.kernel}")
        text = render_table(report, detail=args.detail, title=title) + "\n"
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
        verdict = "counters agree" if report.agree else f"counters DISAGREE ({len(report.mismatches)} mismatches)"
        print(f"wrote {args.out}: {verdict}; MACs {report.totals[report.counters[0]]['macs']:,}")
    else:
        sys.stdout.write(text)
    if not report.agree:
        first = report.mismatches[0]
        print(f"{prog}: counters disagree: {len(report.mismatches)} mismatch(es), first: {first}", file=sys.stderr)
        return EXIT_DISAGREE
    return EXIT_OK


# ====================================================================== schedules
def add_schedules_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", nargs="?", default="llama-2-7b", help="model (default llama-2-7b)")
    p.add_argument("--measure", action="store_true",
                   help="confirm a, b by counting with hooks on the meta device at two token counts")
    p.add_argument("--measure-tokens", default="16,48", help="the two N values of --measure (default 16,48)")
    p.add_argument("--format", default="table", choices=("table", "json"))
    p.add_argument("--vocab-size", type=int, default=None)


def measure_polynomial(model, n1: int, n2: int) -> tuple[int, int]:
    """(a, b) solved exactly from hook counts M(N) = a*N + b*N^2 at two token counts."""
    import torch

    from .hooks import count_hooks

    if not 0 < n1 < n2:
        raise ValueError(f"need 0 < N1 < N2, got {n1}, {n2}")
    device = model.device
    m1 = count_hooks(model, torch.zeros((1, n1), dtype=torch.long, device=device)).total.macs
    m2 = count_hooks(model, torch.zeros((1, n2), dtype=torch.long, device=device)).total.macs
    # m1*n2 - m2*n1 = b*n1*n2*(n1 - n2)
    num = m2 * n1 - m1 * n2
    den = n1 * n2 * (n2 - n1)
    if num % den:
        raise ValueError(f"hook counts {m1} (N={n1}), {m2} (N={n2}) are not of the form a*N + b*N^2")
    b = num // den
    a_num = m1 - b * n1 * n1
    if a_num % n1:
        raise ValueError(f"hook counts {m1} (N={n1}), {m2} (N={n2}) are not of the form a*N + b*N^2")
    return a_num // n1, b


def schedule_rows(config, *, measure: bool = False, measure_tokens: tuple[int, int] = (16, 48)) -> list[dict]:
    """One dict per schedule preset: our a, b; the published ones (reference 000, Llama-2-7B only); ratios."""
    from llama_ref.config import PRESETS
    from llama_ref.schedule import SCHEDULE_NAMES, format_schedule, resolve_schedule

    from .analytic import macs_polynomial
    from .published import REF000_MACS

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
            import torch

            from llama_ref.model import Llama

            if model is None:
                model = Llama(config, device="meta", dtype=torch.bfloat16)
            model.set_schedule(name)
            ma, mb = measure_polynomial(model, *measure_tokens)
            row.update(measured_a=ma, measured_b=mb, measured_ok=(ma, mb) == (a, b))
        rows.append(row)
    return rows


def render_schedules(config, rows: list[dict], measure_tokens: Optional[tuple[int, int]]) -> str:
    from .published import REF000_SOURCE

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


def run_schedules(args: argparse.Namespace) -> int:
    prog = "llama-ref schedules"
    try:
        source = resolve_model(args.model, vocab_size=args.vocab_size)
        n1, n2 = (int(t) for t in args.measure_tokens.split(","))
        if not 0 < n1 < n2 or n2 > source.config.max_seq_len:
            raise BadInput(f"--measure-tokens needs 0 < N1 < N2 <= max_seq_len, got {args.measure_tokens}")
    except (BadInput, ValueError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    rows = schedule_rows(source.config, measure=args.measure, measure_tokens=(n1, n2))
    if args.format == "json":
        sys.stdout.write(json.dumps({"model": source.config.name, "unit": "macs", "rows": rows}, indent=2) + "\n")
    else:
        print(render_schedules(source.config, rows, (n1, n2) if args.measure else None))
    if args.measure and not all(r.get("measured_ok", True) for r in rows):
        return EXIT_DISAGREE
    return EXIT_OK


# ====================================================================== params
def add_params_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--format", default="table", choices=("table", "json"))
    p.add_argument("--vocab-size", type=int, default=None)


def run_params(args: argparse.Namespace) -> int:
    import torch

    from llama_ref.model import Llama

    from .analytic import param_breakdown, param_count

    try:
        source = resolve_model(args.model, vocab_size=args.vocab_size)
    except (BadInput, ValueError, FileNotFoundError) as e:
        print(f"llama-ref params: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
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


# ====================================================================== wiring
# name -> (add_arguments(parser), run(args) -> exit status, one-line help)
SUBCOMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {
    "count": (add_count_arguments, run_count, "count MACs/FLOPs per layer with several counters and check they agree"),
    "schedules": (add_schedules_arguments, run_schedules, "a*N + b*N^2 MACs of every schedule preset vs the published figures"),
    "params": (add_params_arguments, run_params, "exact parameter count breakdown"),
}


def _register_optional_subcommands() -> None:
    """``roofline`` lives in :mod:`counters.roofline` (``add_arguments``, ``run``); a missing or broken
    module must never break the other subcommands."""
    if "roofline" in SUBCOMMANDS:
        return
    try:
        roofline = importlib.import_module("counters.roofline")
    except Exception as e:  # noqa: BLE001 - any import failure just leaves the subcommand out
        logger.debug("roofline subcommand unavailable: %s", e)
        return
    add, run = getattr(roofline, "add_arguments", None), getattr(roofline, "run", None)
    if callable(add) and callable(run):
        doc = (roofline.__doc__ or "roofline").strip().splitlines()[0]
        SUBCOMMANDS["roofline"] = (add, run, doc)


def build_parser() -> argparse.ArgumentParser:
    _register_optional_subcommands()
    parser = argparse.ArgumentParser(prog="llama-ref", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (add, run, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, message already on stderr)
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args._run(args)
    except BrokenPipeError:  # output piped into e.g. `head`: not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
