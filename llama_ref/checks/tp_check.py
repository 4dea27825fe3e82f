"""Run a tensor-parallel forward of a checkpoint on every rank and check it against one process.

    torchrun --standalone --nproc-per-node N scripts/tp_check.py CHECKPOINT [--tokens-file PT]
             [--save-logits PT] [--json OUT] [--device auto|cpu|cuda] [--dtype bf16|fp16|fp32]
             [--kernel math|sdpa] [--tol 1e-4] [--no-reference] [--no-hf]

Every rank joins the torchrun world (gloo on CPU, NCCL on CUDA: rank r uses cuda:LOCAL_RANK), loads
only its part of CHECKPOINT (a Meta checkpoint with N shards: rank k reads consolidated.k.pth; any
other layout is sliced per rank while streaming) and runs one forward; all ranks get the gathered
logits. Rank 0 writes them in fp32 to ``--save-logits``. Then every rank frees its shard and, when the
whole model fits in rank 0's free memory, rank 0 loads it single-process (``Llama.from_pretrained``)
and, if transformers is installed (and ``--no-hf`` not given) a ``transformers.LlamaForCausalLM`` with
the same weights, runs the same tokens and reports the max |logit difference| against each.

Compute is fp32 by default (``--compute-dtype``) so that the comparison is exact up to summation order;
weights keep the checkpoint's dtype (``--dtype`` to change it). Tokens: ``--tokens-file`` (a
``torch.save``d integer tensor of shape (bsz, seqlen) or (seqlen,), a list of ids, or a dict holding one
under ``tokens`` or ``input_ids``), else ``--batch`` x ``--seqlen``
ids drawn with ``--seed``.

``--json OUT`` (rank 0): world_size, backend, device, checkpoint, format, shards, load_mode, dtypes,
tokens_shape, logits_shape, ranks (per rank: load_seconds, forward_seconds, weight_bytes,
rss_before_load_bytes, peak_rss_after_load_bytes, peak_rss_bytes, files_opened, files_read; on CUDA
peak_cuda_bytes_after_load), and reference
({ran, reason, max_abs_diff, max_abs_diff_hf, hf_ran, hf_reason, tol}), passed.

Exit status: 0 when the logits match within ``--tol`` (or no reference could run), 1 when they differ,
2 on bad input (every rank reports the same error; nothing hangs). The arguments are checked before a
rank joins the world (``--tol`` a non-negative finite number, ``--batch``/``--seqlen`` positive, the
dtypes and ``--device`` known), the checkpoint once every rank has joined, so that one rank's missing
file cannot leave the others waiting.

Under ``torchrun`` the ranks' status 2 reaches you through torchrun, which reports any non-zero rank as
its own failure (a ``ChildFailedError`` summary) and exits 1: the one line above it, from rank 0, is the
reason. To check the arguments alone first, run the script without torchrun: it checks them, then
stops with status 2 at "not running under torchrun" only if they are good.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import resource
import sys
import time
from typing import Optional, Sequence

import torch

import torch.distributed as dist

from ..hf import to_hf_model
from ..loading import find_checkpoint_files, load_pretrained, parse_dtype
from ..loading.readers import OpenFiles
from ..memory import available_memory_bytes as available_bytes
from ..model import Llama
from ..parallel import default_backend, init_torchrun, load_tp_pretrained
from ..usage import BAD_INPUT_ERRORS, OneLineParser, bad_input, non_negative_finite, one_line, positive_int

logger = logging.getLogger("tp_check")


class UsageError(Exception):
    """Bad input: reported on every rank, exit status 2."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="checkpoint directory (HF or Meta layout)")
    p.add_argument("--tokens-file", help="torch.save'd integer tensor (bsz, seqlen) or (seqlen,)")
    p.add_argument("--save-logits", help="rank 0 writes the gathered fp32 logits here (torch.save)")
    p.add_argument("--json", help="rank 0 writes the report here")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if CUDA is available, else cpu), cpu or cuda")
    p.add_argument("--dtype", default=None, help="weight storage dtype (default: the checkpoint's)")
    p.add_argument("--compute-dtype", default="fp32", help="activation dtype (default fp32)")
    p.add_argument("--kernel", default="math", choices=("math", "sdpa"), help="attention kernel")
    p.add_argument("--batch", type=positive_int, default=2, help="random tokens: batch size (default 2)")
    p.add_argument("--seqlen", type=positive_int, default=16, help="random tokens: sequence length (default 16)")
    p.add_argument("--seed", type=int, default=0, help="random tokens: seed")
    p.add_argument("--tol", type=non_negative_finite, default=1e-4,
                   help="max |logit difference| allowed, >= 0 and finite (default 1e-4)")
    p.add_argument("--no-reference", action="store_true", help="skip the single-process comparison")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- helpers
