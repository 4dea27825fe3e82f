"""The training-step part of the GPU validation (``scripts/validate_gpu.py``, :mod:`.validate`).

One training step (forward + cross-entropy loss + backward, every parameter trainable) of ``batch``
sequences of ``seqlen`` tokens:

1. counts: every counter runs the step on the device and must agree exactly, row by row and per phase
   (forward, backward, recompute), with the closed form (:func:`counters.crosscheck.crosscheck` with
   ``training``; fvcore traces the forward only and claims only that);
2. time: each decoder-layer run's forward and backward and the output head's, timed with CUDA events
   (:class:`counters.studies.timing.StepTimer`) over warm repeats, for one attention kernel; achieved
   TFLOP/s per layer from the analytic FLOPs of what that part executes;
3. MFU from the measured step: tokens/s x model FLOPs per token (:mod:`counters.estimates`: matmul
   FLOPs, dense attention, no recompute) / peak, for each peak (datasheet, measured); with activation
   checkpointing also HFU (executed FLOPs: one more forward of every decoder-layer run).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

from ..analytic import analyze_training
from ..crosscheck import crosscheck
from ..estimates import exact_executed_flops_per_token, exact_model_flops_per_token, mfu
from ..training import Training, loss_of, trainable
from .hardware import Hardware
from .timing import StepTiming, time_training_step


@dataclass(frozen=True)
class TrainStep:
    """What the training check runs: ``batch`` x ``seqlen`` tokens, the step's loss and recompute."""

    seqlen: int
    recompute: bool = False
    loss: str = "cross-entropy"

    @property
    def training(self) -> Training:
        return Training(loss=self.loss, recompute=self.recompute)


def check_training_counters(model, step: TrainStep, tokens, *, names: Sequence[str]) -> dict:
    """Each counter's count of one training step of ``tokens`` against the closed form, exactly."""
    model.set_attn_kernel("math")
    out: dict = {}
    t0 = time.perf_counter()
    try:
        report = crosscheck(model, tokens, counters=["analytic", *names], training=step.training)
    except Exception as e:  # noqa: BLE001 - a crashing counter is a failed check, reported, not a traceback
        return {name: {"agree": False, "problems": [f"counting raised {type(e).__name__}: {e}"]} for name in names}
    out["analytic"] = dict(report.totals["analytic"])
    for name in names:
        problems = [str(m) for m in report.mismatches if m.counter == name]
        problems += [f"uncounted op {op} x{n}" for op, n in report.unknown_ops.get(name, {}).items()]
        out[name] = {"agree": not problems, "problems": problems[:20], "n_problems": len(problems),
                     "claims": _claims(report.results[name]),
                     **report.totals[name]}
    out["seconds_all_counters"] = time.perf_counter() - t0
    out["notes"] = report.notes
    return out


def _claims(result) -> list[str]:
    if result.claims is None:
        return ["all phases and quantities"]
    return sorted(f"{phase} {quantity}" for phase, quantity in result.claims)


def time_step(model, step: TrainStep, tokens, *, attn_kernel: str, warmup: int, repeats: int, timer=None) -> StepTiming:
    """Median per-layer forward/backward times of the step with attention ``attn_kernel``."""
    model.set_attn_kernel(attn_kernel)
    training = step.training
    with trainable(model, training):
        return time_training_step(model, tokens, lambda logits: loss_of(logits, tokens, training.loss),
                                  timer=timer, warmup=warmup, repeats=repeats)


def step_report(model, step: TrainStep, timing: StepTiming, *, batch: int, peaks: Sequence[Hardware]) -> dict:
    """Per layer run: analytic FLOPs of its forward and of its backward (recompute included, as executed),
    measured seconds and achieved FLOP/s; overall: step time, tokens/s, MFU (and HFU) per peak."""
    config = model.config
    report = analyze_training(config, batch=batch, seqlen=step.seqlen, schedule=model.schedule,
                              training=step.training)
    fwd: dict = {}
    bwd: dict = {}
    for r in report.rows:  # a layer run's rows summed into (position, "block")
        key = (r.position, "block") if r.position is not None else (None, r.module)
        fwd[key] = fwd.get(key, 0) + r.forward.total_flops
        bwd[key] = bwd.get(key, 0) + r.backward.total_flops + r.recompute.total_flops
    layers = []
    for key in sorted(timing.forward, key=lambda k: (k[0] is None, k[0] or 0)):
        pos, module = key
        f_s, b_s = timing.forward[key], timing.backward.get(key)
        row = {"position": pos, "layer": model.schedule[pos] if pos is not None else None, "module": module,
               "forward_flops": fwd[key], "backward_flops": bwd[key], "forward_s": f_s, "backward_s": b_s,
               "forward_flops_per_s": fwd[key] / f_s if f_s else None,
               "backward_flops_per_s": bwd[key] / b_s if b_s else None}
        layers.append(row)
    tokens = batch * step.seqlen
    step_s = timing.totals["step"]
    tokens_per_s = Fraction(tokens) / Fraction(step_s)
    model_fpt = exact_model_flops_per_token(config, step.seqlen, train=True, schedule=model.schedule)
    executed_fpt = exact_executed_flops_per_token(config, step.seqlen, recompute=step.recompute,
                                                  schedule=model.schedule)
    overall = {
        "tokens": tokens, "forward_s": timing.totals["forward"], "backward_s": timing.totals["backward"],
        "step_s": step_s, "tokens_per_s": float(tokens_per_s), "model_flops_per_token": model_fpt,
        "executed_flops_per_token": executed_fpt,
        "step_flops": report.total.total_flops + sum(r.recompute.total_flops for r in report.rows),
        "mfu": {hw.name: float(mfu(model_fpt, tokens_per_s, hw.peak_flops)) for hw in peaks},
    }
    if step.recompute:
        overall["hfu"] = {hw.name: float(mfu(executed_fpt, tokens_per_s, hw.peak_flops)) for hw in peaks}
    overall["step_flops_per_s"] = overall["step_flops"] / step_s
    return {"layers": layers, "overall": overall, "warmup": timing.warmup, "repeats": timing.repeats}
