"""The memory algebra: the bytes one request holds, by category, per layer run and at its peak, exactly.

A *request* (:class:`MemoryRequest`) is a forward of ``batch`` sequences of ``tokens`` new tokens after ``cached``
ones (with the KV cache generation sets up), or one training step (forward, loss, backward and an optimizer
step). :func:`memory` answers it from shapes alone, by running the model's program on simulated tensors
(:mod:`llama_ref.memory_program`): every storage the real program allocates, when it is freed, and so the peak.
The categories (docs/memory.md has the conventions):

* ``weights``: the distinct parameters (a tied head once), in the weight dtype;
* ``rope_table``: the complex64 RoPE table, covering the positions the request reserves;
* ``kv_cache``: keys and values of every layer run, (cache batch, positions, kv heads, head_dim) each;
* ``inputs``: the token ids (int64);
* ``logits``: the fp32 logits the forward returns;
* ``saved_activations``: the distinct storages autograd keeps for backward once the forward is done, less
  parameters, buffers and the token ids (with recompute: each layer run's input, which the checkpoint keeps);
* ``loss``: what the loss saves beyond that (cross-entropy: the fp32 log-probabilities and ``total_weight``);
* ``gradients``: one ``.grad`` per parameter, in its dtype;
* ``optimizer``: AdamW's state after one step (``torch.optim.AdamW``): ``exp_avg`` and ``exp_avg_sq`` shaped and
  typed as each parameter, and a 0-dim fp32 ``step`` per parameter on the CPU; SGD (no momentum): none;
* ``peak``: the most bytes of tensor storage alive on the device during the request, and where.

Three programs are told apart: the request as it runs (``peak``), as a Python dispatch mode observes it
(``peak_dispatch``: gradient sums out of place) and as ``MemTracker`` observes it (``peak_memtracker``: also
ModTracker's hooks holding gradients). The guards' refusals ("will not fit") and ``--max-batch`` use ``peak``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from .config import LlamaConfig
from .memory import format_bytes
from .memory_program import Outcome, Program, Shapes, run
from .schedule import resolve_schedule
from .shapes import TPShares, kv_cache_bytes, param_count, rope_positions_for

LOSSES = ("cross-entropy", "sum")
OPTIMIZERS = ("adamw", "sgd", "none")
KERNELS = ("math", "sdpa")
DEVICE_TYPES = ("cpu", "cuda", "meta")


@dataclass(frozen=True)
class MemoryRequest:
    """One request whose memory :func:`memory` computes; every inconsistency refused on construction."""

    config: LlamaConfig
    batch: int = 1
    seqlen: int = 1
    start_pos: int = 0
    weight_dtype: torch.dtype = torch.float32
    compute_dtype: Optional[torch.dtype] = None  # default: the weight dtype
    attn_kernel: str = "math"
    device_type: str = "cpu"  # decides the sdpa kernel, the optimizer's implementation, the token check
    kv_cache: bool = True  # a forward runs with the KV cache generation sets up (cache_positions positions)
    cache_positions: Optional[int] = None  # default start_pos + seqlen
    cache_dtype: Optional[torch.dtype] = None  # default the compute dtype
    last_only: bool = False  # the head on the last position only (generation)
    train: bool = False
    loss: str = "cross-entropy"
    recompute: bool = False
    optimizer: str = "adamw"
    tp: int = 1
    schedule: Optional[tuple] = None  # layer runs (default: every layer once)

    def __post_init__(self) -> None:
        for name in ("batch", "seqlen"):
            _positive(name, getattr(self, name))
        if isinstance(self.start_pos, bool) or not isinstance(self.start_pos, int) or self.start_pos < 0:
            raise ValueError(f"start_pos must be a non-negative int, got {self.start_pos!r}")
        for name in ("weight_dtype", "compute_dtype", "cache_dtype"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, torch.dtype) or not value.is_floating_point):
                raise ValueError(f"{name} must be a floating-point torch.dtype, got {value!r}")
        if self.attn_kernel not in KERNELS:
            raise ValueError(f"unknown attention kernel {self.attn_kernel!r}; choose one of {KERNELS}")
        if self.device_type not in DEVICE_TYPES:
            raise ValueError(f"unknown device type {self.device_type!r}; choose one of {DEVICE_TYPES}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {LOSSES}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}")
        end = self.start_pos + self.seqlen
        if end > self.config.max_seq_len:
            raise ValueError(f"start_pos {self.start_pos} + seqlen {self.seqlen} = {end} exceeds max_seq_len "
                             f"{self.config.max_seq_len} of {self.config.name}")
        if self.train and (self.start_pos or self.last_only):
            raise ValueError("a training step has no KV cache and computes every position's logits: "
                             "cached must be 0 and last_only False")
        if self.train and self.kv_cache and self.cache_positions:
            raise ValueError("a training step has no KV cache")
        if self.cache_positions is not None and self.cache_positions < end:
            raise ValueError(f"a cache of {self.cache_positions} positions cannot hold {end}")
        if self.start_pos and not self.kv_cache:
            raise ValueError(f"{self.start_pos} cached positions need a KV cache")
        TPShares(self.config, self.tp) if self.tp != 1 else None
        resolve_schedule(self.schedule, self.config.n_layers)

    @property
    def end(self) -> int:
        return self.start_pos + self.seqlen

    def program(self) -> Program:
        c = self.config
        s = TPShares(c, self.tp) if self.tp != 1 else None
        shapes = Shapes(dim=c.dim, n_heads=s.n_heads if s else c.n_heads,
                        n_kv_heads=s.n_kv_heads if s else c.n_kv_heads, head_dim=c.head_dim,
                        hidden_dim=s.hidden_dim if s else c.hidden_dim, vocab_size=c.vocab_size, norm_eps=c.norm_eps,
                        embed_dim=s.embed_dim if s else c.dim, vocab_shard=s.vocab_size if s else c.vocab_size)
        runs = resolve_schedule(self.schedule, c.n_layers)
        compute = self.compute_dtype or self.weight_dtype
        cache = self.kv_cache and not self.train
        return Program(
            shapes=shapes, n_runs=len(runs), runs=tuple(runs), n_layers=c.n_layers, batch=self.batch,
            seqlen=self.seqlen, start_pos=self.start_pos, weight_dtype=self.weight_dtype, compute_dtype=compute,
            attn_kernel=self.attn_kernel, sdpa_backend="math" if self.device_type == "meta" else "flash",
            cache_positions=(self.cache_positions or self.end) if cache else 0, cache_batch=self.batch,
            cache_dtype=self.cache_dtype or compute, rope_positions=rope_positions_for(c, self.end),
            tied=c.tie_word_embeddings, last_only=self.last_only, train=self.train, loss=self.loss,
            recompute=self.recompute, optimizer=self.optimizer if self.train else "none",
            optimizer_impl="foreach" if self.device_type == "cuda" else "single-tensor",
            device_type=self.device_type, token_check=self.device_type == "cpu", host_is_device=self.device_type == "cpu", tp=self.tp,
            round_to=512 if self.device_type == "cuda" else 1)

    def describe(self) -> str:
        what = ("a training step" if self.train else
                f"a forward of {self.seqlen:,} new token(s) after {self.start_pos:,} cached")
        return f"{self.config.name}: {what}, batch {self.batch:,}"


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class LayerMemory:
    """One decoder-layer run: what autograd saved in it, the bytes alive when it began and the most during its
    forward (``transient``: the difference)."""

    run: int
    layer: int
    saved_activation_bytes: int
    start_bytes: int
    peak_bytes: int

    @property
    def transient_peak_bytes(self) -> int:
        return self.peak_bytes - self.start_bytes


@dataclass(frozen=True)
class MemoryBreakdown:
    """The answer for one request (see the module docstring for the categories)."""

    request: MemoryRequest
    weights: int
    rope_table: int
    kv_cache: int
    inputs: int
    logits: int
    saved_activations: int
    saved_by_scope: dict
    loss: int
    gradients: int
    optimizer: int
    start: int  # bytes alive when the request begins: weights, buffers, tokens
    peak: int
    where: object
    layers: tuple = ()
    peak_dispatch: Optional[int] = None
    peak_memtracker: Optional[int] = None
    extra: dict = field(default_factory=dict)

    @property
    def activations_at_peak(self) -> int:
        """What the peak holds beyond the request's starting bytes (activations, gradients, optimizer state
        and temporaries alive at that moment)."""
        return self.peak - self.start

    def categories(self) -> dict:
        return {"weights": self.weights, "rope_table": self.rope_table, "kv_cache": self.kv_cache,
                "inputs": self.inputs, "logits": self.logits, "saved_activations": self.saved_activations,
                "loss": self.loss, "gradients": self.gradients, "optimizer": self.optimizer, "peak": self.peak}

    def describe(self) -> str:
        parts = [f"weights {format_bytes(self.weights)}"]
        if self.kv_cache:
            parts.append(f"KV cache {format_bytes(self.kv_cache)}")
        if self.request.train:
            parts.append(f"gradients {format_bytes(self.gradients)}")
            if self.optimizer:
                parts.append(f"optimizer state {format_bytes(self.optimizer)}")
        parts.append(f"activations and temporaries {format_bytes(self.activations_at_peak)} at the peak "
                     f"({self.where})")
        return f"{format_bytes(self.peak)}: " + ", ".join(parts)


def memory(request: MemoryRequest, *, observed: bool = False) -> MemoryBreakdown:
    """The exact memory of ``request``. ``observed``: also the peaks a dispatch mode and MemTracker measure."""
    program = request.program()
    out = run(program)
    _check_categories(request, program, out)
    extra = {}
    if observed:
        extra["dispatch"] = run(program, dispatch_mode=True)
        extra["memtracker"] = run(program, dispatch_mode=True, module_hooks=True)
    return _breakdown(request, program, out, extra)


def _check_categories(request: MemoryRequest, program: Program, out: Outcome) -> None:
    """The simulation's parameters and caches are tensors of their own (their storages make the timeline); their
    bytes must be the shape algebra's, the one place the parameter count and the KV-cache bytes are computed."""
    tp = None if request.tp == 1 else request.tp
    weights = param_count(request.config, tp) * request.weight_dtype.itemsize
    caches = 0 if not program.cache_positions else kv_cache_bytes(
        request.config, batch=program.cache_batch, n_positions=program.cache_positions, n_runs=program.n_runs,
        kv_dtype_bytes=program.cache_dtype.itemsize, n_kv_heads=program.shapes.n_kv_heads)
    if (out.weights, out.kv_cache) != (weights, caches):  # pragma: no cover - the simulation lost a tensor
        raise ArithmeticError(f"the memory program holds {out.weights:,} bytes of weights and {out.kv_cache:,} of KV "
                              f"cache, the shape algebra {weights:,} and {caches:,}")


