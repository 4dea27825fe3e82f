"""Validate llama-ref on a CUDA GPU: exact counts, per-layer speed, and logits against transformers.

For ``llama-2-7b`` in bf16 (synthetic weights made on the GPU, or ``--checkpoint DIR``), for a
prefill (N=2048 new tokens) and a cached decode step (C=2048 cached, N=1):

1. every counter (hooks, fvcore, torch) runs on the GPU model and must agree *exactly*, row by
   row, with the closed-form analytic counts;
2. every layer run is timed with CUDA events (forward pre/post hooks) over warm repeats, for the
   ``math`` and ``sdpa`` attention kernels; achieved TFLOP/s and GB/s (analytic FLOPs and bytes
   over measured time) are reported per layer and overall against the device's peaks (datasheet
   table entry, and a matmul/copy measurement on the device itself);
3. logits are compared with ``transformers.LlamaForCausalLM`` (sdpa attention) built from the same
   weights on the same GPU (HF layout via ``llama_ref.hf.convert_meta_tensor_to_hf``);
4. memory: each phase's and a training step's peak as the allocator counts it (CUDA:
   ``torch.cuda.max_memory_allocated``) against the memory algebra, within a stated bound
   (:mod:`.validate_memory`);
5. a training step (N=2048, forward + loss + backward): counts exact per row and phase, forward and
   backward timed per layer run, and the measured MFU (:mod:`.validate_training`).

Writes ``validate_gpu.json`` and PNGs (roofline with measured points; per-layer throughput) to
``--out``. Exit status: 0 all checks passed, 1 a check failed, 2 cannot run (e.g. no CUDA device).

    python3 scripts/validate_gpu.py                       # llama-2-7b, synthetic bf16 weights
    python3 scripts/validate_gpu.py --checkpoint /path/to/Llama-2-7b-hf

(``scripts/validate_gpu.py`` runs :func:`main` of this module.)

The code is device-agnostic (a ``device`` and a timer are parameters): ``--device cpu --model tiny
--dtype fp32`` runs every step on CPU with a tiny model, which is how the tests exercise it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from llama_ref.config import LlamaConfig
from llama_ref.dtypes import short_name
from llama_ref.hf import convert_meta_tensor_to_hf, hf_config_dict, hf_forward_with_cache
from llama_ref.loading import load_pretrained
from llama_ref.memory import check_memory
from llama_ref.memory_algebra import MemoryRequest, memory
from llama_ref.schedule import format_schedule
from llama_ref.usage import OneLineParser

from ..analytic import analyze
from ..crosscheck import COUNTER_FUNCTIONS, crosscheck
from ..commands.common import BadInput, check_int, check_output_dir
from ..commands.models import resolve_model
from .factory import check_measure_memory, random_model
from .hardware import HARDWARE_NAMES, Hardware, detect_table_name, device_name, measure_device, table_hardware
from .plots import plot_roofline, save_figure
from .roofline import roofline_table, summarize
from .timing import Timing, make_timer, time_forward
from .validate_memory import memory_validation
from .validate_training import TrainStep, check_training_counters, step_report, time_step

DTYPES = {short_name(d): d for d in (torch.bfloat16, torch.float16, torch.float32)}
COUNTER_NAMES = tuple(COUNTER_FUNCTIONS)
# Logits vs transformers, per compute dtype. Both sides round differently (our RoPE is a complex
# multiply in fp32, HF's rotate-half runs in the model dtype; softmax/sdpa kernels differ), so bf16
# is judged on the shape of the distribution, fp32 on the numbers. Random (synthetic) weights give
# flat logits whose top two are often closer than bf16 rounding, so in bf16/fp16 the top-1 of ours
# must be among the reference's top 5, not equal to its top 1 (a CPU stand-in, 32 layers in bf16,
# measured max_rel 0.016, min cosine 0.99987, argmax agreement 0.97, top-1-in-top-5 1.0).
LOGIT_TOLERANCE = {
    torch.float32: {"max_rel": 1e-4, "min_cosine": 0.999999, "min_argmax_agree": 1.0, "min_top1_in_top5": 1.0},
    torch.bfloat16: {"max_rel": 5e-2, "min_cosine": 0.999, "min_argmax_agree": 0.0, "min_top1_in_top5": 0.99},
    torch.float16: {"max_rel": 1e-2, "min_cosine": 0.9999, "min_argmax_agree": 0.0, "min_top1_in_top5": 0.99},
}


@dataclass(frozen=True)
class Phase:
    name: str
    seqlen: int
    start_pos: int


def no_cuda_message() -> str:
    built = torch.version.cuda
    why = (f"this torch ({torch.__version__}) is a CPU-only build" if built is None
           else f"torch {torch.__version__} was built with CUDA {built} but sees no device "
                "(driver missing, CUDA_VISIBLE_DEVICES empty, or no GPU)")
    return (
        "validate_gpu: no CUDA device available: torch.cuda.is_available() is False; " + why + ".\n"
        "This script validates llama-ref on a GPU (one H100 is the reference). On this machine use\n"
        "  llama-ref roofline llama-2-7b --hardware cpu --layers 2 --measure   (CPU timings)\n"
        "or run the script's code paths on CPU with a tiny model:\n"
        "  python3 scripts/validate_gpu.py --device cpu --model tiny --dtype fp32"
    )


# ====================================================================== models
def build_model(config: LlamaConfig, *, device, dtype: torch.dtype, checkpoint: Optional[str] = None,
                seed: int = 0, attn_kernel: str = "math"):
    """Synthetic random weights made directly on ``device``, or a checkpoint loaded onto it."""
    if checkpoint:
        return load_pretrained(checkpoint, device=device, dtype=dtype, attn_kernel=attn_kernel,
                                     compute_dtype=dtype)
    return random_model(config, device=device, dtype=dtype, seed=seed, attn_kernel=attn_kernel,
                        compute_dtype=dtype)


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Our weights under HF names and in HF layout (q/k rows permuted for rotate-half RoPE).

    Tensors other than wq/wk are the *same* storage as ours (no copy)."""
    cfg = model.config
    out = {}
    for name, tensor in model.state_dict().items():
        hf_name, hf_tensor = convert_meta_tensor_to_hf(name, tensor.detach(), cfg)
        out[hf_name] = hf_tensor.contiguous()
    return out


