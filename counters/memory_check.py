"""Analytic memory (:mod:`llama_ref.memory_algebra`) against measured memory (:mod:`counters.memory_measure`),
category by category, layer run by layer run, exactly.

Every category must agree byte for byte. The peak is compared three ways, each with the program its tool
observes (docs/memory.md, "Three programs"): MemTracker's measured peak equals the algebra's peak of the program
under MemTracker; our own dispatch-mode tracker's equals the algebra's peak under a dispatch mode; and on the CPU
the allocator's peak (``torch.profiler``, no dispatch mode) lies within :data:`ALLOCATOR_SLACK_BYTES` above the
algebra's peak of the program as it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from llama_ref.memory_algebra import MemoryBreakdown, MemoryRequest, memory

from .memory_measure import MeasuredMemory, measure_request

#: How far the CPU allocator's peak may lie above the algebra's: at the peak op the allocator also holds the 0-dim
#: double tensors that Python numbers become for one op (``x / sqrt(head_dim)``, ``+ eps``: 8 bytes each, at most
#: a few at once), which no dispatch mode sees and no category counts. Measured on every case of the tests: 0 to
#: 32 bytes. Kernel workspaces outside torch's allocator (MKL) are not seen by the profiler at all; the CPU
#: flash-attention kernel's are (:func:`flash_cpu_scratch_bytes`), and are added to the bound for sdpa. With a
#: reduced-precision compute dtype the CPU's matmul kernels (oneDNN) take workspaces from torch's allocator too,
#: in sizes that depend on the instruction set: the row is then reported, not checked.
ALLOCATOR_SLACK_BYTES = 64


def _q_split(q_len: int) -> int:
    return 256 if q_len >= 768 else 64 if q_len >= 192 else 32


def flash_cpu_scratch_bytes(request: MemoryRequest, threads: int) -> int:
    """The most the CPU flash-attention kernel (``aten/src/ATen/native/cpu/FlashAttentionKernel.cpp``) allocates
    through torch's allocator for its own use during one call: per thread, forward ``qS*kvS + 2*qS + qS*head_dim``
    values of the accumulation type (fp32) and ``qS*kvS`` of a reduced type; backward ``2*qS*kvS`` of each and a
    ``qS`` row sum; qS = min(256, 64 or 32 by query length, queries), kvS = min(512, keys)."""
    if request.attn_kernel != "sdpa" or request.device_type != "cpu":
        return 0
    compute = request.compute_dtype or request.weight_dtype
    reduced = compute.itemsize if compute in (torch.bfloat16, torch.float16) else 0
    q_len, kv_len = request.seqlen, request.start_pos + request.seqlen
    qs, kvs = min(_q_split(q_len), q_len), min(512, kv_len)
    forward = (qs * kvs + 2 * qs + qs * request.config.head_dim) * 4 + qs * kvs * reduced
    backward = (2 * qs * kvs + qs) * 4 + 2 * qs * kvs * reduced if request.train else 0
    return threads * max(forward, backward)

SOURCES = {
    "weights": "the parameters' storages (model.parameters(), a tied head once)",
    "rope_table": "the freqs_cis buffer's storage",
    "kv_cache": "the KV caches' buffers",
    "inputs": "the token ids' storage",
    "logits": "the storage of the logits the forward returns",
    "saved_activations": "torch.autograd.graph.saved_tensors_hooks: distinct storages saved during the forward, "
                         "less parameters, buffers and token ids (with recompute: the checkpoints' inputs, "
                         "saved by torch.utils.checkpoint through the same hooks)",
    "loss": "torch.autograd.graph.saved_tensors_hooks during the loss",
    "gradients": "the parameters' .grad storages after backward",
    "optimizer": "the optimizer's state tensors after step()",
    "peak": "torch.distributed._tools.mem_tracker.MemTracker, peak snapshot of the model's device",
    "peak_tracker": "counters.memory_measure.LiveBytes: our own TorchDispatchMode over op output storages",
    "peak_allocator": "torch.profiler (profile_memory=True): the CPU allocator's allocations and frees, no dispatch "
                      "mode; may exceed the analytic peak by up to ALLOCATOR_SLACK_BYTES",
}


@dataclass
class Row:
    category: str
    analytic: int
    measured: Optional[int]
    source: str
    expected: Optional[int] = None  # what the measurement must equal when it differs from ``analytic``
    bound: Optional[tuple] = None  # (low, high) allowed for measured - analytic
    informational: bool = False  # reported, not checked (see ALLOCATOR_SLACK_BYTES)

    @property
    def agree(self) -> bool:
        if self.measured is None or self.informational:
            return True
        if self.bound is not None:
            return self.bound[0] <= self.measured - self.analytic <= self.bound[1]
        return self.measured == (self.analytic if self.expected is None else self.expected)

    def to_dict(self) -> dict:
        d = {"analytic": self.analytic, "measured": self.measured, "source": self.source, "agree": self.agree}
        if self.informational:
            d["checked"] = False
        if self.expected is not None:
            d["analytic_as_observed"] = self.expected
        if self.bound is not None:
            d["bound"] = list(self.bound)
        return d


@dataclass
class MemoryCheck:
    breakdown: MemoryBreakdown
    measured: Optional[MeasuredMemory]
    rows: list = field(default_factory=list)
    layers: list = field(default_factory=list)  # dicts: run, layer, saved and transient (analytic, measured)

    @property
    def agree(self) -> bool:
        return all(r.agree for r in self.rows) and all(
            v["analytic"] == v["measured"] for layer in self.layers for v in layer.values()
            if isinstance(v, dict) and v["measured"] is not None)

    def mismatches(self) -> list[str]:
        out = [f"{r.category}: analytic {r.expected if r.expected is not None else r.analytic:,}, measured "
               f"{r.measured:,}" for r in self.rows if not r.agree]
        for layer in self.layers:
            for key, v in layer.items():
                if isinstance(v, dict) and v["measured"] is not None and v["analytic"] != v["measured"]:
                    out.append(f"layer run {layer['run']} {key}: analytic {v['analytic']:,}, measured "
                               f"{v['measured']:,}")
        return out


def measure_for(model, request: MemoryRequest, *, allocator: bool = True, memtracker: bool = True,
                seed: int = 0) -> MeasuredMemory:
    """Measure ``request`` on ``model`` (built for it: its config, dtypes, kernel and schedule)."""
    return measure_request(model, batch=request.batch, seqlen=request.seqlen, start_pos=request.start_pos,
                           train=request.train, loss=request.loss, recompute=request.recompute,
                           optimizer=request.optimizer if request.train else "none", last_only=request.last_only,
                           kv_cache=request.kv_cache, allocator=allocator, memtracker=memtracker, seed=seed)


def check(request: MemoryRequest, measured: Optional[MeasuredMemory]) -> MemoryCheck:
    """The algebra's answer for ``request`` (all three programs) against ``measured`` (``None``: analytic only)."""
    b = memory(request, observed=measured is not None)
    result = MemoryCheck(b, measured)
    m = measured
    for name in ("weights", "rope_table", "kv_cache", "inputs", "logits", "saved_activations", "loss", "gradients",
                 "optimizer"):
        value = None if m is None else (sum(m.saved.values()) if name == "saved_activations" else getattr(m, name))
        result.rows.append(Row(name, getattr(b, name), value, SOURCES[name]))
    result.rows.append(Row("peak", b.peak, None if m is None else m.peak_memtracker, SOURCES["peak"],
                           expected=b.peak_memtracker))
    if m is not None:
        result.rows.append(Row("peak_tracker", b.peak_dispatch, m.peak, SOURCES["peak_tracker"]))
        if m.allocator_peak is not None:
            slack = ALLOCATOR_SLACK_BYTES + flash_cpu_scratch_bytes(request, m.threads)
            compute = request.compute_dtype or request.weight_dtype
            result.rows.append(Row("peak_allocator", b.peak, m.start + m.allocator_peak, SOURCES["peak_allocator"],
                                   bound=(0, slack), informational=compute.itemsize < 4))
    dispatch = b.extra.get("dispatch")
    for layer in b.layers:
        run = layer.run
        transient = (dispatch.layer_peaks[run] - dispatch.layer_starts[run]) if dispatch else layer.transient_peak_bytes
        row = {"run": run, "layer": layer.layer,
               "saved_activation_bytes": {"analytic": layer.saved_activation_bytes,
                                          "measured": None if m is None else m.saved.get(f"layers.{run}", 0)},
               "transient_peak_bytes": {"analytic": transient,
                                        "measured": None if m is None or run not in m.layer_peaks
                                        else m.layer_peaks[run] - m.layer_starts[run]}}
        result.layers.append(row)
    return result


__all__ = ["ALLOCATOR_SLACK_BYTES", "MemoryCheck", "flash_cpu_scratch_bytes", "Row", "SOURCES", "check", "measure_for"]