def _breakdown(request: MemoryRequest, program: Program, out: Outcome, extra: dict) -> MemoryBreakdown:
    saved = dict(out.saved)
    layers = tuple(
        LayerMemory(run=i, layer=program.runs[i], saved_activation_bytes=saved.get(f"layers.{i}", 0),
                    start_bytes=out.layer_starts[i], peak_bytes=out.layer_peaks[i])
        for i in sorted(out.layer_starts))
    return MemoryBreakdown(
        request=request, weights=out.weights, rope_table=out.rope_table, kv_cache=out.kv_cache, inputs=out.inputs,
        logits=out.logits, saved_activations=sum(saved.values()), saved_by_scope=saved, loss=out.loss,
        gradients=out.gradients, optimizer=out.optimizer, start=out.start, peak=out.peak, where=out.where,
        layers=layers, peak_dispatch=extra["dispatch"].peak if "dispatch" in extra else None,
        peak_memtracker=extra["memtracker"].peak if "memtracker" in extra else None, extra=extra)


# ---------------------------------------------------------------------------- requests of a model, for the guards
def device_type_of(device: torch.device) -> str:
    """The algebra's device type for a torch device: CUDA's allocator and kernels, meta's, or the CPU's."""
    t = torch.device(device).type
    return t if t in DEVICE_TYPES else "cpu"


