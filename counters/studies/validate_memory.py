"""The memory part of the GPU validation (``scripts/validate_gpu.py``, :mod:`.validate`): the bytes a forward
(each phase) and a training step allocate at their peak, as the device's allocator counts them, against the
memory algebra (:mod:`llama_ref.memory_algebra`).

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, less ``memory_allocated`` before
  (the weights, the cache and cuBLAS's workspace, allocated by the earlier steps). The caching allocator rounds
  every block up to 512 bytes, which the algebra does too for CUDA. Allowed: up to :data:`CUDA_SLACK_BYTES` above
  the algebra (kernel workspaces the caching allocator serves during an op, e.g. cuBLAS's on a new stream); never
  below. Not verified on a GPU by this project's tests (no CUDA here): they skip.
* CPU: the CPU allocator's peak from ``torch.profiler`` (:func:`counters.memory_measure.allocator_peak`), allowed
  :data:`counters.memory_check.ALLOCATOR_SLACK_BYTES` above.

The attention kernel is ``math``: the algebra models ``sdpa`` as the CPU flash kernel and the math fallback,
not CUDA's flash or memory-efficient kernels.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from llama_ref.guards import mark_cache_filled
from llama_ref.memory_algebra import MemoryRequest, memory, model_request

from ..memory_check import ALLOCATOR_SLACK_BYTES
from ..memory_measure import allocator_peak, make_tokens
from ..training import loss_of

#: How far CUDA's ``max_memory_allocated`` may lie above the algebra's peak (see the module docstring).
CUDA_SLACK_BYTES = 8 * 2**20


def device_peak(fn: Callable[[], None], device: torch.device) -> int:
    """The most bytes the device's allocator held during ``fn()`` beyond what it held before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    return allocator_peak(fn)


def slack(device: torch.device) -> int:
    return CUDA_SLACK_BYTES if device.type == "cuda" else ALLOCATOR_SLACK_BYTES


def _verdict(name: str, analytic: int, measured: int, device: torch.device) -> dict:
    excess = measured - analytic
    ok = 0 <= excess <= slack(device)
    return {"analytic_bytes": analytic, "measured_bytes": measured, "excess_bytes": excess,
            "bound_bytes": [0, slack(device)], "ok": ok,
            "source": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "torch.profiler (CPU allocator)",
            "what": name}


def check_forward_memory_phases(model, phases: Sequence, *, batch: int, seed: int = 0) -> dict:
    """Each phase (``seqlen`` after ``start_pos``, with the KV cache generation sets up) measured and computed."""
    device = model.device
    model.set_attn_kernel("math")
    out = {}
    for ph in phases:
        model.setup_cache(batch, ph.start_pos + ph.seqlen)
        if ph.start_pos:
            mark_cache_filled(model, ph.start_pos, batch)
        tokens = make_tokens(model, batch, ph.seqlen, seed)
        b = memory(model_request(model, batch, ph.seqlen, ph.start_pos, kv_cache=True))

        def forward(tokens=tokens, start=ph.start_pos):
            with torch.no_grad():
                logits = model(tokens, start)
            del logits
        measured = device_peak(forward, device)
        out[ph.name] = _verdict(f"{ph.name} forward", b.peak - b.start, measured, device) | {"where": str(b.where)}
        model.clear_cache()
    return out


def check_training_memory(model, *, batch: int, seqlen: int, recompute: bool = False, loss: str = "cross-entropy",
                          seed: int = 0) -> dict:
    """One training step (forward, loss, backward; no optimizer) measured and computed."""
    device = model.device
    model.set_attn_kernel("math")
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    tokens = make_tokens(model, batch, seqlen, seed)
    model.clear_cache()
    try:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        model.set_activation_checkpointing(recompute)
        request = MemoryRequest(model.config, batch=batch, seqlen=seqlen, train=True, loss=loss, recompute=recompute,
                                optimizer="none", weight_dtype=params[0].dtype, compute_dtype=model.compute_dtype,
                                attn_kernel="math", device_type="cuda" if device.type == "cuda" else "cpu",
                                schedule=tuple(model.schedule))
        b = memory(request)

        def step():
            value = loss_of(model(tokens), tokens, loss)
            value.backward()
        measured = device_peak(step, device)
        return _verdict("training step", b.peak - b.start, measured, device) | {"where": str(b.where)}
    finally:
        model.set_activation_checkpointing(False)
        for p, flag in zip(params, flags):
            p.grad = None
            p.requires_grad_(flag)


def memory_validation(model, phases: Sequence, *, batch: int, train=None, seed: int = 0,
                      failures: Optional[list] = None, log: Callable[[str], None] = print) -> dict:
    """Both checks, logged; a check outside its bound is a failure."""
    result = {"phases": check_forward_memory_phases(model, phases, batch=batch, seed=seed)}
    if train is not None:
        result["training"] = check_training_memory(model, batch=batch, seqlen=train.seqlen,
                                                   recompute=train.recompute, loss=train.loss, seed=seed)
    for name, r in [*result["phases"].items(), *([("training", result["training"])] if "training" in result else [])]:
        log(f"[{name}] memory: measured {r['measured_bytes']:,} bytes at the peak, algebra {r['analytic_bytes']:,} "
            f"({r['where']}): excess {r['excess_bytes']:,} (bound {r['bound_bytes'][1]:,}): "
            f"{'ok' if r['ok'] else 'FAIL'}")
        if not r["ok"] and failures is not None:
            failures.append(f"{name}: memory {r['measured_bytes']:,} bytes vs algebra {r['analytic_bytes']:,} "
                            f"(allowed excess 0..{r['bound_bytes'][1]:,})")
    return result


__all__ = ["CUDA_SLACK_BYTES", "check_forward_memory_phases", "check_training_memory", "device_peak",
           "memory_validation"]
