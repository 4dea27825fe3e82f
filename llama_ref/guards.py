"""Guards at the edges: every refusal of bad input to the model, run before any tensor work.

The model's ``forward`` is a pure tensor program. What protects it lives here, at two levels:

* :func:`check_call`: what an *eager* call checks every time, in plain Python (no tensor op, no host sync,
  no I/O): the tokens' type, shape, dtype and device, the positions, torch's tensor-size limit, and the KV
  caches, whose fill marks (:class:`FillMarks`) say how far each batch row is written, so a call that would
  attend to positions never written is refused. Token ids are checked too when they are on the CPU (there
  reading two numbers costs no device sync). A compiled call skips all of it (``torch.compiler.is_compiling``):
  its caller checks once per request, as ``generate`` does.
* :func:`check_inputs`: everything of a request, for API users and the entry points (``generate``, the
  command line): the above plus the token ids on any device and the memory the forward needs.

The constructors' and ``setup_cache``'s checks are here too, so that the model file reads as the model.
"""

from __future__ import annotations

import functools
import numbers
from typing import Optional

import torch

from .compute_dtype import parse_compute_dtype, resolve_compute_dtype
from .config import LlamaConfig
from .devices import resolve_device
from .errors import NonFiniteError
from .finite import all_finite, describe_nonfinite
from .memory import check_memory
from .memory_algebra import memory, model_request
from .schedule import resolve_schedule
from .shapes import (TORCH_MAX_TENSOR_BYTES, check_tensor_sizes, forward_tensor_sizes, kv_cache_bytes, param_count,
                     rope_table_bytes, weight_bytes, weight_tensor_sizes)

ATTENTION_KERNELS = ("math", "sdpa")
# A forward that allocates more than this is checked against the memory available (smaller ones are not worth
# reading /proc/meminfo for).
ACTIVATION_CHECK_BYTES = 1 << 28


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _floating_dtype(name: str, value: object) -> None:
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"{name} must be a floating-point torch.dtype, got {value!r}")


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def check_kernel(attn_kernel: object) -> str:
    if attn_kernel not in ATTENTION_KERNELS:
        raise ValueError(f"unknown attention kernel {attn_kernel!r}; choose one of {ATTENTION_KERNELS}")
    return attn_kernel


# ---------------------------------------------------------------------------- building a model
def check_build(config: LlamaConfig, *, schedule, device, dtype, attn_kernel, compute_dtype):
    """Everything ``Llama(...)`` can refuse, before a weight is allocated. Returns (schedule, device or None)."""
    if not isinstance(config, LlamaConfig):
        raise ValueError(f"config must be a LlamaConfig, got {type(config).__name__}")
    if dtype is not None:
        _floating_dtype("dtype", dtype)
    parse_compute_dtype(compute_dtype)  # "auto" (or None), a floating dtype, or a dtype name
    check_kernel(attn_kernel)
    device = None if device is None else resolve_device(device)
    schedule = resolve_schedule(schedule, config.n_layers)
    target = torch.get_default_device() if device is None else device
    weight_dtype = torch.get_default_dtype() if dtype is None else dtype
    # torch refuses a tensor beyond 2**63 - 1 bytes even on meta, from deep inside nn.Embedding.
    check_tensor_sizes(weight_tensor_sizes(config), weight_dtype.itemsize, f"Llama({config.name}) in {weight_dtype}")
    if target.type != "meta":
        check_memory(weight_bytes(config, weight_dtype), target,
                     f"Llama({config.name}) with {param_count(config):,} weights in {weight_dtype} "
                     f"and a RoPE table for max_seq_len={config.max_seq_len:,}")
    return schedule, device


def check_to_device(args: tuple, kwargs: dict) -> None:
    """``Module.to``/``.cuda`` arguments naming a device this process does not have: a clear
    ``DeviceUnavailableError`` instead of torch's assert."""
    try:
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"Llama.to{args!r}: {str(e).splitlines()[0]}") from None
    if device is not None:
        resolve_device(device)


