"""Load a full-size checkpoint and run one forward pass; report load time, peak RSS and forward time.

    python scripts/load_7b_check.py checkpoints/llama-2-7b-hf [--dtype bf16] [--tokens 16] [--json out/load_7b_check.json]

Run it in a fresh process (it is one): peak RSS (``ru_maxrss``) is a high-water mark for the whole
process. Weights are stored in ``--dtype`` and the forward computes in fp32 on CPU. ``--drop-cache``
first asks the kernel to evict the checkpoint's files from the page cache (``posix_fadvise``, only
those files), so the load time includes reading from disk.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from ..loading import detect_format, load_pretrained, parse_dtype
from ..usage import BAD_INPUT_ERRORS, OneLineParser, bad_input, positive_int


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def current_rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def checkpoint_files(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_file())


def drop_page_cache(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main(argv=None) -> int:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, nargs="?", default=Path("checkpoints/llama-2-7b-hf"),
                   help="checkpoint directory (default checkpoints/llama-2-7b-hf, relative to where it is run)")
    p.add_argument("--dtype", default="bf16", help="weight storage dtype (default bf16)")
    p.add_argument("--tokens", type=positive_int, default=16, help="prompt length")
    p.add_argument("--json", type=Path, default=Path("out/load_7b_check.json"), help="where to write the numbers")
    p.add_argument("--drop-cache", action="store_true", help="evict the checkpoint files from the page cache first")
    p.add_argument("--progress", action="store_true", help="show the loading progress bar")
    p.add_argument("--save-logits", type=Path, help="save the logits (torch.save) to compare layouts")
    p.add_argument("--compare-logits", type=Path, help="logits saved by an earlier run (e.g. the other layout)")
    args = p.parse_args(argv)
    try:
        return _run(args)
    except BAD_INPUT_ERRORS as e:  # a missing checkpoint, a bad --dtype, an unwritable --json: one line
        return bad_input("load_check", e)


def _run(args) -> int:
    dtype = parse_dtype(args.dtype, "--dtype")
    if not args.checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint {args.checkpoint}: no such directory")
    files = checkpoint_files(args.checkpoint)
    if args.drop_cache:
        drop_page_cache(files)
    torch.manual_seed(0)
    rss_before = peak_rss_gib()

    t0 = time.perf_counter()
    model = load_pretrained(args.checkpoint, device="cpu", dtype=dtype, progress=args.progress or None)
    load_s = time.perf_counter() - t0
    rss_after_load = peak_rss_gib()
    weight_gib = sum(t.numel() * t.element_size() for t in model.parameters()) / 2**30

    toks = torch.randint(0, model.config.vocab_size, (1, args.tokens))
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = model(toks)
        forward_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = model(toks)
        forward_repeat_s = time.perf_counter() - t0
    if not torch.isfinite(logits).all() or not torch.equal(logits, again):
        raise SystemExit("forward produced non-finite or non-deterministic logits")

    if args.save_logits:
        args.save_logits.parent.mkdir(parents=True, exist_ok=True)
        torch.save(logits, args.save_logits)
    max_diff = None
    if args.compare_logits:
        max_diff = float((logits - torch.load(args.compare_logits, weights_only=True)).abs().max())

    result = {
        "checkpoint": str(args.checkpoint),
        "format": detect_format(args.checkpoint),
        "files_gib": round(sum(f.stat().st_size for f in files) / 2**30, 3),
        "n_params": model.param_count(),
        "weight_dtype": str(dtype).removeprefix("torch."),
        "compute_dtype": str(model.compute_dtype).removeprefix("torch."),
        "weights_gib": round(weight_gib, 3),
        "page_cache_dropped": args.drop_cache,
        "load_s": round(load_s, 2),
        "forward_tokens": args.tokens,
        "forward_s": round(forward_s, 3),
        "forward_repeat_s": round(forward_repeat_s, 3),
        "peak_rss_gib_before_load": round(rss_before, 3),
        "peak_rss_gib_after_load": round(rss_after_load, 3),
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "rss_gib_end": round(current_rss_gib(), 3),
        "logits_shape": list(logits.shape),
        "logits_std": round(float(logits.std()), 4),
        "max_abs_diff_vs_compare_logits": max_diff,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB RAM",
    }
    for key, value in result.items():
        print(f"{key:>26}: {value}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