def build_hf_twin(model, *, attn_implementation: str = "sdpa"):
    """A ``transformers.LlamaForCausalLM`` holding the same weights as ``model``, on its device and dtype."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg_dict = hf_config_dict(model.config)
    hf_cfg = transformers.LlamaConfig(**cfg_dict, attn_implementation=attn_implementation)
    state = hf_state_dict(model)
    dtype = state["model.embed_tokens.weight"].dtype
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_cfg)
    hf.load_state_dict(state, strict=True, assign=True)
    # Buffers made on "meta" (the RoPE inverse frequencies) have no data: rebuild them for real.
    hf.model.rotary_emb = LlamaRotaryEmbedding(config=hf_cfg).to(model.device)
    hf.config.dtype = dtype
    hf.requires_grad_(False)
    return hf.eval()


def make_tokens(config: LlamaConfig, batch: int, n: int, *, seed: int, device) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, n), generator=gen).to(device)


# ====================================================================== counters
def check_counters(model, phase: Phase, *, batch: int, names: Sequence[str], seed: int = 0) -> dict:
    """Run each counter on ``model`` for ``phase`` and compare it with the analytic counts, row by row,
    exactly (:func:`counters.crosscheck.crosscheck`; the cached prefix is prefilled uncounted)."""
    model.set_attn_kernel("math")
    tokens = make_tokens(model.config, batch, phase.seqlen, seed=seed, device=model.device)
    out: dict = {}
    runnable = list(names)
    t0 = time.perf_counter()
    try:
        report = crosscheck(model, tokens, start_pos=phase.start_pos, counters=["analytic", *runnable])
    except Exception as e:  # noqa: BLE001 - a crashing counter is a failed check, reported, not a traceback
        for name in runnable:
            out[name] = {"agree": False, "available": True, "problems": [f"counting raised {type(e).__name__}: {e}"]}
        return out
    seconds = time.perf_counter() - t0
    out["analytic"] = dict(report.totals["analytic"])
    for name in runnable:
        problems = [str(m) for m in report.mismatches if m.counter == name]
        problems += [f"uncounted op {op} x{n}" for op, n in report.unknown_ops.get(name, {}).items()]
        out[name] = {"agree": not problems, "available": True, "problems": problems[:20], "n_problems": len(problems),
                     **report.totals[name], "rows": len(report.results[name].rows),
                     "sources": report.sources()[name]}
    out["seconds_all_counters"] = seconds
    out["notes"] = report.notes
    return out


# ====================================================================== timing
def time_phase(model, phase: Phase, *, batch: int, attn_kernel: str, warmup: int, repeats: int, timer=None,
               seed: int = 0) -> Timing:
    model.set_attn_kernel(attn_kernel)
    tokens = make_tokens(model.config, batch, phase.seqlen, seed=seed, device=model.device)
    model.setup_cache(batch, phase.start_pos + phase.seqlen)
    try:
        if phase.start_pos:  # a real prefix: the cache refuses to decode after positions never written
            with torch.inference_mode():
                model(make_tokens(model.config, batch, phase.start_pos, seed=seed + 1, device=model.device), 0)
        return time_forward(model, tokens, phase.start_pos, timer=timer or make_timer(model.device),
                            warmup=warmup, repeats=repeats)
    finally:
        model.clear_cache()


def layer_report(model, phase: Phase, timing: Timing, *, batch: int, peaks: Sequence[Hardware]) -> dict:
    """Per layer run: analytic FLOPs and bytes, measured seconds, achieved FLOP/s and B/s, % of each peak."""
    dbytes = torch.finfo(model.compute_dtype).bits // 8
    report = analyze(model.config, batch=batch, seqlen=phase.seqlen, start_pos=phase.start_pos,
                     schedule=model.schedule, weight_dtype_bytes=torch.finfo(model.tok_embeddings.weight.dtype).bits // 8,
                     act_dtype_bytes=dbytes, kv_dtype_bytes=dbytes)
    ref = peaks[0]
    table = roofline_table(report.layer_runs(), ref, timing.median)
    rows = []
    for r in table:
        d = r.to_dict()
        for hw in peaks:
            if r.achieved_flops_per_s is not None:
                d[f"pct_peak_flops[{hw.name}]"] = 100 * r.achieved_flops_per_s / hw.peak_flops
                d[f"pct_peak_bw[{hw.name}]"] = 100 * r.achieved_bytes_per_s / hw.mem_bw
        rows.append(d)
    overall = summarize(table, batch=batch, seqlen=phase.seqlen)
    overall["forward_s"] = timing.total_s
    overall["forward_flops_per_s"] = overall["flops"] / timing.total_s
    overall["forward_bytes_per_s"] = overall["bytes"] / timing.total_s
    for hw in peaks:
        overall[f"pct_peak_flops[{hw.name}]"] = 100 * overall["forward_flops_per_s"] / hw.peak_flops
        overall[f"pct_peak_bw[{hw.name}]"] = 100 * overall["forward_bytes_per_s"] / hw.mem_bw
    return {"table": table, "layers": rows, "overall": overall}


# ====================================================================== logits
def logits_metrics(ours: torch.Tensor, ref: torch.Tensor) -> dict:
    ours, ref = ours.float(), ref.float()
    diff = (ours - ref).abs()
    scale = ref.abs().max().item()
    a, b = ours.reshape(-1, ours.shape[-1]), ref.reshape(-1, ref.shape[-1])
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return {
        "max_abs": diff.max().item(), "mean_abs": diff.mean().item(), "ref_max_abs": scale,
        "max_rel": diff.max().item() / scale if scale > 0 else float("inf"),
        "min_cosine": cos.min().item(), "mean_cosine": cos.mean().item(),
        "argmax_agree": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        "top1_in_ref_top5": (b.topk(min(5, b.shape[-1]), dim=-1).indices == a.argmax(-1, keepdim=True))
        .any(-1).float().mean().item(),
        "positions": a.shape[0],
    }


def logits_ok(metrics: dict, dtype: torch.dtype) -> tuple[bool, list[str]]:
    tol = LOGIT_TOLERANCE[dtype]
    bad = []
    if not metrics["max_rel"] <= tol["max_rel"]:
        bad.append(f"max |diff| / max |logit| = {metrics['max_rel']:.3g} > {tol['max_rel']}")
    if not metrics["min_cosine"] >= tol["min_cosine"]:
        bad.append(f"min cosine {metrics['min_cosine']:.7f} < {tol['min_cosine']}")
    if not metrics["argmax_agree"] >= tol["min_argmax_agree"]:
        bad.append(f"argmax agreement {metrics['argmax_agree']:.3f} < {tol['min_argmax_agree']}")
    if not metrics["top1_in_ref_top5"] >= tol["min_top1_in_top5"]:
        bad.append(f"our top-1 in the reference's top-5 at {metrics['top1_in_ref_top5']:.3f} of positions "
                   f"< {tol['min_top1_in_top5']}")
    return not bad, bad


@torch.inference_mode()
def compare_with_hf(model, hf, phase: Phase, *, batch: int, seed: int = 0) -> dict:
    """Logits of the phase's new tokens, ours vs HF; the cached prefix is prefilled on both sides."""
    if tuple(model.schedule) != tuple(range(model.config.n_layers)):
        raise ValueError(f"cannot compare schedule {format_schedule(model.schedule)} with transformers, which runs every layer once")
    model.set_attn_kernel("sdpa")
    c, n = phase.start_pos, phase.seqlen
    tokens = make_tokens(model.config, batch, c + n, seed=seed + 7, device=model.device)
    model.setup_cache(batch, c + n)
    try:
        if c:
            model(tokens[:, :c], 0)
        ours = model(tokens[:, c:], c)
    finally:
        model.clear_cache()
    if c:
        _, prefilled = hf_forward_with_cache(hf, tokens[:, :c])
        ref, _ = hf_forward_with_cache(hf, tokens[:, c:], prefilled)
    else:
        ref = hf(input_ids=tokens, use_cache=False).logits
    metrics = logits_metrics(ours, ref)
    ok, problems = logits_ok(metrics, model.compute_dtype)
    metrics.update({"ok": ok, "problems": problems, "tolerance": LOGIT_TOLERANCE[model.compute_dtype]})
    return metrics