def check_reserve(model, end: object) -> None:
    if isinstance(end, bool) or not isinstance(end, int) or end < 0:
        raise ValueError(f"end must be a non-negative int, got {end!r}")
    if end > model.config.max_seq_len:
        raise ValueError(f"cannot reserve RoPE positions up to {end}: the model's max_seq_len is "
                         f"{model.config.max_seq_len}")
    if end > model.rope_positions and model.device.type != "meta":
        check_memory(rope_table_bytes(model.config, end), model.device, f"a RoPE table for {end:,} positions",
                     freeable_bytes=rope_table_bytes(model.config, model.rope_positions))


def check_finite_weights(model) -> None:
    """:class:`NonFiniteError` naming every weight that holds NaN or inf (one ``aminmax`` pass per tensor)."""
    bad = [f"{name} ({describe_nonfinite(p)})" for name, p in model.named_parameters() if not all_finite(p.detach())]
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteError(f"{len(bad)} weight tensor(s) hold NaN or inf: {shown}")


# ---------------------------------------------------------------------------- tied heads in state dicts
def register_tied_load_hooks(model) -> None:
    """A tied model's state dict may hold the embedding alone (HF's ``save_pretrained``) or both copies when
    they are equal; two different matrices for one tied parameter are refused. After loading (``assign=True``
    sets each module's Parameter separately) the head is tied again."""
    model.register_load_state_dict_pre_hook(_tied_state_dict_pre_hook)
    model.register_load_state_dict_post_hook(lambda module, incompatible_keys: module.tie_weights())


def _tied_state_dict_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
    if not module.config.tie_word_embeddings:
        return
    emb_key, out_key = prefix + "tok_embeddings.weight", prefix + "output.weight"
    emb, out = state_dict.get(emb_key), state_dict.get(out_key)
    if emb is None and out is not None:
        raise ValueError(f"tie_word_embeddings=True but the state dict has {out_key!r} without {emb_key!r}")
    if emb is None:
        return  # strict loading reports the missing embedding
    if out is None:
        state_dict[out_key] = emb
    elif out is not emb and not _same_values(emb, out):
        raise ValueError(f"tie_word_embeddings=True but {emb_key!r} and {out_key!r} differ: refusing to pick "
                         "one of two different matrices for one tied parameter")


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    if a.is_meta or b.is_meta:
        return True  # no data to compare; shapes agree
    wide = torch.promote_types(a.dtype, b.dtype)  # exact: compare values, not roundings of them
    return bool(torch.equal(a.to(wide), b.to(device=a.device, dtype=wide)))


# ---------------------------------------------------------------------------- the KV cache
class FillMarks:
    """How far a KV cache is written, per batch row, in plain Python ints (never tensors: under
    ``torch.jit.trace`` sizes are 0-dim tensors, and a mark stored as one would put tensor ops into every
    later check). Run-length encoded: ``[(row_end, filled), ...]`` with increasing ``row_end`` means rows
    ``[previous row_end, row_end)`` hold positions ``[0, filled)``. Writes cover rows ``[:bsz]``, so there are
    at most as many segments as batch sizes used (never one per row: max_batch_size may be huge on meta).

    A write may start at or before the mark of every row it covers (re-running a step, chunked prefill), and
    sets the mark of rows ``[:bsz]`` to its end: whatever lies beyond is stale from then on.
    """

    def __init__(self, max_batch_size: int, max_seq_len: int) -> None:
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self._marks: list[tuple[int, int]] = [(max_batch_size, 0)]

    @property
    def marks(self) -> tuple[tuple[int, int], ...]:
        return tuple(self._marks)

    def filled(self, bsz: Optional[int] = None) -> int:
        """How many leading positions are written for *every* row of ``[:bsz]`` (default: all rows)."""
        bsz = self.max_batch_size if bsz is None else bsz
        filled = self._marks[0][1]
        for row_end, mark in self._marks:
            filled = min(filled, mark)
            if row_end >= bsz:
                break
        return filled

    def reset(self) -> None:
        self._marks = [(self.max_batch_size, 0)]

    def check_write(self, start_pos: int, bsz: int, seqlen: int) -> None:
        """``ValueError`` unless rows ``[:bsz]``, positions ``[start_pos, start_pos + seqlen)`` can be written
        and everything before ``start_pos`` has been."""
        if bsz > self.max_batch_size:
            raise ValueError(f"batch size {bsz} exceeds the cache's max_batch_size={self.max_batch_size}")
        end = start_pos + seqlen
        if end > self.max_seq_len:
            raise ValueError(f"sequence end {end} exceeds the cache's max_seq_len={self.max_seq_len}")
        filled = self.filled(bsz)
        if start_pos > filled:
            rows = "row 0 holds" if bsz == 1 else f"rows 0-{bsz - 1} hold"
            raise ValueError(
                f"start_pos={start_pos} is beyond the filled part of the KV cache: {rows} positions "
                f"[0, {filled}) only (filled up to {filled}), so positions {filled}..{start_pos - 1} were never "
                f"written; continue from start_pos <= {filled}, or prefill from 0")

    def mark(self, bsz: int, end: int) -> None:
        """Rows ``[:bsz]`` now hold positions ``[0, end)`` (nothing beyond)."""
        self._marks = [(bsz, end)] + [seg for seg in self._marks if seg[0] > bsz]


