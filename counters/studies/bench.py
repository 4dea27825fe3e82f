"""Speed of llama-ref against transformers, side by side in one process, plus counting costs.

Same config, same weights (transformers' model is built from ours through ``llama_ref.hf``), same
``torch`` threads, fp32 on CPU (and bf16 on CUDA when a GPU is present). Every comparison runs the
contenders *interleaved* (one run of each per round, cycling through every order of them). A ratio is
the median over rounds of the within-round ratio (the contenders ran seconds apart, so a slow spell
of a shared machine mostly cancels), with a bootstrap 95% interval; ratios of medians and of minima
are in the JSON beside it. A goal is reported ``met`` / ``not met`` only when the whole interval is
on one side of it, else ``within noise`` (on a shared 2-core VM runs of the same forward vary by
+-15%, so a few percent cannot be resolved).

* prefill: llama-ref time / transformers time, 7B-layer-shaped model (dim 4096, FFN 11008, 32 heads,
  2 layers, vocab 32000), N=256 tokens; goal <= 1.0. Our ``sdpa`` kernel is the contender; the
  reference ``math`` kernel is reported too.
* cached decode of 64 tokens (greedy, after a short prompt): tokens/s ratio llama-ref / transformers;
  goal >= 1.0. Both must produce the same tokens.
* efficiency: analytic FLOPs / measured time, divided by this machine's measured fp32 matmul peak
  (decode also as analytic bytes / time over the measured copy bandwidth).
* counting overhead: time of ``count_hooks`` / ``count_fvcore`` / ``count_torch`` over a plain
  forward of the same model (math kernel, ``torch.no_grad``); goal: hooks <= 1.05x.
* ``llama-2-70b`` counted on the meta device (a fresh subprocess, so its peak RSS is its own):
  seconds per counter and peak RSS.

    python3 scripts/bench.py                 # full size (a few minutes on 2 cores)
    python3 scripts/bench.py --quick         # tiny shapes, seconds (what the tests run)

(``scripts/bench.py`` runs :func:`main` of this module.)

Writes ``bench.json`` and ``bench.png`` to ``--out`` (default ``out/bench``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from llama_ref.config import PRESETS, LlamaConfig
from llama_ref.hf import hf_forward_with_cache
from llama_ref.model import Llama
from llama_ref.usage import OneLineParser

from ..analytic import analyze
from ..commands.common import BadInput, check_int, check_output_dir
from ..crosscheck import COUNTER_FUNCTIONS
from .factory import random_model
from .hardware import available_cpus, detect_table_name, device_name, measure_device, table_hardware
from .plots import save_figure
from .timing import sync
from .validate import build_hf_twin

GOALS = {"prefill_ratio_max": 1.0, "decode_ratio_min": 1.0, "hooks_overhead_max": 1.05}

FULL = dict(
    config=LlamaConfig(name="7b-layer-shape-2L", dim=4096, n_layers=2, n_heads=32, n_kv_heads=32,
                       vocab_size=32000, hidden_dim=11008, max_seq_len=4096),
    prefill_tokens=256, prompt_tokens=32, decode_tokens=64, prefill_repeats=15, decode_repeats=5,
    count_repeats=9, meta_model="llama-2-70b", meta_tokens=2048,
)
QUICK = dict(
    config=LlamaConfig(name="quick-2L", dim=128, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=512,
                       hidden_dim=352, max_seq_len=256),
    prefill_tokens=32, prompt_tokens=8, decode_tokens=8, prefill_repeats=3, decode_repeats=3,
    count_repeats=3, meta_model="llama-2-70b", meta_tokens=2048,
)


# ====================================================================== timing helpers
def round_order(names: Sequence[str], r: int, *, seed: int = 0) -> list[str]:
    """The order of round ``r``: every permutation of ``names`` in turn (a fixed shuffled cycle).

    Not a rotation: rotating keeps the cyclic order, so each contender would always run right after
    the same other one, and anything a run leaves behind (freed memory, caches, clocks) would favour
    one contender systematically. Cycling through all permutations balances who follows whom."""
    import itertools
    import random

    perms = list(itertools.permutations(names))
    random.Random(seed).shuffle(perms)
    return list(perms[r % len(perms)])


def interleaved(contenders: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 1,
                device: torch.device) -> dict[str, list[float]]:
    """Seconds of each contender per round; each round runs every contender once, in the order
    :func:`round_order` gives."""
    names = list(contenders)
    for _ in range(warmup):
        for n in names:
            contenders[n]()
    sync(device)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in round_order(names, r):
            sync(device)
            t0 = time.perf_counter()
            contenders[n]()
            sync(device)
            samples[n].append(time.perf_counter() - t0)
    return samples


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in samples.items()}


def paired_ratio(samples: dict[str, list[float]], num: str, den: str) -> dict:
    """``num`` time over ``den`` time, estimated three ways from interleaved rounds.

    ``paired_median`` (the headline): the median over rounds of the ratio *within* a round; the two
    ran seconds apart, so a slow spell of a shared machine mostly cancels. ``of_medians`` and
    ``of_mins`` (the min is each contender's least-disturbed run) are reported beside it."""
    a, b = samples[num], samples[den]
    per_round = [x / y for x, y in zip(a, b)]
    return {
        "paired_median": statistics.median(per_round),
        "ci95": bootstrap_median_ci(per_round),
        "of_medians": statistics.median(a) / statistics.median(b),
        "of_mins": min(a) / min(b),
        "per_round": per_round,
    }


def bootstrap_median_ci(values: Sequence[float], *, level: float = 0.95, resamples: int = 2000,
                        seed: int = 0) -> list[float]:
    """Percentile-bootstrap confidence interval of the median (deterministic: fixed seed)."""
    import random

    if len(values) < 2:
        return [values[0], values[0]] if values else [float("nan")] * 2
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    lo = meds[int((1 - level) / 2 * resamples)]
    hi = meds[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return [lo, hi]


def verdict(ratio: float, ci: Sequence[float], goal: float, *, higher_is_better: bool) -> str:
    """``met`` / ``not met`` when the whole 95% interval is on one side of the goal, else ``within noise``."""
    lo, hi = ci
    if higher_is_better:
        return "met" if lo >= goal else ("not met" if hi < goal else "within noise")
    return "met" if hi <= goal else ("not met" if lo > goal else "within noise")


# ====================================================================== the contenders
def build_pair(config: LlamaConfig, *, device, dtype: torch.dtype, seed: int = 0):
    """Our model (random weights made on ``device``) and transformers' model with the same weights."""
    ours = random_model(config, device=device, dtype=dtype, seed=seed, attn_kernel="sdpa", compute_dtype=dtype)
    hf = build_hf_twin(ours, attn_implementation="sdpa")
    return ours, hf


def bench_prefill(ours, hf, *, seqlen: int, repeats: int, seed: int = 0) -> dict:
    device = ours.device
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, ours.config.vocab_size, (1, seqlen), generator=gen).to(device)

    def ours_fwd(attn_kernel):
        def f():
            ours.set_attn_kernel(attn_kernel)
            with torch.inference_mode():
                return ours(tokens)
        return f

    def hf_fwd():
        with torch.inference_mode():
            return hf(input_ids=tokens, use_cache=False).logits

    contenders = {"llama_ref_sdpa": ours_fwd("sdpa"), "llama_ref_math": ours_fwd("math"), "transformers_sdpa": hf_fwd}
    samples = interleaved(contenders, repeats=repeats, device=device)
    med = medians(samples)
    with torch.inference_mode():
        a = contenders["llama_ref_sdpa"]().float()
        b = hf_fwd().float()
    rel = ((a - b).abs().max() / b.abs().max()).item()
    flops = analyze(ours.config, seqlen=seqlen).total.total_flops
    pr = paired_ratio(samples, "llama_ref_sdpa", "transformers_sdpa")
    return {
        "n_tokens": seqlen, "repeats": repeats, "median_s": med, "samples_s": samples,
        # time ratio llama-ref / transformers (lower is better)
        "ratio": pr["paired_median"], "ci95": pr["ci95"], "ratio_detail": pr,
        "ratio_math": paired_ratio(samples, "llama_ref_math", "transformers_sdpa")["paired_median"],
        "goal": f"ratio <= {GOALS['prefill_ratio_max']}",
        "met": pr["paired_median"] <= GOALS["prefill_ratio_max"],
        "verdict": verdict(pr["paired_median"], pr["ci95"], GOALS["prefill_ratio_max"], higher_is_better=False),
        "analytic_flops": flops,
        "achieved_flops_per_s": {k: flops / v for k, v in med.items()},
        "logits_max_rel_diff": rel,
    }


def bench_decode(ours, hf, *, prompt_tokens: int, new_tokens: int, repeats: int, seed: int = 0) -> dict:
    """Greedy decode: the prompt's forward gives the first token (untimed), then ``new_tokens`` cached
    decode steps (N=1 each) are timed.

    Interleaved *step by step*: at every position each contender takes its own next step (in every
    order in turn), so the two steps of a pair run milliseconds apart and a shared machine's slow spells
    cancel in their ratio. Each contender keeps its own KV cache and its own tokens."""
    device = ours.device
    gen = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randint(0, ours.config.vocab_size, (1, prompt_tokens), generator=gen).to(device)
    names = ("llama_ref_sdpa", "llama_ref_math", "transformers_sdpa")
    produced: dict[str, list[int]] = {}
    step_samples: dict[str, list[float]] = {n: [] for n in names}
    samples: dict[str, list[float]] = {n: [] for n in names}  # per round: total of its timed steps

    for r in range(repeats + 1):  # round 0 is the warm-up
        state: dict[str, dict] = {}
        with torch.inference_mode():
            for attn_kernel in ("sdpa", "math"):
                ours.set_attn_kernel(attn_kernel)
                ours.setup_cache(1, prompt_tokens + new_tokens)
                nxt = ours(prompt, 0)[:, -1].argmax(-1, keepdim=True)
                state[f"llama_ref_{attn_kernel}"] = {"caches": ours.caches, "next": nxt, "out": [nxt], "kernel": attn_kernel}
            logits, hf_cache = hf_forward_with_cache(hf, prompt)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            state["transformers_sdpa"] = {"cache": hf_cache, "next": nxt, "out": [nxt]}

            def step(name: str, i: int) -> None:
                st = state[name]
                if name == "transformers_sdpa":
                    logits, st["cache"] = hf_forward_with_cache(hf, st["next"], st["cache"])
                else:
                    ours.set_attn_kernel(st["kernel"])
                    ours.caches = st["caches"]
                    logits = ours(st["next"], prompt_tokens + i)
                st["next"] = logits[:, -1].argmax(-1, keepdim=True)
                st["out"].append(st["next"])

            totals = dict.fromkeys(names, 0.0)
            for i in range(new_tokens):
                for name in round_order(names, r * new_tokens + i):
                    sync(device)
                    t0 = time.perf_counter()
                    step(name, i)
                    sync(device)
                    dt = time.perf_counter() - t0
                    totals[name] += dt
                    if r:
                        step_samples[name].append(dt)
        ours.clear_cache()
        if r:
            for n in names:
                samples[n].append(totals[n])
        for n in names:
            produced[n] = torch.cat(state[n]["out"], 1)[0].tolist()

    steps = new_tokens  # decode steps timed (the prompt's forward, which yields the first token, is not)
    # Step pairs: HF step time / our step time = our tokens/s / HF tokens/s.
    pr = paired_ratio(step_samples, "transformers_sdpa", "llama_ref_sdpa")
    med = medians(samples)
    tps = {k: steps / v for k, v in med.items()}
    # Analytic cost of the timed steps: step i attends to prompt + i + 1 positions.
    flops = nbytes = 0
    for i in range(steps):
        rep = analyze(ours.config, seqlen=1, start_pos=prompt_tokens + i,
                      weight_dtype_bytes=torch.finfo(ours.compute_dtype).bits // 8,
                      act_dtype_bytes=torch.finfo(ours.compute_dtype).bits // 8)
        flops += rep.total.total_flops
        nbytes += rep.total.bytes
    return {
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "timed_steps": steps, "repeats": repeats,
        "median_s": med, "samples_s": samples, "tokens_per_s": tps, "pairs": len(step_samples["llama_ref_sdpa"]),
        "step_median_s": {k: statistics.median(v) for k, v in step_samples.items()},
        # tokens/s ratio llama-ref / transformers = transformers time / llama-ref time (higher is better)
        "ratio": pr["paired_median"], "ci95": pr["ci95"], "ratio_detail": pr,
        "ratio_math": paired_ratio(step_samples, "transformers_sdpa", "llama_ref_math")["paired_median"],
        "ratio_of_round_medians": med["transformers_sdpa"] / med["llama_ref_sdpa"],
        "goal": f"ratio >= {GOALS['decode_ratio_min']}",
        "met": pr["paired_median"] >= GOALS["decode_ratio_min"],
        "verdict": verdict(pr["paired_median"], pr["ci95"], GOALS["decode_ratio_min"], higher_is_better=True),
        "same_tokens": len({tuple(v) for v in produced.values()}) == 1,
        "analytic_flops": flops, "analytic_bytes": nbytes,
        "achieved_flops_per_s": {k: flops / v for k, v in med.items()},
        "achieved_bytes_per_s": {k: nbytes / v for k, v in med.items()},
    }


def _counting_contenders(model, tokens, counters: Sequence[str]) -> dict[str, Callable]:
    def plain():
        with torch.no_grad():
            return model(tokens)

    contenders: dict[str, Callable] = {"plain": plain}
    for name in counters:
        contenders[name] = (lambda fn=COUNTER_FUNCTIONS[name]: fn(model, tokens, 0))
    return contenders


def probe_config(config: LlamaConfig) -> LlamaConfig:
    """Same depth (the same module calls and ops per forward), tiny width: a counter's fixed cost."""
    return LlamaConfig(name=f"{config.name}-probe", dim=64, n_layers=config.n_layers, n_heads=4, n_kv_heads=4,
                       vocab_size=256, hidden_dim=176, max_seq_len=config.max_seq_len)


def bench_counting(model, *, seqlen: int, repeats: int, counters: Sequence[str] = ("hooks", "fvcore", "torch"),
                   probe_repeats: int = 30, seed: int = 0) -> dict:
    """Counted forward / plain forward, same model (math kernel), same tokens, both under no_grad.

    Measured directly (noisy on a shared machine: runs of the same forward vary up to 2x here), and
    estimated from each counter's *fixed* cost: hooks and op counters do per-call Python work that
    does not depend on the width, so ``t(counter) - t(plain)`` on a same-depth tiny model (ms-long
    runs, many repeats, little noise) added to the full model's plain time gives the overhead the
    full model pays, ``1 + extra / t_plain``."""
    device = model.device
    model.set_attn_kernel("math")
    gen = torch.Generator().manual_seed(seed + 2)
    tokens = torch.randint(0, model.config.vocab_size, (1, seqlen), generator=gen).to(device)
    contenders = _counting_contenders(model, tokens, counters)
    samples = interleaved(contenders, repeats=repeats, device=device)
    med = medians(samples)
    details = {k: paired_ratio(samples, k, "plain") for k in samples if k != "plain"}
    ratios = {k: d["paired_median"] for k, d in details.items()}

    probe = random_model(probe_config(model.config), device=device, dtype=model.tok_embeddings.weight.dtype,
                         attn_kernel="math", compute_dtype=model.compute_dtype)
    ptokens = torch.randint(0, probe.config.vocab_size, (1, seqlen), generator=gen).to(device)
    pcont = _counting_contenders(probe, ptokens, counters)
    psamples = interleaved(pcont, repeats=probe_repeats, device=device)
    pmed = medians(psamples)
    extra = {k: pmed[k] - pmed["plain"] for k in pmed if k != "plain"}
    estimate = {k: 1 + v / med["plain"] for k, v in extra.items()}
    return {
        "n_tokens": seqlen, "attn_kernel": "math", "repeats": repeats, "median_s": med, "samples_s": samples,
        "overhead_ratio": ratios, "overhead_detail": details,
        "fixed_cost": {"probe_config": probe.config.to_dict(), "probe_repeats": probe_repeats,
                       "probe_median_s": pmed, "extra_s": extra},
        "overhead_estimate": estimate,
        "goal": f"hooks <= {GOALS['hooks_overhead_max']}x",
        "met": ratios.get("hooks", float("inf")) <= GOALS["hooks_overhead_max"],
        "verdict": (verdict(ratios["hooks"], details["hooks"]["ci95"], GOALS["hooks_overhead_max"],
                            higher_is_better=False) if "hooks" in ratios else "not measured"),
        "met_by_estimate": estimate.get("hooks", float("inf")) <= GOALS["hooks_overhead_max"],
    }


# ====================================================================== 70B on meta (child process)
def peak_rss_mb() -> float:
    """This process's peak resident set (``VmHWM``), in MiB.

    Not ``getrusage().ru_maxrss``: Linux carries that across ``execve``, so a child spawned by a big
    parent would report the parent's peak. ``VmHWM`` belongs to the process's own address space."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def meta_count_child(model_name: str, seqlen: int, counters: Sequence[str]) -> dict:
    """Runs in a fresh interpreter: build ``model_name`` on the meta device and count one prefill."""
    rss0 = peak_rss_mb()
    config = PRESETS[model_name]
    rss_imports = peak_rss_mb()
    t0 = time.perf_counter()
    model = Llama(config, device="meta", dtype=torch.bfloat16).eval()
    build_s = time.perf_counter() - t0
    tokens = torch.zeros((1, seqlen), dtype=torch.long, device="meta")
    t0 = time.perf_counter()
    expected = analyze(config, seqlen=seqlen).as_counter_result()
    analytic_s = time.perf_counter() - t0
    out = {"model": model_name, "n_tokens": seqlen, "params": model.param_count(), "build_s": build_s,
           "analytic_s": analytic_s, "analytic_macs": expected.total.macs, "counters": {}}
    for name in counters:
        fn = COUNTER_FUNCTIONS[name]
        t0 = time.perf_counter()
        try:
            res = fn(model, tokens, 0)
        except Exception as e:  # noqa: BLE001 - report which counters cannot run on meta
            out["counters"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}",
                                     "seconds": time.perf_counter() - t0}
            continue
        dt = time.perf_counter() - t0
        agree = all(res.get(k) == expected.get(k) for k in set(res.rows) | set(expected.rows))
        out["counters"][name] = {"seconds": dt, "macs": res.total.macs, "agree_with_analytic": agree}
    out.update({"peak_rss_mb": peak_rss_mb(), "rss_after_imports_mb": rss_imports, "rss_at_start_mb": rss0})
    return out


def bench_meta(model_name: str, seqlen: int, counters: Sequence[str], *, timeout: float = 600) -> dict:
    cmd = [sys.executable, "-m", __name__, "--_meta-child", model_name, "--meta-tokens", str(seqlen),
           "--meta-counters", ",".join(counters)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"model": model_name, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:],
                "wall_s": wall}
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    data["process_wall_s"] = wall
    return data


# ====================================================================== machine
def machine_info(threads: int) -> dict:
    info = {
        "cpu": device_name("cpu"), "logical_cpus": os.cpu_count(), "torch_threads": threads,
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "loadavg_start": os.getloadavg(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def run_device(device: torch.device, dtype: torch.dtype, p: dict, *, measure_peaks: Callable[[], object],
               counting: bool, log) -> dict:
    """The comparisons on one device. ``measure_peaks()`` is called before and after them: on a shared
    machine a single measurement can land in a busy spell, so the higher of the two is the peak."""
    dname = str(dtype).replace("torch.", "")
    before = measure_peaks()
    log(f"[{device}] building {p['config'].name} ({dname}) and its transformers twin ...")
    t0 = time.perf_counter()
    ours, hf = build_pair(p["config"], device=device, dtype=dtype)
    out = {"device": str(device), "dtype": dname, "config": p["config"].to_dict(), "build_s": time.perf_counter() - t0}
    log(f"[{device}] prefill N={p['prefill_tokens']} x{p['prefill_repeats']} ...")
    out["prefill"] = bench_prefill(ours, hf, seqlen=p["prefill_tokens"], repeats=p["prefill_repeats"])
    log(f"[{device}] decode {p['decode_tokens']} tokens x{p['decode_repeats']} ...")
    out["decode"] = bench_decode(ours, hf, prompt_tokens=p["prompt_tokens"], new_tokens=p["decode_tokens"],
                                 repeats=p["decode_repeats"])
    del hf
    if counting:
        log(f"[{device}] counting overhead x{p['count_repeats']} ...")
        out["counting"] = bench_counting(ours, seqlen=p["prefill_tokens"], repeats=p["count_repeats"])
    del ours
    if device.type == "cuda":
        torch.cuda.empty_cache()
    after = measure_peaks()
    add_efficiency(out, peak_flops=max(before.peak_flops, after.peak_flops), mem_bw=max(before.mem_bw, after.mem_bw))
    out["peaks_measured"] = {"before": before.to_dict(), "after": after.to_dict()}
    out["peaks_source"] = before.source + "; the higher of a measurement before and after the comparisons"
    return out


def add_efficiency(sec: dict, *, peak_flops: float, mem_bw: float) -> None:
    """Efficiency = achieved (analytic FLOPs or bytes over measured time) / this machine's measured peak."""
    sec["peak_flops"], sec["mem_bw"] = peak_flops, mem_bw
    pf, dc = sec["prefill"], sec["decode"]
    pf["efficiency_vs_peak"] = {k: v / peak_flops for k, v in pf["achieved_flops_per_s"].items()}
    dc["efficiency_vs_peak"] = {k: v / peak_flops for k, v in dc["achieved_flops_per_s"].items()}
    dc["bandwidth_efficiency"] = {k: v / mem_bw for k, v in dc["achieved_bytes_per_s"].items()}


# ====================================================================== report
def format_report(doc: dict) -> str:
    lines = []
    m = doc["machine"]
    lines.append(f"machine: {m['cpu']}, {m['torch_threads']} torch threads, torch {m['torch']}, "
                 f"transformers {m.get('transformers', '?')}")
    for dev, sec in doc["devices"].items():
        cfg = sec["config"]
        lines.append(f"\n[{dev}, {sec['dtype']}] model dim {cfg['dim']}, FFN {cfg['hidden_dim']}, {cfg['n_heads']} heads, "
                     f"{cfg['n_layers']} layers, vocab {cfg['vocab_size']}; peak {sec['peak_flops'] / 1e9:.4g} GFLOP/s, "
                     f"copy {sec['mem_bw'] / 1e9:.4g} GB/s")
        rows = [("measure (median)", "llama-ref (sdpa)", "llama-ref (math)", "transformers", "ratio [95% CI]", "goal",
                 "verdict")]
        pf = sec["prefill"]
        ms = pf["median_s"]
        rows.append((f"prefill N={pf['n_tokens']} (s)", f"{ms['llama_ref_sdpa']:.4g}", f"{ms['llama_ref_math']:.4g}",
                     f"{ms['transformers_sdpa']:.4g}", _ci(pf), "<= 1.0", pf["verdict"]))
        eff = pf["efficiency_vs_peak"]
        rows.append((f"  FLOP/s vs {sec['dtype']} peak", f"{100 * eff['llama_ref_sdpa']:.1f}%",
                     f"{100 * eff['llama_ref_math']:.1f}%", f"{100 * eff['transformers_sdpa']:.1f}%", "", "", ""))
        dc = sec["decode"]
        tps = dc["tokens_per_s"]
        rows.append((f"decode {dc['new_tokens']} tok (tok/s)", f"{tps['llama_ref_sdpa']:.4g}",
                     f"{tps['llama_ref_math']:.4g}", f"{tps['transformers_sdpa']:.4g}", _ci(dc),
                     ">= 1.0", dc["verdict"]))
        bw = dc["bandwidth_efficiency"]
        rows.append(("  bytes/s vs copy bw", f"{100 * bw['llama_ref_sdpa']:.1f}%", f"{100 * bw['llama_ref_math']:.1f}%",
                     f"{100 * bw['transformers_sdpa']:.1f}%", "", "", ""))
        rows.append(("  same greedy tokens", _yn(dc["same_tokens"]), "", "", "", "", ""))
        lines.extend(_grid(rows))
        if "counting" in sec:
            ct = sec["counting"]
            rows = [("counting overhead", "plain (s)", *[f"{k} (s, ratio [95% CI])" for k in ct["overhead_ratio"]],
                     "goal", "verdict")]
            rows.append((f"N={ct['n_tokens']}, math kernel", f"{ct['median_s']['plain']:.4g}",
                         *[f"{ct['median_s'][k]:.4g} ({r:.3f}x [{ct['overhead_detail'][k]['ci95'][0]:.3f}, "
                           f"{ct['overhead_detail'][k]['ci95'][1]:.3f}])" for k, r in ct["overhead_ratio"].items()],
                         "hooks <= 1.05x", ct["verdict"]))
            extra = ct["fixed_cost"]["extra_s"]
            rows.append(("  fixed-cost estimate", "",
                         *[f"{ct['overhead_estimate'][k]:.4f}x (+{1e3 * extra[k]:.3g} ms)" for k in ct["overhead_ratio"]],
                         "", "met" if ct["met_by_estimate"] else "not met"))
            lines.append("")
            lines.extend(_grid(rows))
    if doc.get("meta"):
        mt = doc["meta"]
        lines.append("")
        if "error" in mt:
            lines.append(f"{mt['model']} on meta: FAILED: {mt['error']}")
        else:
            parts = []
            for name, c in mt["counters"].items():
                if "error" in c:
                    parts.append(f"{name}: cannot run ({c['error'][:80]})")
                else:
                    parts.append(f"{name} {c['seconds']:.3g} s ({'= analytic' if c['agree_with_analytic'] else 'DIFFERS'})")
            lines.append(f"{mt['model']} on meta, N={mt['n_tokens']}: build {mt['build_s']:.3g} s, analytic "
                         f"{mt['analytic_s'] * 1e3:.3g} ms, " + ", ".join(parts)
                         + f"; peak RSS {mt['peak_rss_mb']:.0f} MB (after imports {mt['rss_after_imports_mb']:.0f} MB)")
    return "\n".join(lines)


def _ci(sec: dict) -> str:
    lo, hi = sec["ci95"]
    return f"{sec['ratio']:.3f} [{lo:.3f}, {hi:.3f}]"


def _yn(b: bool) -> str:
    return "yes" if b else "NO"


def _grid(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, r in enumerate(rows):
        out.append("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def plot_bench(doc: dict, path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devs = list(doc["devices"].items())
    fig, axes = plt.subplots(len(devs), 3, figsize=(14, 3.6 * len(devs)), squeeze=False)
    names = ("llama_ref_sdpa", "llama_ref_math", "transformers_sdpa")
    labels = ("ours sdpa", "ours math", "HF sdpa")
    colors = ("tab:blue", "tab:cyan", "tab:orange")
    for row, (dev, sec) in enumerate(devs):
        pf, dc = sec["prefill"], sec["decode"]
        ax = axes[row][0]
        ax.bar(labels, [pf["median_s"][n] for n in names], color=colors)
        for i, n in enumerate(names):
            ax.scatter([i] * len(pf["samples_s"][n]), pf["samples_s"][n], color="black", s=8, zorder=3)
        ax.set_title(f"{dev} prefill N={pf['n_tokens']}: s (ratio {pf['ratio']:.3f} "
                     f"[{pf['ci95'][0]:.3f}, {pf['ci95'][1]:.3f}])", fontsize=9)
        ax = axes[row][1]
        ax.bar(labels, [dc["tokens_per_s"][n] for n in names], color=colors)
        ax.set_title(f"{dev} decode {dc['new_tokens']} tokens: tokens/s (ratio {dc['ratio']:.3f} "
                     f"[{dc['ci95'][0]:.3f}, {dc['ci95'][1]:.3f}])", fontsize=9)
        ax = axes[row][2]
        if "counting" in sec:
            ct = sec["counting"]
            ks = list(ct["overhead_ratio"])
            vals = [ct["overhead_ratio"][k] for k in ks]
            cis = [ct["overhead_detail"][k]["ci95"] for k in ks]
            err = [[v - c[0] for v, c in zip(vals, cis)], [c[1] - v for v, c in zip(vals, cis)]]
            ax.bar(ks, vals, color="tab:green", yerr=err, capsize=4, label="measured (95% CI)")
            if "overhead_estimate" in ct:
                ax.scatter(ks, [ct["overhead_estimate"][k] for k in ks], marker="D", color="black", zorder=3,
                           label="fixed-cost estimate")
            ax.axhline(1.0, color="black", lw=1)
            ax.axhline(GOALS["hooks_overhead_max"], color="red", ls="--", lw=1, label="hooks goal 1.05x")
            top = max(max(c[1] for c in cis), GOALS["hooks_overhead_max"], *ct.get("overhead_estimate", {1: 1}).values())
            ax.set_ylim(0, top * 1.15)
            ax.set_title(f"{dev} counting overhead vs plain forward (x)", fontsize=9)
            ax.legend(fontsize=7, loc="lower right")
        else:
            ax.axis("off")
    return save_figure(fig, path, dpi=110)


# ====================================================================== main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = OneLineParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (seconds; for tests)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for every contender (default: all cores)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: CPU (fp32), plus CUDA (bf16) when present")
    ap.add_argument("--repeats", type=int, default=None, help="override every repeat count")
    ap.add_argument("--no-counting", action="store_true", help="skip the counting-overhead measurement")
    ap.add_argument("--no-meta", action="store_true", help="skip the 70B-on-meta counting")
    ap.add_argument("--out", default="out/bench", help="directory for bench.json and bench.png (default out/bench)")
    ap.add_argument("--_meta-child", dest="meta_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--meta-tokens", type=int, default=None, help="tokens of the meta-device count (default 2048)")
    ap.add_argument("--meta-counters", default="hooks,torch,fvcore", help="counters to run on the meta model")
    return ap.parse_args(argv)


def _check_arguments(args: argparse.Namespace) -> list[str]:
    """Every argument checked before minutes of benchmarking (the output folder too): ``BadInput`` naming it."""
    meta_counters = [c.strip() for c in args.meta_counters.split(",") if c.strip()]
    bad = [c for c in meta_counters if c not in COUNTER_FUNCTIONS]
    if bad or not meta_counters or len(set(meta_counters)) != len(meta_counters):
        raise BadInput(f"bad --meta-counters {args.meta_counters!r}: a comma list of distinct names from "
                       f"{', '.join(COUNTER_FUNCTIONS)}")
    if args.threads is not None:
        check_int("threads", args.threads, 1, available_cpus())  # more threads than CPUs measures oversubscription
    if args.repeats is not None:
        check_int("repeats", args.repeats, 1, 10_000)
    if args.meta_tokens is not None:
        check_int("meta-tokens", args.meta_tokens, 1, PRESETS[FULL["meta_model"]].max_seq_len)
    if not args.meta_child:
        check_output_dir(args.out)
    return meta_counters


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        meta_counters = _check_arguments(args)
    except BadInput as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    if args.meta_child:
        print(json.dumps(meta_count_child(args.meta_child, args.meta_tokens or 2048, meta_counters)))
        return 0
    p = dict(QUICK if args.quick else FULL)
    if args.repeats is not None:
        for k in ("prefill_repeats", "decode_repeats", "count_repeats"):
            p[k] = args.repeats
    if args.meta_tokens is not None:
        p["meta_tokens"] = args.meta_tokens
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # a script's choice, applied to every contender alike
    threads = torch.get_num_threads()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    doc = {"command": "python3 scripts/bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "quick": args.quick, "goals": GOALS, "machine": machine_info(threads), "devices": {}}
    if args.device in ("auto", "cpu"):
        kw = {"n": 512, "repeats": 2, "nbytes": 16 * 2**20} if args.quick else {}

        def cpu_peaks():
            log("measuring this CPU's fp32 matmul peak and copy bandwidth ...")
            return measure_device("cpu", "fp32", cache=False, **kw)

        doc["devices"]["cpu"] = run_device(torch.device("cpu"), torch.float32, p, measure_peaks=cpu_peaks,
                                           counting=not args.no_counting, log=log)
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        cuda = torch.device("cuda")
        name = detect_table_name(torch.cuda.get_device_name(cuda))
        if name:
            doc["machine"]["cuda_datasheet"] = table_hardware(name, "bf16").to_dict()
        doc["devices"]["cuda"] = run_device(
            cuda, torch.bfloat16, p, counting=not args.no_counting, log=log,
            measure_peaks=lambda: measure_device(cuda, "bf16", n=8192, nbytes=2**30, repeats=10, cache=False))
    if not args.no_meta:
        log(f"counting {p['meta_model']} on the meta device (subprocess) ...")
        doc["meta"] = bench_meta(p["meta_model"], p["meta_tokens"], meta_counters)
    doc["machine"]["loadavg_end"] = os.getloadavg()
    doc["total_s"] = time.perf_counter() - t_start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if doc["devices"]:
        doc["plot"] = str(plot_bench(doc, out / "bench.png"))
    (out / "bench.json").write_text(json.dumps(doc, indent=2))
    print(format_report(doc))
    print(f"\nwrote {out / 'bench.json'}" + (f", {doc['plot']}" if "plot" in doc else "")
          + f" in {doc['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