# ====================================================================== plots
def plot_layers(phase_reports: Sequence[dict], peaks: Sequence[Hardware], path) -> Path:
    """Achieved FLOP/s and B/s per layer run, one row of panels per (phase, kernel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - used as matplotlib.ticker below

    fig, axes = plt.subplots(len(phase_reports), 2, figsize=(12, 3.2 * len(phase_reports)), squeeze=False)
    for row, pr in enumerate(phase_reports):
        blocks = [r for r in pr["table"] if r.module == "block" and r.measured_s]
        xs = [r.position for r in blocks]
        for col, (attr, unit, peak_attr) in enumerate((("achieved_flops_per_s", "TFLOP/s", "peak_flops"),
                                                       ("achieved_bytes_per_s", "GB/s", "mem_bw"))):
            scale = 1e12 if unit == "TFLOP/s" else 1e9
            ax = axes[row][col]
            ax.bar(xs, [getattr(r, attr) / scale for r in blocks], color="tab:blue")
            for hw, ls in zip(peaks, ("--", ":")):
                ax.axhline(getattr(hw, peak_attr) / scale, color="black", ls=ls, lw=1,
                           label=f"{hw.name} peak {getattr(hw, peak_attr) / scale:.4g}")
            ax.set_title(f"{pr['phase']} (N={pr['n_tokens']}, C={pr['n_cached']}), {pr['attn_kernel']}: {unit}",
                         fontsize=9)
            ax.set_xlabel("layer run (schedule position)")
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.set_ylabel(unit)
            ax.legend(fontsize=7)
    return save_figure(fig, path, dpi=110)


# ====================================================================== driver
def device_peaks(device, dtype_name: str, hardware: Optional[str], *, measure: bool = True,
                 measure_kwargs: Optional[dict] = None) -> list[Hardware]:
    """Peaks to report against: the datasheet entry (given, or detected from the device name) first,
    then the peaks measured on the device itself."""
    device = torch.device(device)
    peaks = []
    name = hardware if hardware not in (None, "auto") else (
        detect_table_name(device_name(device)) if device.type == "cuda" else None)
    if name:
        peaks.append(table_hardware(name, dtype_name))
    if measure or not peaks:
        kw = dict(measure_kwargs or {})
        if device.type == "cuda":
            kw.setdefault("n", 8192)
            kw.setdefault("nbytes", 2**30)
            kw.setdefault("repeats", 10)
        peaks.append(measure_device(device, dtype_name, **kw))
    return peaks


def run_validation(config: LlamaConfig, *, device, dtype_name: str = "bf16", checkpoint: Optional[str] = None,
                   phases: Sequence[Phase], batch: int = 1, counters: Sequence[str] = ("hooks", "fvcore", "torch"),
                   kernels: Sequence[str] = ("math", "sdpa"), warmup: int = 3, repeats: int = 10,
                   hardware: Optional[str] = "auto", compare_hf: bool = True, out_dir="out/validate_gpu",
                   seed: int = 0, timer=None, measure_peaks: bool = True, peak_kwargs: Optional[dict] = None,
                   train: Optional[TrainStep] = None, train_kernel: str = "sdpa",
                   log: Callable[[str], None] = print) -> dict:
    """Every step on ``device``; returns the JSON-able result (``result["ok"]`` says whether all passed)."""
    device = torch.device(device)
    dtype = DTYPES[dtype_name]
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "model": config.name, "config": config.to_dict(), "device": str(device), "device_name": device_name(device),
        "dtype": dtype_name, "batch": batch, "weights": checkpoint or "synthetic (random, made on the device)",
        "torch": torch.__version__, "cuda": torch.version.cuda, "steps": {},
    }
    failures: list[str] = []

    t0 = time.perf_counter()
    model = build_model(config, device=device, dtype=dtype, checkpoint=checkpoint, seed=seed)
    config = model.config
    result["steps"]["build_s"] = time.perf_counter() - t0
    log(f"built {config.name} ({sum(p.numel() for p in model.parameters()) / 1e9:.3g}B params, {dtype_name}) on "
        f"{device} in {result['steps']['build_s']:.1f} s")

    peaks = device_peaks(device, dtype_name, hardware, measure=measure_peaks, measure_kwargs=peak_kwargs)
    result["peaks"] = [hw.to_dict() for hw in peaks]
    log("peaks: " + "; ".join(f"{hw.name}: {hw.peak_flops / 1e12:.4g} TFLOP/s, {hw.mem_bw / 1e9:.4g} GB/s"
                               for hw in peaks))

    # 1. counters
    t0 = time.perf_counter()
    result["counters"] = {}
    for ph in phases:
        res = check_counters(model, ph, batch=batch, names=counters, seed=seed)
        result["counters"][ph.name] = res
        for name in counters:
            r = res[name]
            if r["agree"]:
                status = f"exact agreement ({r['rows']} rows, {r['macs']} MACs)"
            elif r.get("available", True) is False:
                status = f"NOT AVAILABLE: {r['problems'][0]}"
            else:
                status = f"DISAGREE ({'; '.join(r['problems'][:3])})"
            log(f"[{ph.name}] counter {name}: {status}")
            if not r["agree"]:
                what = "could not run" if r.get("available", True) is False else "disagrees with analytic"
                failures.append(f"{ph.name}: counter {name} {what}: {'; '.join(r['problems'][:3])}")
    result["steps"]["counters_s"] = time.perf_counter() - t0

    # 1b. memory: the allocator's peak per phase (and a training step) against the memory algebra
    t0 = time.perf_counter()
    result["memory"] = memory_validation(model, phases, batch=batch, train=train, seed=seed, failures=failures,
                                         log=log)
    result["steps"]["memory_s"] = time.perf_counter() - t0

    # 2. timing
    t0 = time.perf_counter()
    phase_reports = []
    result["phases"] = []
    for ph in phases:
        for attn_kernel in kernels:
            timing = time_phase(model, ph, batch=batch, attn_kernel=attn_kernel, warmup=warmup, repeats=repeats, timer=timer,
                                seed=seed)
            rep = layer_report(model, ph, timing, batch=batch, peaks=peaks)
            rep.update({"phase": ph.name, "n_tokens": ph.seqlen, "n_cached": ph.start_pos, "attn_kernel": attn_kernel})
            phase_reports.append(rep)
            ov = rep["overall"]
            log(f"[{ph.name}/{attn_kernel}] forward {ov['forward_s'] * 1e3:.3f} ms: "
                f"{ov['forward_flops_per_s'] / 1e12:.4g} TFLOP/s, {ov['forward_bytes_per_s'] / 1e9:.4g} GB/s ("
                + ", ".join(f"{ov[f'pct_peak_flops[{hw.name}]']:.3g}% / {ov[f'pct_peak_bw[{hw.name}]']:.3g}% of {hw.name}"
                            for hw in peaks) + ")")
            result["phases"].append({k: v for k, v in rep.items() if k != "table"}
                                    | {"warmup": warmup, "repeats": repeats})
    result["steps"]["timing_s"] = time.perf_counter() - t0

    # 3. transformers
    if compare_hf:
        t0 = time.perf_counter()
        hf = build_hf_twin(model)
        result["hf_comparison"] = {}
        for ph in phases:
            m = compare_with_hf(model, hf, ph, batch=batch, seed=seed)
            result["hf_comparison"][ph.name] = m
            log(f"[{ph.name}] logits vs transformers: max|diff| {m['max_abs']:.3g} (rel {m['max_rel']:.3g}), "
                f"min cosine {m['min_cosine']:.6f}, argmax agree {m['argmax_agree']:.3f}, top-1 in top-5 "
                f"{m['top1_in_ref_top5']:.3f}: {'ok' if m['ok'] else 'FAIL'}")
            if not m["ok"]:
                failures.append(f"{ph.name}: logits differ from transformers: {'; '.join(m['problems'])}")
        del hf
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result["steps"]["hf_s"] = time.perf_counter() - t0

    # 4. a training step
    if train is not None:
        t0 = time.perf_counter()
        result["training"] = train_validation(model, train, batch=batch, names=counters, attn_kernel=train_kernel,
                                              warmup=warmup, repeats=repeats, timer=timer, peaks=peaks, seed=seed,
                                              failures=failures, log=log)
        result["steps"]["training_s"] = time.perf_counter() - t0

    # 5. plots + JSON
    plots = {}
    for rep in phase_reports:
        if rep["attn_kernel"] != kernels[0]:
            continue
        p = out_dir / f"roofline_{rep['phase']}.png"
        plot_roofline(rep["table"], peaks[0], p,
                      title=f"{config.name} {dtype_name} on {result['device_name']}: {rep['phase']} "
                            f"(N={rep['n_tokens']}, C={rep['n_cached']}), {rep['attn_kernel']} kernel")
        plots[f"roofline_{rep['phase']}"] = str(p)
    if phase_reports:
        plots["layers"] = str(plot_layers(phase_reports, peaks, out_dir / "layers.png"))
    result["plots"] = plots
    result["failures"] = failures
    result["ok"] = not failures
    result["steps"]["total_s"] = time.perf_counter() - t_start
    json_path = out_dir / "validate_gpu.json"
    json_path.write_text(json.dumps(result, indent=2, default=_json_default))
    result["json"] = str(json_path)
    log(f"wrote {json_path}" + "".join(f", {p}" for p in plots.values()))
    return result


def train_validation(model, train: TrainStep, *, batch: int, names: Sequence[str], attn_kernel: str, warmup: int,
                     repeats: int, timer, peaks: Sequence[Hardware], seed: int, failures: list,
                     log: Callable[[str], None]) -> dict:
    """Step 4: the training step's counts (math kernel), then its timing with ``attn_kernel`` and the measured MFU."""
    tokens = make_tokens(model.config, batch, train.seqlen, seed=seed + 11, device=model.device)
    what = f"training step (N={train.seqlen}, {train.loss}{', recompute' if train.recompute else ''})"
    counts = check_training_counters(model, train, tokens, names=names)
    for name in names:
        r = counts[name]
        macs = r.get("macs") if r.get("macs") is not None else r.get("forward_macs")  # fvcore: the forward only
        log(f"[{what}] counter {name}: " + (f"exact agreement ({macs} MACs; claims {', '.join(r['claims'])})"
                                            if r["agree"] else f"DISAGREE ({'; '.join(r['problems'][:3])})"))
        if not r["agree"]:
            failures.append(f"{what}: counter {name} disagrees with analytic: {'; '.join(r['problems'][:3])}")
    timing = time_step(model, train, tokens, attn_kernel=attn_kernel, warmup=warmup, repeats=repeats, timer=timer)
    rep = step_report(model, train, timing, batch=batch, peaks=peaks)
    ov = rep["overall"]
    log(f"[{what}/{attn_kernel}] step {ov['step_s'] * 1e3:.3f} ms (forward {ov['forward_s'] * 1e3:.3f}, backward "
        f"{ov['backward_s'] * 1e3:.3f}): {ov['tokens_per_s']:.4g} tokens/s, "
        + ", ".join(f"MFU {100 * v:.3g}% of {k}" for k, v in ov["mfu"].items())
        + ("".join(f", HFU {100 * v:.3g}% of {k}" for k, v in ov["hfu"].items()) if "hfu" in ov else ""))
    return {"n_tokens": train.seqlen, "loss": train.loss, "recompute": train.recompute, "attn_kernel": attn_kernel,
            "counters": counts, **rep}


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (torch.dtype, torch.device, Path)):
        return str(x)
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-2-7b", help="preset or config path (synthetic weights); default llama-2-7b")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--synthetic", action="store_true", help="random weights made on the device (the default)")
    src.add_argument("--checkpoint", default=None, help="load this HF/Meta checkpoint directory instead")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda", help="cuda (default); 'cpu' runs the same steps on CPU (for testing)")
    p.add_argument("--prefill-tokens", type=int, default=2048, help="N of the prefill phase (default 2048)")
    p.add_argument("--decode-cached", type=int, default=2048, help="C of the decode phase, N=1 (default 2048)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--train-tokens", type=int, default=None,
                   help="N of the training-step check (forward + loss + backward; default 2048, or the model's "
                        "max_seq_len if shorter)")
    p.add_argument("--train-kernel", choices=("math", "sdpa"), default="sdpa",
                   help="attention kernel of the timed training step (default sdpa; counted with math)")
    p.add_argument("--recompute", action="store_true", help="training step with activation checkpointing (adds HFU)")
    p.add_argument("--no-train", action="store_true", help="skip the training-step check")
    p.add_argument("--counters", default="hooks,fvcore,torch", help="comma-separated subset of hooks,fvcore,torch")
    p.add_argument("--kernels", default="math,sdpa", help="attention kernels to time (default math,sdpa)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--hardware", default="auto", help="peak table entry (h100-sxm, h100-pcie, a100-80g) or auto")
    p.add_argument("--no-hf", action="store_true", help="skip the comparison with transformers")
    p.add_argument("--no-measure-peaks", action="store_true", help="do not measure matmul/copy peaks on the device")
    p.add_argument("--out", default="out/validate_gpu",
                   help="directory for validate_gpu.json and PNGs (default out/validate_gpu)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _names(text: str, option: str, known: Sequence[str]) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names or len(set(names)) != len(names):
        # none at all would check nothing and still say PASSED
        raise BadInput(f"bad {option} {text!r}: a comma list of distinct names from {', '.join(known)}")
    return names


def _check_arguments(args: argparse.Namespace) -> tuple[torch.device, list[str], list[str]]:
    """Every argument checked before any work: ``BadInput`` naming it (the output folder is checked next, once
    the device is known to exist)."""
    check_int("prefill-tokens", args.prefill_tokens, 1)
    check_int("decode-cached", args.decode_cached, 0)
    if args.train_tokens is not None:
        check_int("train-tokens", args.train_tokens, 1)
    check_int("batch", args.batch, 1)
    check_int("warmup", args.warmup, 0, 10_000)
    check_int("repeats", args.repeats, 1, 10_000)
    check_int("seed", args.seed, 0, (1 << 63) - 1)
    counters = _names(args.counters, "--counters", list(COUNTER_FUNCTIONS))
    kernels = _names(args.kernels, "--kernels", ["math", "sdpa"])
    tables = [h for h in HARDWARE_NAMES if h != "cpu"]
    if args.hardware not in ("auto", *tables):
        raise BadInput(f"bad --hardware {args.hardware!r}: auto or one of {', '.join(tables)}")
    if not args.device.strip():
        raise BadInput("--device is empty: cuda or cpu")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError) as e:
        raise BadInput(f"bad --device {args.device!r}: {e}") from None
    if device.type not in ("cuda", "cpu"):
        raise BadInput(f"bad --device {args.device!r}: cuda[:N] or cpu")
    return device, counters, kernels


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        device, counters, kernels = _check_arguments(args)
    except BadInput as e:
        print(f"validate_gpu: error: {e}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print(no_cuda_message(), file=sys.stderr)
        return 2
    try:
        check_output_dir(args.out)  # after the device: a run that cannot start makes no folder
        config = resolve_model(args.model).config if not args.checkpoint else _checkpoint_config(args.checkpoint)
        need = args.decode_cached + 1
        if max(args.prefill_tokens, need) > config.max_seq_len:
            raise ValueError(f"N={args.prefill_tokens} / C+1={need} exceed max_seq_len={config.max_seq_len} "
                             f"of {config.name}")
        if args.train_tokens is None:
            args.train_tokens = min(2048, config.max_seq_len)
        if args.train_tokens > config.max_seq_len:
            raise ValueError(f"--train-tokens {args.train_tokens} exceeds max_seq_len={config.max_seq_len} of {config.name}")
        phases = [Phase("prefill", args.prefill_tokens, 0), Phase("decode", 1, args.decode_cached)]
        for ph in phases:  # refused before the model is built, not by the allocator (or the OOM killer)
            check_measure_memory(config, device=device, dtype=DTYPES[args.dtype], batch=args.batch,
                                 seqlen=ph.seqlen, start_pos=ph.start_pos, attn_kernel="math",
                                 hint="use a smaller --batch, --prefill-tokens or --decode-cached, or a smaller --model")
        train = None if args.no_train else TrainStep(args.train_tokens, recompute=args.recompute)
        if train is not None:  # the step keeps gradients and every layer's activations: refuse it up front too
            need = memory(MemoryRequest(config, batch=args.batch, seqlen=train.seqlen, train=True,
                                        weight_dtype=DTYPES[args.dtype], attn_kernel=args.train_kernel or "math",
                                        recompute=train.recompute, optimizer="none",
                                        device_type="cuda" if device.type == "cuda" else "cpu"))
            check_memory(need.peak, device, "the training-step check (weights, gradients, kept activations; use a "
                         "smaller --train-tokens or --batch, --recompute, or --no-train)")
        peak_kwargs = {"n": 1024, "repeats": 3, "nbytes": 64 * 2**20} if device.type == "cpu" else None
        result = run_validation(
            config, device=device, dtype_name=args.dtype, checkpoint=args.checkpoint, phases=phases,
            batch=args.batch, counters=counters, kernels=kernels, warmup=args.warmup, repeats=args.repeats,
            hardware=args.hardware, compare_hf=not args.no_hf, out_dir=args.out, seed=args.seed,
            measure_peaks=not args.no_measure_peaks, peak_kwargs=peak_kwargs, train=train,
            train_kernel=args.train_kernel,
        )
    except (BadInput, ValueError, OSError, MemoryError) as e:
        print(f"validate_gpu: error: {e}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError as e:
        print(f"validate_gpu: out of GPU memory: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if result["ok"]:
        print(f"validate_gpu: PASSED in {result['steps']['total_s']:.1f} s")
        return 0
    print("validate_gpu: FAILED:\n  " + "\n  ".join(result["failures"]), file=sys.stderr)
    return 1


def _checkpoint_config(path: str) -> LlamaConfig:
    p = Path(path)
    if (p / "config.json").is_file():
        return LlamaConfig.from_hf(p)
    if (p / "params.json").is_file():
        # vocab_size may be -1 in params.json; the loader reads it off the weights. A shape-only load does it cheaply.
        return load_pretrained(p, device="meta").config
    raise FileNotFoundError(f"{path}: no config.json (HF) or params.json (Meta) checkpoint there")


if __name__ == "__main__":
    sys.exit(main())
