"""Compare llama_ref against Hugging Face ``transformers`` on the same weights.

    python3 scripts/compare_hf.py tiny
    python3 scripts/compare_hf.py llama-2-7b --layers 2 --seqlen 64
    python3 scripts/compare_hf.py /path/to/Llama-2-7b-hf --dtype bf16 --layers 4 --json out/parity.json

MODEL is either a preset name (``tiny``, ``llama-2-7b``, ...): a random-init ``LlamaForCausalLM``
of that shape is built (optionally truncated to ``--layers K``) and converted to ours in memory, or
through ``save_pretrained`` + ``llama_ref.load`` with ``--via-disk``; or a Hugging Face
checkpoint directory: HF loads it with ``from_pretrained`` and ours with ``llama_ref.load``.

Both models see the same random token batch. Reported, for our full forward and for our cached
decoding (prefill half the sequence, then one token per step) against HF's full forward: max and
mean |logit difference| and argmax agreement. Exit status 0 if both max differences are within
``--atol``, 1 if not, 2 on bad arguments (or a model too big for this machine's memory).

HF runs in the dtype *we compute in*, on the same weight values: with ``--dtype bf16`` on the CPU
our model keeps bf16 weights but is told to compute in fp32 (never "auto"), so the reference is HF in fp32 holding exactly the
bf16-rounded weights (and the fp32 tolerance applies). On CUDA both compute in bf16 and the
tolerance is relative to the logit magnitude.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

import torch

from ..config import PRESETS, LlamaConfig
from ..dtypes import short_name
from ..hf import from_hf_model, hf_config_dict
from ..loading import load_pretrained
from ..memory import available_memory_bytes
from ..model import Llama
from ..usage import BAD_INPUT_ERRORS, OneLineParser, bad_input, positive_finite, positive_int

logger = logging.getLogger("compare_hf")

DTYPES = {short_name(d): d for d in (torch.float32, torch.bfloat16)}
# fp32 compute: both sides do the same fp32 arithmetic in a different order; 1e-4 on logits of order 1-10.
DEFAULT_ATOL_FP32 = 1e-4
# bf16 compute (CUDA): both sides round every activation to 8 bits of mantissa in different places;
# differences of a few percent of the largest logit are expected, so the tolerance scales with it.
DEFAULT_RTOL_BF16 = 0.1


class UsageError(Exception):
    """Bad arguments or an impossible request: reported and exit status 2."""


# ---------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("model", metavar="MODEL", help=f"preset ({', '.join(PRESETS)}) or an HF checkpoint directory")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="weight dtype of both models")
    p.add_argument("--batch", type=positive_int, default=2)
    p.add_argument("--seqlen", type=positive_int, default=32)
    p.add_argument("--seed", type=int, default=0, help="seeds the random init and the token batch")
    p.add_argument("--layers", type=positive_int, default=None, help="keep only the first K decoder layers")
    p.add_argument("--init-std", type=positive_finite, default=None,
                   help="std of the random init (presets only); default max(0.02, 1.5/sqrt(hidden)), "
                        "wide enough that attention is far from uniform")
    p.add_argument("--attn", choices=("eager", "sdpa"), default="eager", help="HF attention implementation")
    p.add_argument("--kernel", choices=("math", "sdpa"), default="math", help="our attention kernel")
    p.add_argument("--via-disk", action="store_true",
                   help="presets: save_pretrained to a temp dir and load ours with llama_ref.load")
    p.add_argument("--atol", type=positive_finite, default=None,
                   help=f"max |logit diff| allowed; default {DEFAULT_ATOL_FP32} for fp32 compute, "
                        f"{DEFAULT_RTOL_BF16} x max|logit| for bf16 compute")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the numbers as JSON")
    return p


# ---------------------------------------------------------------- memory


def check_fits(n_params_hf: int, n_params_ours: int, dtype: torch.dtype, ref_dtype: torch.dtype, device: str,
               what: str) -> None:
    """Refuse up front rather than get OOM-killed half way through.

    HF is built (random init) or loaded on the CPU, in fp32 or ``ref_dtype``; ours holds ``dtype``.
    """
    elem = torch.empty((), dtype=dtype).element_size()
    ref_elem = torch.empty((), dtype=ref_dtype).element_size()
    hf_host = n_params_hf * max(4, ref_elem)  # random init and upcasts go through fp32 on the host
    checks = [("host RAM", hf_host + (n_params_ours * elem if device == "cpu" else 0), (available_memory_bytes("cpu") or 0))]
    if device == "cuda":
        checks.append(("GPU memory", n_params_hf * ref_elem + n_params_ours * elem, (available_memory_bytes("cuda") or 0)))
    for name, required, available in checks:
        # 80%: activations, the logits (batch x seqlen x vocab, several copies) and the allocator need room.
        if required > 0.8 * available:
            raise UsageError(
                f"{what} needs about {required / 2**30:.1f} GiB of {name} for the two models, but only "
                f"{available / 2**30:.1f} GiB is available; use --layers K to keep fewer layers"
            )


# ---------------------------------------------------------------- models
def random_hf_model(config: LlamaConfig, *, seed: int, init_std: Optional[float], attn: str):
    import transformers

    std = init_std if init_std is not None else max(0.02, 1.5 / math.sqrt(config.dim))
    hf_cfg = transformers.LlamaConfig(**{**hf_config_dict(config), "initializer_range": std,
                                         "attn_implementation": attn, "pad_token_id": 0})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(hf_cfg)
        with torch.no_grad():
            # HF initialises norm weights to exactly 1, which would hide a swapped input/post-attention norm.
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model.eval()


def cast_hf_(model, dtype: torch.dtype):
    """``model.to(dtype)`` but keeping HF's RoPE ``inv_freq`` buffers in fp32.

    ``Module.to`` casts float buffers too: a bf16 round trip would leave HF with bf16-rounded RoPE
    frequencies (an error of ~1e-3 relative in every angle) and the comparison would measure that.
    """
    saved = {name: buf.clone() for name, buf in model.named_buffers() if name.endswith("inv_freq")}
    model.to(dtype)
    for name, buf in saved.items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, buf.to(model.device))
    return model


def reference_dtype(dtype: torch.dtype, device: str) -> torch.dtype:
    """The dtype both sides compute in, set explicitly on ours (never "auto"): fp32 on CPU (the logits compare
    to 1e-4 there), the weight dtype on CUDA."""
    return torch.float32 if device == "cpu" else dtype


def build_models(args) -> tuple:
    """(hf_model in the reference dtype, our model in ``args.dtype``, config, info), both on ``args.device``."""
    import transformers

    dtype = DTYPES[args.dtype]
    ref_dtype = reference_dtype(dtype, args.device)
    info: dict = {"hf_dtype": str(ref_dtype).replace("torch.", "")}
    if os.path.isdir(args.model):
        config = LlamaConfig.from_hf(args.model)
        if args.layers is not None and args.layers > config.n_layers:
            raise UsageError(f"--layers {args.layers} is more than the checkpoint's {config.n_layers} layers")
        hf_config = config if args.layers is None else config.replace(n_layers=args.layers)
        n_hf = Llama(hf_config, device="meta").param_count()
        n_full = Llama(config, device="meta").param_count()
        elem = torch.empty((), dtype=dtype).element_size()
        # Our loader reads every layer; with --layers the model runs only the first K (a schedule). That
        # is affordable unless the full model does not fit next to HF's truncated one.
        use_loader = n_hf * 4 + n_full * elem <= 0.8 * (available_memory_bytes("cpu") or 0)
        check_fits(n_hf, n_full if use_loader else n_hf, dtype, ref_dtype, args.device, args.model)
        kwargs = {} if args.layers is None else {"num_hidden_layers": args.layers}
        # Loading straight into ref_dtype upcasts the stored values exactly (bf16 -> fp32 is lossless).
        hf = transformers.LlamaForCausalLM.from_pretrained(args.model, dtype=ref_dtype, attn_implementation=args.attn,
                                                           **kwargs).eval()
        if use_loader:
            schedule = None if args.layers is None else range(args.layers)
            ours = load_pretrained(args.model, device=args.device, dtype=dtype, attn_kernel=args.kernel,
                                   schedule=schedule, compute_dtype=ref_dtype)
            info["ours_from"] = "llama_ref.load"
        else:
            logger.warning("not enough memory for our loader's full model: converting HF's truncated model instead")
            ours = from_hf_model(hf, device=args.device, dtype=dtype, attn_kernel=args.kernel, compute_dtype=ref_dtype)
            info["ours_from"] = "llama_ref.from_hf (in-memory conversion)"
        info["source"] = "checkpoint"
        return hf.to(args.device), ours, hf_config, info

    if args.model not in PRESETS:
        raise UsageError(f"MODEL {args.model!r} is neither a checkpoint directory nor a preset "
                         f"({', '.join(PRESETS)})")
    config = PRESETS[args.model]
    if args.layers is not None:
        if args.layers > config.n_layers:
            raise UsageError(f"--layers {args.layers} is more than {args.model}'s {config.n_layers} layers")
        config = config.replace(n_layers=args.layers)
    n = Llama(config, device="meta").param_count()  # exact count, no memory
    check_fits(n, n, dtype, ref_dtype, args.device, f"{args.model} ({n / 1e9:.2f}B parameters)")
    hf = random_hf_model(config, seed=args.seed, init_std=args.init_std, attn=args.attn)
    # Round the weights to the weight dtype first, so that HF (in ref_dtype) holds exactly our values.
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.to(dtype))
    info["source"] = "random init"
    if args.via_disk:
        with tempfile.TemporaryDirectory(prefix="compare_hf_") as tmp:
            cast_hf_(hf, dtype).save_pretrained(tmp)  # safetensors in the weight dtype
            cast_hf_(hf, torch.float32)  # lossless: the values were already rounded
            ours = load_pretrained(tmp, device=args.device, dtype=dtype, attn_kernel=args.kernel, compute_dtype=ref_dtype)
        info["ours_from"] = "save_pretrained + llama_ref.load"
    else:
        ours = from_hf_model(hf, device=args.device, dtype=dtype, attn_kernel=args.kernel, compute_dtype=ref_dtype)
        info["ours_from"] = "llama_ref.from_hf (in-memory conversion)"
    return cast_hf_(hf.to(args.device), ref_dtype), ours, config, info


# ---------------------------------------------------------------- comparison
def diff_stats(ours: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = (ours - ref).abs()  # (bsz, seqlen, vocab)
    return {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "argmax_agreement": (ours.argmax(-1) == ref.argmax(-1)).float().mean().item(),
    }


@torch.inference_mode()
def compare(hf, ours: Llama, tokens: torch.Tensor) -> dict:
    bsz, seqlen = tokens.shape
    ref = hf(tokens).logits.float()  # (bsz, seqlen, vocab)
    full = ours(tokens)  # (bsz, seqlen, vocab)
    prefill = max(1, seqlen // 2)
    ours.setup_cache(bsz, seqlen)
    try:
        steps = [ours(tokens[:, :prefill])]
        steps += [ours(tokens[:, p : p + 1], start_pos=p) for p in range(prefill, seqlen)]
    finally:
        ours.clear_cache()
    cached = torch.cat(steps, dim=1)  # (bsz, seqlen, vocab)
    return {
        "hf_max_abs_logit": ref.abs().max().item(),
        "full": diff_stats(full, ref),
        "cached": {**diff_stats(cached, ref), "prefill": prefill},
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available")
        t0 = time.perf_counter()
        hf, ours, config, info = build_models(args)
        if args.seqlen > config.max_seq_len:
            raise UsageError(f"--seqlen {args.seqlen} exceeds the model's max_seq_len={config.max_seq_len}")
        tokens = torch.randint(0, config.vocab_size, (args.batch, args.seqlen),
                               generator=torch.Generator().manual_seed(args.seed)).to(args.device)
        result = compare(hf, ours, tokens)
    except (UsageError, *BAD_INPUT_ERRORS) as e:  # e.g. a config.json the reader refuses: one line, not a traceback
        return bad_input("compare_hf", e)

    atol = args.atol
    if atol is None:
        if ours.compute_dtype == torch.float32:
            atol = DEFAULT_ATOL_FP32
        else:
            atol = DEFAULT_RTOL_BF16 * max(1.0, result["hf_max_abs_logit"])
    passed = result["full"]["max_abs_diff"] <= atol and result["cached"]["max_abs_diff"] <= atol
    report = {
        "model": args.model, "device": args.device, "dtype": args.dtype, "batch": args.batch,
        "seqlen": args.seqlen, "seed": args.seed, "layers": config.n_layers, "hf_attn": args.attn,
        "our_kernel": args.kernel, **info, "config": config.to_dict(), **result, "atol": atol, "passed": passed,
        "seconds": round(time.perf_counter() - t0, 2),
    }

    print(f"{args.model}: {config.n_layers} layers, dim {config.dim}, {args.dtype} weights on {args.device} "
          f"(compute {info['hf_dtype']}), batch {args.batch} x {args.seqlen} tokens; ours via {info['ours_from']}")
    print(f"  HF max |logit| {result['hf_max_abs_logit']:.4g}; tolerance {atol:.3g}")
    for name in ("full", "cached"):
        r = result[name]
        label = "full forward" if name == "full" else f"cached decode (prefill {r['prefill']})"
        print(f"  {label:28s} max |diff| {r['max_abs_diff']:.3e}  mean |diff| {r['mean_abs_diff']:.3e}  "
              f"argmax agreement {100 * r['argmax_agreement']:.2f}%")
    print("  PASS" if passed else "  FAIL: difference above tolerance")
    if args.json:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
        except OSError as e:
            return bad_input("compare_hf", e)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