def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def pick_device(spec: str) -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: CUDA is not available on this machine")
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {local_rank} has no CUDA device ({torch.cuda.device_count()} available)")
        return torch.device("cuda", local_rank)
    raise UsageError(f"--device must be auto, cpu or cuda, got {spec!r}")


def read_tokens(args: argparse.Namespace, vocab_size: int, max_seq_len: int) -> torch.Tensor:
    if args.tokens_file:
        if not os.path.isfile(args.tokens_file):
            raise UsageError(f"--tokens-file {args.tokens_file} does not exist")
        try:
            tokens = torch.load(args.tokens_file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UsageError(f"--tokens-file {args.tokens_file}: cannot read it with torch.load ({e})") from None
        if isinstance(tokens, dict):  # e.g. a tokenizer's output
            key = next((k for k in ("tokens", "input_ids") if k in tokens), None)
            if key is None:
                raise UsageError(f"--tokens-file {args.tokens_file}: a dict needs a 'tokens' or 'input_ids' entry, "
                                 f"got keys {sorted(map(str, tokens))}")
            tokens = tokens[key]
        if isinstance(tokens, (list, tuple)):
            try:
                tokens = torch.tensor(tokens)
            except (TypeError, ValueError) as e:
                raise UsageError(f"--tokens-file {args.tokens_file}: not a list of token ids ({e})") from None
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
            raise UsageError(f"--tokens-file {args.tokens_file}: expected an integer tensor, got "
                             f"{getattr(tokens, 'dtype', type(tokens).__name__)}")
        if tokens.dim() == 1:
            tokens = tokens[None]
        if tokens.dim() != 2 or tokens.numel() == 0:
            raise UsageError(f"--tokens-file {args.tokens_file}: expected shape (bsz, seqlen), got {tuple(tokens.shape)}")
        return tokens.long()
    seqlen = min(args.seqlen, max_seq_len)
    gen = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, vocab_size, (args.batch, seqlen), generator=gen)


def load_mode(files, statuses: list) -> str:
    """"shard-per-rank" when every rank opened exactly its own Meta shard (what was observed, not assumed:
    a Llama-3 checkpoint's vocabulary-split embedding makes every rank read every shard), else "sliced"."""
    own = [os.path.basename(files.shards[s["rank"]]) if len(files.shards) == len(statuses) else None
           for s in statuses]
    if files.format == "meta" and all(s["files_opened"] == [o] for s, o in zip(statuses, own)):
        return "shard-per-rank"
    return "sliced"


@contextlib.contextmanager
def recording_file_access():
    """(files opened, files weight data was read from), as base names, while loading inside the block.
    Opening a file reads its header or pickle only; "read" files are those weights were copied from."""
    opened: set = set()
    read: set = set()
    original_open, original_tensor = OpenFiles._open, OpenFiles.tensor

    def _open(self, path):
        opened.add(os.path.basename(path))
        return original_open(self, path)

    def tensor(self, stored):
        read.add(os.path.basename(stored.file))
        return original_tensor(self, stored)

    OpenFiles._open, OpenFiles.tensor = _open, tensor
    try:
        yield opened, read
    finally:
        OpenFiles._open, OpenFiles.tensor = original_open, original_tensor