def model_request(model, bsz: int, seqlen: int, start_pos: int = 0, *, kv_cache: Optional[bool] = None,
                  last_only: bool = False) -> MemoryRequest:
    """The forward ``model(tokens (bsz, seqlen), start_pos)`` as ``model`` would run it: its config, dtypes,
    kernel, schedule, device and tensor-parallel share; with a KV cache if it has one (``kv_cache``: whether the
    forward will have one, e.g. a prefill about to set it up)."""
    caches = getattr(model, "caches", None)
    kv_cache = caches is not None if kv_cache is None else kv_cache
    positions = int(caches[0].cache_k.shape[1]) if caches is not None and kv_cache else None
    group = getattr(model, "tp_group", None)
    return MemoryRequest(model.config, batch=bsz, seqlen=seqlen, start_pos=start_pos,
                         weight_dtype=model.tok_embeddings.weight.dtype, compute_dtype=model.compute_dtype,
                         attn_kernel=model.attn_kernel, device_type=device_type_of(model.device), kv_cache=kv_cache,
                         cache_positions=positions if positions and positions >= start_pos + seqlen else None,
                         last_only=last_only, tp=group.world_size if group is not None else 1,
                         schedule=tuple(model.schedule))


def cyclic_schedule(n_layers: int, n_runs: Optional[int]) -> Optional[tuple]:
    """A schedule of ``n_runs`` layer runs (every layer once, then again from the first): the memory of a
    forward depends on the number of runs, not on which layers (they are all shaped alike)."""
    if n_runs is None or n_runs == n_layers:
        return None
    return tuple(i % n_layers for i in range(n_runs))


