"""Real weights: llama-ref against transformers on the same checkpoint, each in fresh processes, alternately.

What a new user feels: loading a checkpoint, the first forward (the pages fault in), a steady forward,
greedy decoding (eager, and ours compiled), the peak memory, and the wall time of ``llama-ref count CKPT``.
Every measurement runs in a fresh interpreter (``--child ours|hf``), so neither side inherits the other's
warm allocator or page mappings; the rounds alternate (A B, B A, ...), and each ratio is the median over
rounds of the within-round ratio with a bootstrap 95% interval (see :mod:`counters.studies.bench`).

Both sides compute in the dtype llama-ref's ``compute_dtype="auto"`` picks on this device
(:mod:`llama_ref.compute_dtype`): the checkpoint's bf16 on a CPU with AMX/AVX512-BF16 or on CUDA, fp32
elsewhere (transformers is then loaded in fp32, the same goals apply).

    python3 scripts/bench_weights.py checkpoints/llama-2-7b-hf          # -> out/bench-weights/
    python3 scripts/bench_weights.py CKPT --device cuda                # + bf16 prefill MFU, decode HBM fraction

Goals (side by side on one machine, never asserted by a test):

* load + first 16-token forward <= 0.8x transformers'; steady 16-token forward <= 0.9x;
* peak RSS <= transformers' + 0.25 GiB;
* eager decode >= 1.0x transformers' eager tokens/s; compiled decode >= 1.5x on a tiny model (the per-step
  overhead dominates there), and on a 7B shape >= 1.0x and >= 85% of the measured copy bandwidth (decode
  reads every weight once per token: it cannot beat the bandwidth);
* ``llama-ref count CKPT --tokens 16`` (4 counters) <= 3x transformers' load + first forward.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

GOALS = {"load_first_ratio_max": 0.8, "steady_ratio_max": 0.9, "rss_extra_gib_max": 0.25,
         "eager_decode_ratio_min": 1.0, "compiled_decode_ratio_min_tiny": 1.5, "compiled_decode_ratio_min": 1.0,
         "compiled_decode_bw_fraction_min": 0.85, "count_vs_hf_load_first_max": 3.0}
TINY_PARAMS = 10**8  # below this a model is "tiny" for the compiled-decode goal (per-step overhead dominates)


# ====================================================================== children (fresh interpreters)
def _prompt(vocab: int, n: int, seed: int = 0):
    import torch

    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _timed(fn, device) -> tuple[float, object]:
    from .timing import sync

    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def child_ours(ckpt: str, *, device: str, tokens: int, new_tokens: int, steady: int, compile: bool) -> dict:
    """Load with the defaults a user gets, then forward, decode eager and compiled."""
    import torch

    import llama_ref

    from .bench import peak_rss_mb

    dev = torch.device(device)
    load_s, model = _timed(lambda: llama_ref.load(ckpt, device=device), dev)
    x = _prompt(model.config.vocab_size, tokens).to(dev)
    with torch.inference_mode():
        first_s, logits = _timed(lambda: model(x), dev)
        steady_s = [_timed(lambda: model(x), dev)[0] for _ in range(steady)]
    rss_forward = peak_rss_mb()
    out = {"load_s": load_s, "first_forward_s": first_s, "steady_forward_s": statistics.median(steady_s),
           "peak_rss_mb_forward": rss_forward, "compute_dtype": str(model.compute_dtype).replace("torch.", ""),
           "compute_dtype_reason": model.compute_dtype_reason,
           "weight_dtype": str(model.tok_embeddings.weight.dtype).replace("torch.", ""),
           "logits_head": logits[0, -1, :8].float().tolist()}
    prompt = x[0].tolist()
    eager_s, eager_tokens = _timed(lambda: llama_ref.generate(model, [prompt], new_tokens), dev)
    out.update(eager_decode_s=eager_s, eager_tokens_per_s=new_tokens / eager_s, tokens=eager_tokens[0])
    out["peak_rss_mb"] = peak_rss_mb()  # after the same work as transformers' side: load, forwards, eager decode
    if compile:
        run = lambda: llama_ref.generate(model, [prompt], new_tokens, compile=True)[0]  # noqa: E731
        warm_s, _ = _timed(run, dev)  # compiles the one-token step
        compiled_s, compiled_tokens = _timed(run, dev)
        out.update(compile_s=warm_s - compiled_s, compiled_decode_s=compiled_s,
                   compiled_tokens_per_s=new_tokens / compiled_s, compiled_same_tokens=compiled_tokens == eager_tokens[0],
                   peak_rss_mb_compiled=peak_rss_mb())  # compiling has a footprint of its own, reported apart
    return out


def child_hf(ckpt: str, *, device: str, dtype: str, tokens: int, new_tokens: int, steady: int) -> dict:
    """transformers' ``from_pretrained`` in the compute dtype, its forward and its greedy ``generate``."""
    import torch
    import transformers

    from .bench import peak_rss_mb

    dev = torch.device(device)
    torch_dtype = getattr(torch, dtype)
    load_s, hf = _timed(lambda: transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch_dtype).to(dev).eval(), dev)
    x = _prompt(hf.config.vocab_size, tokens).to(dev)
    with torch.inference_mode():
        first_s, logits = _timed(lambda: hf(input_ids=x).logits, dev)
        steady_s = [_timed(lambda: hf(input_ids=x).logits, dev)[0] for _ in range(steady)]
    rss_forward = peak_rss_mb()
    with torch.inference_mode():
        gen_s, gen = _timed(lambda: hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                                min_new_tokens=new_tokens, do_sample=False, pad_token_id=0), dev)
    return {"load_s": load_s, "first_forward_s": first_s, "steady_forward_s": statistics.median(steady_s),
            "peak_rss_mb_forward": rss_forward, "eager_decode_s": gen_s, "eager_tokens_per_s": new_tokens / gen_s,
            "tokens": gen[0, tokens:].tolist(), "dtype": dtype, "logits_head": logits[0, -1, :8].float().tolist(),
            "peak_rss_mb": peak_rss_mb()}