def model_bytes(config, dtype: torch.dtype) -> int:
    n = sum(p.numel() for p in Llama(config, device="meta").parameters())
    return n * dtype.itemsize


# ---------------------------------------------------------------------------- the check
def run_reference(args, checkpoint: str, tokens: torch.Tensor, tp_logits: torch.Tensor, device: torch.device,
                  dtype: Optional[torch.dtype], compute_dtype: torch.dtype, config, weight_dtype: torch.dtype) -> dict:
    ref: dict = {"ran": False, "reason": None, "max_abs_diff": None, "hf_ran": False, "hf_reason": None,
                 "max_abs_diff_hf": None, "tol": args.tol}
    if args.no_reference:
        ref["reason"] = "--no-reference"
        return ref
    need = model_bytes(config, weight_dtype)
    avail = available_bytes(device)
    if avail is not None and need * 1.2 > avail:
        ref["reason"] = (f"the whole model needs {need / 2**30:.2f} GiB on {device} but {avail / 2**30:.2f} GiB "
                         "are available")
        return ref
    single = load_pretrained(checkpoint, device=device, dtype=dtype, compute_dtype=compute_dtype,
                                   attn_kernel=args.kernel)
    with torch.inference_mode():
        ref_logits = single(tokens.to(device)).float().cpu()
    ref.update(ran=True, max_abs_diff=(tp_logits - ref_logits).abs().max().item())
    if args.no_hf:
        ref["hf_reason"] = "--no-hf"
        return ref
    try:
        import transformers  # noqa: F401
    except ImportError:
        ref["hf_reason"] = "transformers is not installed"
        return ref
    hf_need = model_bytes(config, torch.float32)
    avail = available_bytes(device)
    if avail is not None and hf_need * 1.2 > avail:
        ref["hf_reason"] = (f"an fp32 transformers copy needs {hf_need / 2**30:.2f} GiB on {device} but "
                            f"{avail / 2**30:.2f} GiB are available")
        return ref
    # transformers on the CPU computes in the weights' dtype: give it fp32 weights (the exact upcast of
    # ours, which already compute in fp32), sharing storage with ours except the permuted q/k.
    hf = to_hf_model(single.float(), attn_implementation="eager")
    del single
    with torch.inference_mode():
        hf_logits = hf(tokens.to(device)).logits.float().cpu()
    ref.update(hf_ran=True, max_abs_diff_hf=(tp_logits - hf_logits).abs().max().item())
    return ref


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:  # what the arguments alone decide, the same on every rank: before any rank joins the world
        dtype = parse_dtype(args.dtype, "--dtype")
        compute_dtype = parse_dtype(args.compute_dtype, "--compute-dtype")
        device = pick_device(args.device)
        group = init_torchrun(default_backend(device))
    except (UsageError, ValueError) as e:
        return bad_input("tp_check", e)
    rank, world = group.rank, group.world_size
    status: dict = {"rank": rank, "error": None}
    model = tokens = logits = None
    try:
        files = find_checkpoint_files(args.checkpoint)
        status["rss_before_load_bytes"] = current_rss_bytes()
        t0 = time.perf_counter()
        with recording_file_access() as (opened, read):
            model = load_tp_pretrained(args.checkpoint, group=group, device=device, dtype=dtype,
                                       compute_dtype=compute_dtype, attn_kernel=args.kernel)
        status["files_opened"], status["files_read"] = sorted(opened), sorted(read)
        status["load_seconds"] = time.perf_counter() - t0
        status["peak_rss_after_load_bytes"] = peak_rss_bytes()
        if device.type == "cuda":
            status["peak_cuda_bytes_after_load"] = torch.cuda.max_memory_allocated(device)
        status["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        tokens = read_tokens(args, model.config.vocab_size, model.config.max_seq_len)
        bad = tokens[(tokens < 0) | (tokens >= model.config.vocab_size)]
        if bad.numel():
            raise UsageError(f"token id {int(bad[0])} is outside the vocabulary [0, {model.config.vocab_size})")
        if tokens.shape[1] > model.config.max_seq_len:
            raise UsageError(f"{tokens.shape[1]} tokens exceed max_seq_len={model.config.max_seq_len}")
    except (UsageError, *BAD_INPUT_ERRORS) as e:  # reported by rank 0 for every rank, in one line each
        status["error"] = f"{type(e).__name__}: {one_line(e)}"
    # Every rank learns whether every rank loaded, so a failure on one rank never leaves the others
    # waiting in a collective.
    statuses: list = [None] * world
    dist.all_gather_object(statuses, status)
    failed = [s for s in statuses if s["error"]]
    if failed:
        if rank == 0:
            by_message: dict = {}
            for s in failed:
                by_message.setdefault(s["error"], []).append(str(s["rank"]))
            for message, ranks in by_message.items():
                print(f"tp_check: rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)}: {message}", file=sys.stderr)
        dist.destroy_process_group()
        return 2

    t0 = time.perf_counter()
    with torch.inference_mode():
        logits = model(tokens.to(device)).float().cpu()  # (bsz, seqlen, vocab_size) on every rank
    status["forward_seconds"] = time.perf_counter() - t0
    config, weight_dtype = model.config, model.tok_embeddings.weight.dtype
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    status["peak_rss_bytes"] = peak_rss_bytes()
    dist.all_gather_object(statuses, status)
    dist.barrier()  # every shard is freed before rank 0 loads the whole model

    code = 0
    if rank == 0:
        if args.save_logits:
            os.makedirs(os.path.dirname(os.path.abspath(args.save_logits)), exist_ok=True)
            torch.save(logits, args.save_logits)
        try:
            ref = run_reference(args, args.checkpoint, tokens, logits, device, dtype, compute_dtype, config,
                                weight_dtype)
        except Exception as e:  # reported, and the other ranks are not left waiting at the barrier below
            ref = {"ran": False, "reason": f"the single-process reference failed: {type(e).__name__}: {e}",
                   "max_abs_diff": None, "hf_ran": False, "hf_reason": None, "max_abs_diff_hf": None, "tol": args.tol}
        diffs = [d for d in (ref["max_abs_diff"], ref["max_abs_diff_hf"]) if d is not None]
        passed = all(d <= args.tol for d in diffs)
        code = 0 if passed else 1
        report = {
            "world_size": world, "backend": dist.get_backend(), "device": str(device),
            "checkpoint": os.path.abspath(args.checkpoint), "format": files.format,
            "shards": len(files.shards) if files.shards else None,
            "load_mode": load_mode(files, statuses),
            "weight_dtype": str(weight_dtype).removeprefix("torch."),
            "compute_dtype": str(compute_dtype).removeprefix("torch."), "kernel": args.kernel,
            "tokens_shape": list(tokens.shape), "logits_shape": list(logits.shape),
            "ranks": statuses, "reference": ref, "passed": passed,
        }
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
        line = f"tp_check: {world} ranks ({report['backend']}, {device}), {report['load_mode']} load, logits {tuple(logits.shape)}"
        if ref["ran"]:
            line += f"; max |diff| vs single process {ref['max_abs_diff']:.3g}"
            if ref["hf_ran"]:
                line += f", vs transformers {ref['max_abs_diff_hf']:.3g}"
            line += f" (tol {args.tol:g}): {'PASS' if passed else 'FAIL'}"
        else:
            line += f"; no reference ({ref['reason']})"
        print(line)
    dist.barrier()
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