def forward_need(config: LlamaConfig, *, device_type: str, weight_dtype: torch.dtype,
                 compute_dtype: Optional[torch.dtype] = None, batch: int = 1, seqlen: int = 1, start_pos: int = 0,
                 n_runs: Optional[int] = None, attn_kernel: str = "math", train: bool = False, loss: str = "cross-entropy",
                 recompute: bool = False) -> MemoryBreakdown:
    """What counting or timing one forward needs, as the counters run it: with ``start_pos`` > 0 a KV cache of
    ``start_pos + seqlen`` positions and a prefill of ``start_pos`` tokens before the step (the larger peak of
    the two); without, a plain forward; with ``train`` a training step without optimizer."""
    common = dict(weight_dtype=weight_dtype, compute_dtype=compute_dtype, attn_kernel=attn_kernel, device_type=device_type,
                  schedule=cyclic_schedule(config.n_layers, n_runs), batch=batch)
    if train:
        return memory(MemoryRequest(config, seqlen=seqlen, train=True, loss=loss, recompute=recompute,
                                    optimizer="none", **common))
    if not start_pos:
        return memory(MemoryRequest(config, seqlen=seqlen, kv_cache=False, **common))
    end = start_pos + seqlen
    step = memory(MemoryRequest(config, seqlen=seqlen, start_pos=start_pos, **common))
    prefill = memory(MemoryRequest(config, seqlen=start_pos, cache_positions=end, **common))
    return step if step.peak >= prefill.peak else prefill


# ---------------------------------------------------------------------------- the largest request that fits
def largest_fitting(request: MemoryRequest, field_name: str, device_memory: int, *,
                    upper: Optional[int] = None) -> tuple[int, Optional[MemoryBreakdown]]:
    """The largest value of ``field_name`` ("batch" or "seqlen") whose peak fits in ``device_memory`` bytes, and
    its breakdown; ``(0, None)`` when not even 1 fits. The peak grows with either, so: doubling, then bisection
    on the exact algebra."""
    if field_name not in ("batch", "seqlen"):
        raise ValueError(f"can search batch or seqlen, not {field_name!r}")
    if isinstance(device_memory, bool) or not isinstance(device_memory, int) or device_memory <= 0:
        raise ValueError(f"device memory must be a positive number of bytes, got {device_memory!r}")
    if field_name == "seqlen":
        limit = request.config.max_seq_len - request.start_pos
    else:
        limit = upper or (1 << 40)

    def fits(n: int) -> Optional[MemoryBreakdown]:
        b = memory(replace(request, **{field_name: n}, cache_positions=None))
        return b if b.peak <= device_memory else None

    best = fits(1)
    if best is None:
        return 0, None
    lo, hi = 1, None
    n = 2
    while n <= limit:
        b = fits(n)
        if b is None:
            hi = n
            break
        lo, best = n, b
        n *= 2
    if hi is None:
        if lo == limit:
            return lo, best
        hi = limit + 1
        b = fits(limit)
        if b is not None:
            return limit, b
    while hi - lo > 1:
        mid = (lo + hi) // 2
        b = fits(mid)
        if b is None:
            hi = mid
        else:
            lo, best = mid, b
    return lo, best


__all__ = ["DEVICE_TYPES", "KERNELS", "LOSSES", "LayerMemory", "MemoryBreakdown", "MemoryRequest", "OPTIMIZERS",
           "cyclic_schedule", "device_type_of", "forward_need", "largest_fitting", "memory", "model_request"]