def check_cache_shape(max_batch_size, max_seq_len, n_kv_heads, head_dim, dtype) -> None:
    for name, value in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len),
                        ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
        _positive_int(f"KVCache {name}", value)
    _floating_dtype("KVCache dtype", dtype)


def check_cache_request(model, max_batch_size: object, max_seq_len: object, dtype: object) -> None:
    """``setup_cache``'s arguments, torch's size limit and the memory the caches need (the old cache counts as
    freed), before anything is allocated."""
    for name, value in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len)):
        _positive_int(name, value)
    if max_seq_len > model.config.max_seq_len:
        raise ValueError(f"cache max_seq_len={max_seq_len} exceeds the model's max_seq_len={model.config.max_seq_len}")
    _floating_dtype("cache dtype", dtype)
    # Each cache is shaped like the attention it serves (a tensor-parallel rank holds only its kv heads).
    kv_heads = [model.layers[layer_id].attention.n_kv_heads for layer_id in model.schedule]
    elements = max_batch_size * max_seq_len * max(kv_heads) * model.config.head_dim
    if elements * dtype.itemsize > TORCH_MAX_TENSOR_BYTES:  # torch's own limit (it matters on meta)
        raise ValueError(f"setup_cache({max_batch_size}, {max_seq_len}): a cache of {elements:,} elements "
                         f"of {dtype.itemsize} bytes exceeds torch's limit of 2**63 - 1 bytes for one tensor")
    freeable = sum(b.numel() * b.element_size() for b in (model.caches or torch.nn.ModuleList()).buffers()
                   if b.device == model.device)
    need = sum(kv_cache_bytes(model.config, batch=max_batch_size, n_positions=max_seq_len, n_runs=1,
                              kv_dtype_bytes=dtype.itemsize, n_kv_heads=n) for n in kv_heads)
    check_memory(need, model.device,
                 f"setup_cache(max_batch_size={max_batch_size}, max_seq_len={max_seq_len}): keys and values "
                 f"for {len(kv_heads)} layer run(s) in {dtype}", freeable_bytes=freeable)


def mark_cache_filled(model, n_positions: int, bsz: Optional[int] = None) -> None:
    """Declare positions ``[0, n_positions)`` of rows ``[:bsz]`` written *without computing them*.

    For timing and op counting only, where the cached values do not matter: a decode step after C cached
    tokens does the same work whatever the keys are, and a real prefill of C tokens can cost far more than
    the step being measured. The logits over such a cache are meaningless: never use it before generating.
    """
    if model.caches is None:
        raise ValueError("mark_cache_filled() needs a KV cache: call setup_cache() first")
    marks = model.caches[0].fill
    bsz = marks.max_batch_size if bsz is None else bsz
    if isinstance(bsz, bool) or not isinstance(bsz, int) or not 0 < bsz <= marks.max_batch_size:
        raise ValueError(f"bsz must be an int in [1, {marks.max_batch_size}] (the cache's max_batch_size), got {bsz!r}")
    if (isinstance(n_positions, bool) or not isinstance(n_positions, int)
            or not 0 <= n_positions <= marks.max_seq_len):
        raise ValueError(f"n_positions must be an int in [0, {marks.max_seq_len}] (the cache's max_seq_len), "
                         f"got {n_positions!r}")
    for cache in model.caches:
        cache.fill.mark(bsz, n_positions)