def child_count(ckpt: str, tokens: int) -> dict:
    """The wall time of ``llama-ref count CKPT --tokens N`` as a user runs it (its own process)."""
    cmd = [sys.executable, "-m", "counters.cli", "count", ckpt, "--tokens", str(tokens), "--format", "json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:], "wall_s": wall}
    doc = json.loads(proc.stdout)
    return {"wall_s": wall, "agree": doc["agree"], "device": doc["device"], "counters": doc["counters"],
            "compute_dtype": doc.get("compute_dtype")}


# ====================================================================== the parent
def _run_child(args: list[str], timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.json")
        cmd = [sys.executable, "-m", __name__, "--child-out", path, *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"child {' '.join(args[:2])} failed (exit {proc.returncode}): {' | '.join(tail)}")
        return json.loads(Path(path).read_text())


def _ratio(ours: list[float], hf: list[float]) -> dict:
    from .bench import bootstrap_median_ci

    per_round = [a / b for a, b in zip(ours, hf)]
    return {"ratio": statistics.median(per_round), "ci95": bootstrap_median_ci(per_round), "per_round": per_round}


def checkpoint_facts(ckpt: str, device: str) -> dict:
    """The checkpoint's config, weight dtype and size (read on meta: headers only), and the compute dtype the
    auto rule picks for it on ``device``."""
    import torch

    import llama_ref
    from llama_ref.compute_dtype import resolve_compute_dtype
    from llama_ref.shapes import param_count

    model = llama_ref.load(ckpt, device="meta")
    weight_dtype = model.tok_embeddings.weight.dtype
    compute, reason = resolve_compute_dtype("auto", torch.device(device), weight_dtype)
    return {"config": model.config, "params": param_count(model.config), "weight_dtype": weight_dtype,
            "weight_bytes": param_count(model.config) * weight_dtype.itemsize, "compute_dtype": compute,
            "compute_dtype_reason": reason}


def run(ckpt: str, *, device: str = "cpu", rounds: int = 3, tokens: int = 16, new_tokens: int = 32, steady: int = 3,
        compile: bool = True, count: bool = True, timeout: float = 3600,
        log=print) -> dict:
    import torch

    from .bench import machine_info, verdict
    from .hardware import measure_copy_bandwidth, measure_matmul_peak

    facts = checkpoint_facts(ckpt, device)
    if tokens + new_tokens > facts["config"].max_seq_len:
        raise ValueError(f"--tokens {tokens} + --new-tokens {new_tokens} = {tokens + new_tokens} exceeds the model's "
                         f"max_seq_len {facts['config'].max_seq_len}")
    cdtype = str(facts["compute_dtype"]).replace("torch.", "")
    log(f"checkpoint {ckpt}: {facts['params']:,} weights in {facts['weight_dtype']}; compute dtype {cdtype} "
        f"({facts['compute_dtype_reason']})")
    common = ["--device", device, "--tokens", str(tokens), "--new-tokens", str(new_tokens), "--steady", str(steady)]
    ours_args = ["--child", "ours", ckpt, *common] + ([] if compile else ["--no-compile"])
    hf_args = ["--child", "hf", ckpt, *common, "--dtype", cdtype]
    samples: dict[str, list[dict]] = {"ours": [], "hf": []}
    for r in range(rounds):
        order = ("ours", "hf") if r % 2 == 0 else ("hf", "ours")
        for side in order:
            log(f"round {r + 1}/{rounds}: {side}")
            samples[side].append(_run_child(ours_args if side == "ours" else hf_args, timeout))
    ours, hf = samples["ours"], samples["hf"]
    lf = lambda s: s["load_s"] + s["first_forward_s"]  # noqa: E731
    doc: dict = {"schema": "llama-ref.bench-weights/1", "checkpoint": ckpt, "device": device, "rounds": rounds,
                 "tokens": tokens, "new_tokens": new_tokens, "params": facts["params"],
                 "weight_dtype": str(facts["weight_dtype"]).replace("torch.", ""), "compute_dtype": cdtype,
                 "compute_dtype_reason": facts["compute_dtype_reason"], "machine": machine_info(torch.get_num_threads()),
                 "goals": GOALS, "samples": samples}
    res = doc["results"] = {}
    res["load_s"] = _ratio([s["load_s"] for s in ours], [s["load_s"] for s in hf])
    res["load_first_forward"] = _ratio([lf(s) for s in ours], [lf(s) for s in hf])
    res["first_forward"] = _ratio([s["first_forward_s"] for s in ours], [s["first_forward_s"] for s in hf])
    res["steady_forward"] = _ratio([s["steady_forward_s"] for s in ours], [s["steady_forward_s"] for s in hf])
    res["eager_decode"] = _ratio([s["eager_tokens_per_s"] for s in ours], [s["eager_tokens_per_s"] for s in hf])
    rss_extra = [(a["peak_rss_mb"] - b["peak_rss_mb"]) / 1024 for a, b in zip(ours, hf)]
    res["peak_rss_extra_gib"] = {"median": statistics.median(rss_extra), "per_round": rss_extra,
                                 "ours_mb": statistics.median(s["peak_rss_mb"] for s in ours),
                                 "hf_mb": statistics.median(s["peak_rss_mb"] for s in hf)}
    res["same_greedy_tokens"] = all(a["tokens"] == b["tokens"] for a, b in zip(ours, hf))
    checks = doc["checks"] = {}
    checks["load + first forward"] = verdict(res["load_first_forward"]["ratio"], res["load_first_forward"]["ci95"],
                                             GOALS["load_first_ratio_max"], higher_is_better=False)
    checks["steady forward"] = verdict(res["steady_forward"]["ratio"], res["steady_forward"]["ci95"],
                                       GOALS["steady_ratio_max"], higher_is_better=False)
    checks["peak RSS"] = "met" if max(rss_extra) <= GOALS["rss_extra_gib_max"] else (
        "not met" if min(rss_extra) > GOALS["rss_extra_gib_max"] else "within noise")
    checks["eager decode"] = verdict(res["eager_decode"]["ratio"], res["eager_decode"]["ci95"],
                                     GOALS["eager_decode_ratio_min"], higher_is_better=True)
    if compile:
        res["compiled_decode"] = _ratio([s["compiled_tokens_per_s"] for s in ours], [s["eager_tokens_per_s"] for s in hf])
        res["compiled_vs_eager_ours"] = _ratio([s["compiled_tokens_per_s"] for s in ours],
                                               [s["eager_tokens_per_s"] for s in ours])
        tiny = facts["params"] < TINY_PARAMS
        goal = GOALS["compiled_decode_ratio_min_tiny" if tiny else "compiled_decode_ratio_min"]
        checks["compiled decode"] = verdict(res["compiled_decode"]["ratio"], res["compiled_decode"]["ci95"], goal,
                                            higher_is_better=True)
        if device == "cpu":
            # Decode reads every weight once per token; the KV cache and activations are small beside it.
            bw = measure_copy_bandwidth("cpu")
            per_token = facts["weight_bytes"]
            frac = [s["compiled_tokens_per_s"] * per_token / bw for s in ours]
            res["compiled_decode_bandwidth"] = {"copy_bandwidth_bytes_per_s": bw, "bytes_per_token": per_token,
                                                "fraction": statistics.median(frac), "per_round": frac}
            if not tiny:
                checks["compiled decode bandwidth"] = (
                    "met" if min(frac) >= GOALS["compiled_decode_bw_fraction_min"] else
                    "not met" if max(frac) < GOALS["compiled_decode_bw_fraction_min"] else "within noise")
    if device == "cuda":
        from llama_ref.shapes import param_count

        from .hardware import detect_table_name, device_name, table_hardware

        name = detect_table_name(device_name("cuda"))
        hw = table_hardware(name, "bf16") if name else None
        peak = hw.peak_flops if hw else measure_matmul_peak("cuda", facts["compute_dtype"])
        flops = 2 * param_count(facts["config"]) * tokens  # the matmul FLOPs of a short prefill, to first order
        res["prefill_mfu"] = statistics.median(flops / s["steady_forward_s"] / peak for s in ours)
        if hw:
            res["decode_hbm_fraction"] = statistics.median(s["eager_tokens_per_s"] * facts["weight_bytes"] / hw.mem_bw
                                                           for s in ours)
    if count:
        log("llama-ref count, timed")
        runs = [child_count(ckpt, tokens) for _ in range(max(1, rounds // 2))]
        if "error" in runs[0]:
            raise RuntimeError(f"llama-ref count {ckpt} failed: {runs[0]['error']}")
        wall = statistics.median(r["wall_s"] for r in runs)
        hf_lf = statistics.median(lf(s) for s in hf)
        res["count"] = {"wall_s": wall, "vs_hf_load_first_forward": wall / hf_lf, "runs": runs}
        checks["llama-ref count"] = "met" if wall / hf_lf <= GOALS["count_vs_hf_load_first_max"] else "not met"
    return doc


# ====================================================================== report
def format_report(doc: dict) -> str:
    res = doc["results"]

    def ci(key: str) -> str:
        r = res[key]
        return f"{r['ratio']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"

    med = lambda side, key: statistics.median(s[key] for s in doc["samples"][side])  # noqa: E731
    lines = [f"real weights: {doc['checkpoint']} ({doc['params']:,} weights, {doc['weight_dtype']}), device "
             f"{doc['device']}, compute {doc['compute_dtype']} ({doc['compute_dtype_reason']}); {doc['rounds']} "
             "alternating rounds, each side in fresh processes",
             "| | llama-ref | transformers | ratio [95% CI] | goal | verdict |", "|---|---|---|---|---|---|"]
    lf = lambda side: statistics.median(s["load_s"] + s["first_forward_s"] for s in doc["samples"][side])  # noqa: E731
    lines.append(f"| load | {med('ours', 'load_s'):.2f} s | {med('hf', 'load_s'):.2f} s | {ci('load_s')} | | |")
    lines.append(f"| load + first {doc['tokens']}-token forward | {lf('ours'):.2f} s | {lf('hf'):.2f} s | "
                 f"{ci('load_first_forward')} | <= {GOALS['load_first_ratio_max']} | {doc['checks']['load + first forward']} |")
    lines.append(f"| steady {doc['tokens']}-token forward | {med('ours', 'steady_forward_s'):.3f} s | "
                 f"{med('hf', 'steady_forward_s'):.3f} s | {ci('steady_forward')} | <= {GOALS['steady_ratio_max']} | "
                 f"{doc['checks']['steady forward']} |")
    rss = res["peak_rss_extra_gib"]
    lines.append(f"| peak RSS | {rss['ours_mb'] / 1024:.2f} GiB | {rss['hf_mb'] / 1024:.2f} GiB | "
                 f"{rss['median']:+.2f} GiB | <= +{GOALS['rss_extra_gib_max']} GiB | {doc['checks']['peak RSS']} |")
    lines.append(f"| eager decode, tokens/s | {med('ours', 'eager_tokens_per_s'):.2f} | {med('hf', 'eager_tokens_per_s'):.2f} | "
                 f"{ci('eager_decode')} | >= {GOALS['eager_decode_ratio_min']} | {doc['checks']['eager decode']} |")
    if "compiled_decode" in res:
        goal = GOALS["compiled_decode_ratio_min_tiny" if doc["params"] < TINY_PARAMS else "compiled_decode_ratio_min"]
        lines.append(f"| compiled decode (ours) vs eager (HF), tokens/s | {med('ours', 'compiled_tokens_per_s'):.2f} | "
                     f"{med('hf', 'eager_tokens_per_s'):.2f} | {ci('compiled_decode')} | >= {goal} | "
                     f"{doc['checks']['compiled decode']} |")
        if "compiled_decode_bandwidth" in res:
            bw = res["compiled_decode_bandwidth"]
            lines.append(f"| compiled decode, fraction of copy bandwidth ({bw['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s) | "
                         f"{bw['fraction']:.2f} | | | >= {GOALS['compiled_decode_bw_fraction_min']} (7B) | "
                         f"{doc['checks'].get('compiled decode bandwidth', 'n/a (tiny)')} |")
    if "count" in res:
        c = res["count"]
        lines.append(f"| `llama-ref count CKPT --tokens {doc['tokens']}` | {c['wall_s']:.1f} s | | "
                     f"{c['vs_hf_load_first_forward']:.2f}x HF load+first | <= {GOALS['count_vs_hf_load_first_max']}x | "
                     f"{doc['checks']['llama-ref count']} |")
    lines.append(f"greedy tokens identical: {res['same_greedy_tokens']}")
    for key in ("prefill_mfu", "decode_hbm_fraction"):
        if key in res:
            lines.append(f"{key}: {res[key]:.3f}")
    return "\n".join(lines)


def plot(doc: dict, path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import save_figure

    res = doc["results"]
    keys = [k for k in ("load_first_forward", "steady_forward", "eager_decode", "compiled_decode") if k in res]
    labels = {"load_first_forward": "load + first\n(time, lower wins)", "steady_forward": "steady forward\n(time)",
              "eager_decode": "eager decode\n(tokens/s, higher wins)", "compiled_decode": "compiled decode\n(tokens/s)"}
    fig, ax = plt.subplots(figsize=(8, 3.6))
    vals = [res[k]["ratio"] for k in keys]
    err = [[v - res[k]["ci95"][0] for k, v in zip(keys, vals)], [res[k]["ci95"][1] - v for k, v in zip(keys, vals)]]
    ax.bar([labels[k] for k in keys], vals, yerr=err, capsize=4, color="tab:blue")
    ax.axhline(1.0, color="black", lw=1)
    ax.set_ylabel("llama-ref / transformers")
    ax.set_title(f"{Path(doc['checkpoint']).name}: {doc['params'] / 1e9:.2f}B, {doc['compute_dtype']}, {doc['device']}",
                 fontsize=9)
    return save_figure(fig, path, dpi=110)


# ====================================================================== command line
def parse_args(argv: Optional[Sequence[str]] = None):
    from llama_ref.usage import OneLineParser

    ap = OneLineParser(prog="bench_weights.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a checkpoint directory (HF or Meta layout)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (each side loads once per round)")
    ap.add_argument("--tokens", type=int, default=16, help="tokens of the timed forward and the decode prompt")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens decoded")
    ap.add_argument("--steady", type=int, default=3, help="steady forwards timed per process (median)")
    ap.add_argument("--no-compile", action="store_true", help="skip ours compiled decode")
    ap.add_argument("--no-count", action="store_true", help="skip timing `llama-ref count`")
    ap.add_argument("--out", default="out/bench-weights", help="directory for bench_weights.json and .png")
    ap.add_argument("--child", choices=("ours", "hf"), help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name in ("rounds", "tokens", "new_tokens", "steady"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not os.path.isdir(args.checkpoint):
        ap.error(f"{args.checkpoint} is not a checkpoint directory")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.child:
        if args.child == "ours":
            out = child_ours(args.checkpoint, device=args.device, tokens=args.tokens, new_tokens=args.new_tokens,
                             steady=args.steady, compile=not args.no_compile)
        else:
            out = child_hf(args.checkpoint, device=args.device, dtype=args.dtype, tokens=args.tokens,
                           new_tokens=args.new_tokens, steady=args.steady)
        Path(args.child_out).write_text(json.dumps(out))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("bench_weights.py: --device cuda: CUDA is not available on this machine (this torch sees no GPU); "
                  "run it where one is, or use --device cpu", file=sys.stderr)
            return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        doc = run(args.checkpoint, device=args.device, rounds=args.rounds, tokens=args.tokens,
                  new_tokens=args.new_tokens, steady=args.steady, compile=not args.no_compile, count=not args.no_count,
                  log=lambda m: print(m, file=sys.stderr))
    except (ValueError, OSError) as e:  # a checkpoint the loader refuses, or sizes the model cannot take
        print(f"bench_weights.py: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    (out_dir / "bench_weights.json").write_text(json.dumps(doc, indent=1, default=str))
    plot(doc, out_dir / "bench_weights.png")
    print(format_report(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