# ---------------------------------------------------------------------------- one call
def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` name the same device when the current device is 0; an unset index matches any."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _check_shapes(model, tokens: object, start_pos: object) -> tuple[int, int, int]:
    """(bsz, seqlen, start_pos as an int) of a valid call; ``ValueError`` naming the problem otherwise.
    Plain Python on metadata, except that a tensor ``start_pos`` is read (once)."""
    if not isinstance(tokens, torch.Tensor):
        raise ValueError(f"tokens must be a LongTensor of shape (bsz, seqlen), got {type(tokens).__name__}")
    if tokens.layout != torch.strided:
        raise ValueError(f"tokens must be a dense tensor, got layout {tokens.layout}")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must have shape (bsz, seqlen), got shape {tuple(tokens.shape)}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be integer ids (int64/int32), got {tokens.dtype}")
    bsz, seqlen = (int(n) for n in tokens.shape)  # plain ints: under torch.jit.trace sizes are 0-dim tensors
    if bsz == 0 or seqlen == 0:
        raise ValueError(f"empty input: tokens has shape {tuple(tokens.shape)}")
    if not _same_device(tokens.device, model.device):
        raise ValueError(f"tokens are on device {tokens.device} but the model is on {model.device}")
    if isinstance(start_pos, torch.Tensor):
        # Static-cache decoding (compiled loops): a 0-dim integer tensor on the model's device, with a cache.
        if start_pos.dim() != 0 or start_pos.is_floating_point() or start_pos.is_complex() or start_pos.dtype == torch.bool:
            raise ValueError(f"a tensor start_pos must be a 0-dim integer tensor, got {start_pos.dtype} of shape "
                             f"{tuple(start_pos.shape)}")
        if model.caches is None:
            raise ValueError(f"start_pos={start_pos!r}: a tensor start_pos (static-cache decoding) needs a KV "
                             "cache: call setup_cache() first, or pass start_pos as an int")
        if not _same_device(start_pos.device, model.device) or start_pos.is_meta:
            raise ValueError(f"a tensor start_pos must be on the model's device {model.device}, got {start_pos.device}")
        start_pos = int(start_pos)
    # numbers.Integral admits numpy ints; a float or a bool start_pos is refused.
    if isinstance(start_pos, bool) or not isinstance(start_pos, numbers.Integral) or start_pos < 0:
        raise ValueError(f"start_pos must be a non-negative int, got {start_pos!r} ({type(start_pos).__name__})")
    start_pos = int(start_pos)
    end = start_pos + seqlen
    if end > model.config.max_seq_len:
        raise ValueError(f"sequence end {end} (start_pos {start_pos} + seqlen {seqlen}) exceeds "
                         f"max_seq_len={model.config.max_seq_len}")
    check_tensor_sizes(forward_tensor_sizes(model.config, bsz, seqlen, start_pos), max(model.compute_dtype.itemsize, 4),
                       _what(bsz, seqlen, start_pos))
    if model.caches is None:
        if start_pos != 0:
            raise ValueError(f"start_pos={start_pos} needs a KV cache: call setup_cache() first")
    else:
        _check_caches(model, start_pos, bsz, seqlen)
    return bsz, seqlen, start_pos


def _what(bsz: int, seqlen: int, start_pos: int) -> str:
    return f"a forward of {bsz:,} sequence(s) x {seqlen:,} tokens after {start_pos:,} cached"


def _check_caches(model, start_pos: int, bsz: int, seqlen: int) -> None:
    """Every schedule run has a cache of the right shape on the model's device that can take this write
    (bounds, and no unwritten positions before ``start_pos``)."""
    if len(model.caches) != len(model.schedule):
        raise ValueError(f"the model holds {len(model.caches)} KV cache(s) for a schedule of {len(model.schedule)} "
                         "layer runs; call setup_cache() again")
    for pos, (cache, layer_id) in enumerate(zip(model.caches, model.schedule)):
        if not hasattr(cache, "fill") or not hasattr(cache, "cache_k"):
            raise ValueError(f"caches[{pos}] is a {type(cache).__name__}, not a KVCache; call setup_cache()")
        attention = model.layers[layer_id].attention  # a tensor-parallel rank's holds only its kv heads
        want = (attention.n_kv_heads, attention.head_dim)
        if tuple(cache.cache_k.shape[2:]) != want:
            raise ValueError(f"caches[{pos}] holds {tuple(cache.cache_k.shape[2:])} (n_kv_heads, head_dim) "
                             f"per position, the model needs {want}; call setup_cache()")
        if not _same_device(cache.cache_k.device, model.device):
            raise ValueError(f"caches[{pos}] is on {cache.cache_k.device} but the model is on {model.device}; "
                             "call setup_cache()")
        cache.fill.check_write(start_pos, bsz, seqlen)


def check_token_values(tokens: torch.Tensor, vocab_size: int) -> None:
    """Token ids in ``[0, vocab_size)``; reads two numbers (a host sync on an accelerator), nothing on meta."""
    if tokens.device.type == "meta" or tokens.numel() == 0:
        return
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {vocab_size})")


def forward_bytes(model, bsz: int, seqlen: int, start_pos: int = 0, *, kv_cache: Optional[bool] = None,
                  last_only: bool = False):
    """The memory algebra's breakdown of the forward ``model`` would run (:mod:`llama_ref.memory_algebra`); what
    it allocates beyond the weights, buffers and tokens is ``peak - start``."""
    return _memory_of(model_request(model, bsz, seqlen, start_pos, kv_cache=kv_cache, last_only=last_only))


@functools.lru_cache(maxsize=64)
def _memory_of(request):
    # A decode loop asks about the same request every call: simulate it once (milliseconds for a small model,
    # more for a large one, against a request that may be a millisecond of work).
    return memory(request)


def check_forward_memory(model, bsz: int, seqlen: int, start_pos: int = 0, *, kv_cache: Optional[bool] = None,
                         last_only: bool = False) -> None:
    """Refuse a forward whose activations and temporaries cannot fit in the memory available: the bytes it
    allocates at its peak, exactly (the memory algebra), beyond what is already allocated (weights, buffers, the
    KV cache; ``kv_cache``: the forward will run with one, default whether the model has one). The memory is
    looked up only for a forward large enough to matter."""
    if model.device.type == "meta":
        return
    b = forward_bytes(model, bsz, seqlen, start_pos, kv_cache=kv_cache, last_only=last_only)
    need = b.peak - b.start
    if need > ACTIVATION_CHECK_BYTES:
        check_memory(need, model.device, f"{_what(bsz, seqlen, start_pos)} (its activations and temporaries at "
                                         f"the peak: {b.where})")


def check_call(model, tokens: torch.Tensor, start_pos) -> int:
    """An eager call's checks (see the module docstring); grows the RoPE table if the call needs more
    positions. Returns ``start_pos`` as an int."""
    bsz, seqlen, start = _check_shapes(model, tokens, start_pos)
    if tokens.device.type == "cpu":  # no device sync on the CPU: refuse bad ids here, not in nn.Embedding
        check_token_values(tokens, model.config.vocab_size)
    if start + seqlen > model.rope_positions:
        model.reserve_positions(start + seqlen)
    return start


def mark_written(model, tokens: torch.Tensor, start_pos: int) -> None:
    """After an eager call of ``tokens`` at ``start_pos``: rows ``[:bsz]`` of every cache hold positions
    ``[0, start_pos + seqlen)``. Plain ints (under ``torch.jit.trace`` sizes are 0-dim tensors)."""
    bsz, seqlen = (int(n) for n in tokens.shape)
    for cache in model.caches or ():
        cache.fill.mark(bsz, start_pos + seqlen)


def check_inputs(model, tokens: torch.Tensor, start_pos=0) -> None:
    """Every check of ``model(tokens, start_pos)``, once per request and on any device: the eager call's,
    the token ids (a host sync on an accelerator), and the memory the forward needs. Changes nothing."""
    bsz, seqlen, start = _check_shapes(model, tokens, start_pos)
    check_token_values(tokens, model.config.vocab_size)
    check_forward_memory(model, bsz, seqlen, start)


__all__ = ["ATTENTION_KERNELS", "FillMarks", "check_build", "check_cache_request", "check_call",
           "check_forward_memory", "forward_bytes", "check_inputs", "check_kernel", "check_token_values", "mark_cache_filled",
           "mark_written", "resolve_compute_dtype", "resolve_schedule"]
