"""The top-level Llama model: embeddings, a schedule of decoder layers, final norm and output head."""

from __future__ import annotations

import logging
import numbers
from typing import Optional, Union

import torch
import torch.utils.checkpoint
from torch import nn

from .attention import ATTENTION_KERNELS, KVCache
from .block import TransformerBlock
from .config import LlamaConfig
from .devices import resolve_device
from .errors import NonFiniteError
from .finite import all_finite, describe_nonfinite
from .layers import Linear, RMSNorm
from .memory import (TORCH_MAX_TENSOR_BYTES, activation_bytes, check_memory, check_tensor_sizes,
                     forward_tensor_sizes, parameter_count, weight_bytes, weight_tensor_sizes)
from .rope import ROPE_EAGER_POSITIONS, precompute_freqs_cis
from .schedule import ScheduleSpec, format_schedule, resolve_schedule

logger = logging.getLogger(__name__)

DeviceLike = Union[str, torch.device, None]

# A forward whose activations are estimated above this is checked against the memory available first
# (smaller ones are not worth reading /proc/meminfo for on every decode step).
ACTIVATION_CHECK_BYTES = 1 << 28


class Llama(nn.Module):
    """Llama-2/3 decoder. Parameter names are Meta's (``tok_embeddings``, ``layers.{i}.attention.wq``, ...).

    Args:
        config: the model shape.
        schedule: which layers to run, in order (see :mod:`llama_ref.schedule`); default all.
        device, dtype: where and in what dtype the *weights* live (``"meta"`` builds no storage).
        attn_kernel: ``"math"`` (reference, default) or ``"sdpa"``.
        compute_dtype: dtype of activations. Default: fp32 on CPU (bf16/fp16 matmuls are very slow
            there) and the weight dtype elsewhere.
    """

    def __init__(self, config: LlamaConfig, *, schedule: ScheduleSpec = None, device: DeviceLike = None,
                 dtype: Optional[torch.dtype] = None, attn_kernel: str = "math",
                 compute_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if not isinstance(config, LlamaConfig):
            raise ValueError(f"config must be a LlamaConfig, got {type(config).__name__}")
        for name, value in (("dtype", dtype), ("compute_dtype", compute_dtype)):
            if value is not None and (not isinstance(value, torch.dtype) or not value.is_floating_point):
                raise ValueError(f"{name} must be a floating-point torch.dtype, got {value!r}")
        if attn_kernel not in ATTENTION_KERNELS:
            raise ValueError(f"unknown attention kernel {attn_kernel!r}; choose one of {ATTENTION_KERNELS}")
        # Everything that can be refused is refused before a single weight is allocated.
        device = None if device is None else resolve_device(device)
        schedule = resolve_schedule(schedule, config.n_layers)
        target = torch.get_default_device() if device is None else device
        weight_dtype = torch.get_default_dtype() if dtype is None else dtype
        # torch refuses a tensor beyond 2**63 - 1 bytes even on meta, from deep inside nn.Embedding.
        check_tensor_sizes(weight_tensor_sizes(config), weight_dtype.itemsize, f"Llama({config.name}) in {weight_dtype}")
        if target.type != "meta":
            check_memory(weight_bytes(config, weight_dtype), target,
                         f"Llama({config.name}) with {parameter_count(config):,} weights in {weight_dtype} "
                         f"and a RoPE table for max_seq_len={config.max_seq_len:,}")
        self.config = config
        self._compute_dtype = compute_dtype
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim, device=device, dtype=dtype)
        self.layers = nn.ModuleList(
            TransformerBlock(i, config, attn_kernel, device=device, dtype=dtype) for i in range(config.n_layers)
        )
        self.norm = RMSNorm(config.dim, config.norm_eps, device=device, dtype=dtype)
        self.output = Linear(config.dim, config.vocab_size, device=device, dtype=dtype)
        if config.tie_word_embeddings:
            self.tie_weights()
        # Tied heads: a state dict may hold the embedding alone (HF's save_pretrained) or both copies.
        self.register_load_state_dict_pre_hook(_tied_state_dict_pre_hook)
        self.register_load_state_dict_post_hook(_retie_after_load)
        # The RoPE table covers positions [0, _rope_positions); it grows on demand (reserve_positions),
        # never eagerly to max_seq_len (2**31 - 1 positions would be an 8.6 GB table).
        self._rope_positions = min(config.max_seq_len, ROPE_EAGER_POSITIONS)
        self.register_buffer("freqs_cis", torch.empty(0, dtype=torch.complex64, device=device), persistent=False)
        self.init_buffers()
        self._schedule = schedule
        # One cache per schedule *position*: a layer that runs twice must not share keys between runs.
        self.caches: Optional[nn.ModuleList] = None
        self._checkpoint_layers = False

    # ------------------------------------------------------------------ state
    def init_buffers(self) -> None:
        """(Re)compute the RoPE table on the weights' device, e.g. after ``to_empty`` or loading.
        It keeps covering the positions reserved so far (see :meth:`reserve_positions`)."""
        device = self.tok_embeddings.weight.device
        c = self.config
        # A table built inside inference_mode would be an inference tensor, unusable by a later
        # forward with autograd on; the table is model state, so build it as a normal tensor.
        with torch.inference_mode(False), torch.no_grad():
            if device.type == "meta":
                table = precompute_freqs_cis(c.head_dim, self._rope_positions, c.rope_theta, device=device,
                                             scaling=c.rope_scaling)
            else:
                # Computed on the CPU (as Meta's code does) and then moved, so every device gets the
                # bit-identical table and cross-device comparisons only see differences of the model itself.
                table = precompute_freqs_cis(c.head_dim, self._rope_positions, c.rope_theta,
                                             scaling=c.rope_scaling).to(device)
        self.freqs_cis = table  # (positions, head_dim // 2) complex64

    @property
    def rope_positions(self) -> int:
        """How many positions the RoPE table covers now: ``[0, rope_positions)``."""
        return self._rope_positions

    def reserve_positions(self, end: int) -> None:
        """Make the RoPE table cover positions ``[0, end)``. Idempotent; does nothing when it already does.

        Grows to the next power of two (capped at ``max_seq_len``), so a decode loop rebuilds it
        O(log n) times, not every step. ``setup_cache`` and ``forward`` call it; a counting tool calls
        it *before* a counted forward, so that the forward does no table work at all.
        """
        if isinstance(end, bool) or not isinstance(end, int) or end < 0:
            raise ValueError(f"end must be a non-negative int, got {end!r}")
        if end > self.config.max_seq_len:
            raise ValueError(f"cannot reserve RoPE positions up to {end}: the model's max_seq_len is "
                             f"{self.config.max_seq_len}")
        if end <= self._rope_positions:
            return
        positions = min(self.config.max_seq_len, 1 << (end - 1).bit_length())
        entry_bytes = (self.config.head_dim // 2) * 8  # complex64
        if self.device.type != "meta":
            check_memory(positions * entry_bytes, self.device, f"a RoPE table of {positions:,} positions",
                         freeable_bytes=self._rope_positions * entry_bytes)
        self._rope_positions = positions
        logger.debug("RoPE table grown to %d positions", self._rope_positions)
        self.init_buffers()

    def tie_weights(self) -> None:
        """With ``tie_word_embeddings``, make ``output.weight`` the very Parameter of ``tok_embeddings``
        (vocab_size x dim is both the embedding table and the head's weight)."""
        if self.config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def _apply(self, fn, *args, **kwargs):
        # ``Module.to(dtype)`` casts complex buffers as well: ``model.to(torch.bfloat16)`` would turn the
        # complex64 RoPE table into a *real* bf16 tensor (dropping the sin part, with only a warning) and
        # every position would be rotated wrongly. The table is derived from the config, never state, so
        # after any conversion (.to, .cuda, .half, to_empty, ...) it is rebuilt in complex64 next to the weights.
        self._buffers["freqs_cis"] = None  # Module._apply skips None buffers: never cast the table
        try:
            super()._apply(fn, *args, **kwargs)
        finally:
            # A conversion that makes new Parameters (e.g. to_empty from meta) converts each module's
            # reference separately, which would untie the head: tie it again.
            self.tie_weights()
            self.init_buffers()
        return self

    def to(self, *args, **kwargs) -> "Llama":
        """``nn.Module.to``, refusing a device this process does not have (CUDA on a CPU-only build,
        ``cuda:7`` with one GPU) with a clear ``DeviceUnavailableError`` instead of torch's assert."""
        try:
            device = torch._C._nn._parse_to(*args, **kwargs)[0]
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"Llama.to{args!r}: {str(e).splitlines()[0]}") from None
        if device is not None:
            resolve_device(device)
        return super().to(*args, **kwargs)

    def cuda(self, device=None) -> "Llama":
        """``nn.Module.cuda`` with the same device check as :meth:`to`."""
        if device is None:
            resolve_device("cuda")
        else:
            resolve_device(torch.device("cuda", device) if isinstance(device, int) else device)
        return super().cuda(device)

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        if self._compute_dtype is not None:
            return self._compute_dtype
        if self.device.type == "cpu":
            return torch.float32
        return self.tok_embeddings.weight.dtype

    @property
    def schedule(self) -> tuple[int, ...]:
        return self._schedule

    @property
    def schedule_str(self) -> str:
        return format_schedule(self._schedule)

    def set_schedule(self, schedule: ScheduleSpec) -> None:
        """Change the layer schedule. Drops any KV cache: its slots belonged to the old runs."""
        self._schedule = resolve_schedule(schedule, self.config.n_layers)
        if self.caches is not None:
            logger.info("layer schedule changed: KV cache cleared, call setup_cache again")
            self.caches = None

    @property
    def attn_kernel(self) -> str:
        """The attention kernel every layer runs: ``"math"`` or ``"sdpa"``."""
        return self.layers[0].attention.core.kernel

    @property
    def activation_checkpointing(self) -> bool:
        return self._checkpoint_layers

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Training memory for compute: with ``enabled``, a forward that records gradients keeps only each
        decoder layer's input and runs the layer's forward again during backward
        (``torch.utils.checkpoint``, non-reentrant). The whole layer is recomputed: torch's default
        "early stop" (which ends the recomputation once the saved tensors backward needs exist) is turned
        off, so the executed work is exactly one more forward of every layer run."""
        if not isinstance(enabled, bool):
            raise ValueError(f"enabled must be a bool, got {enabled!r}")
        self._checkpoint_layers = enabled

    def set_attn_kernel(self, kernel: str) -> None:
        """Switch every layer to attention ``kernel`` (``"math"`` or ``"sdpa"``); the logits are the same."""
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(f"unknown attention kernel {kernel!r}; choose one of {ATTENTION_KERNELS}")
        for layer in self.layers:
            layer.attention.core.kernel = kernel

    def setup_cache(self, max_batch_size: int, max_seq_len: Optional[int] = None,
                    dtype: Optional[torch.dtype] = None) -> None:
        """Allocate one KV cache per schedule position (not per layer: a repeated layer gets two).

        Any previous cache is dropped. On a real device the bytes needed
        (``2 * max_batch_size * max_seq_len * n_kv_heads * head_dim * itemsize * n_runs``) are checked
        against the memory available first (:class:`~llama_ref.errors.InsufficientMemoryError`).
        """
        max_seq_len = self.config.max_seq_len if max_seq_len is None else max_seq_len
        for name, value in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if max_seq_len > self.config.max_seq_len:
            raise ValueError(f"cache max_seq_len={max_seq_len} exceeds the model's max_seq_len={self.config.max_seq_len}")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ValueError(f"cache dtype must be a floating-point torch.dtype, got {dtype!r}")
        dtype = self.compute_dtype if dtype is None else dtype
        # Each cache is shaped like the attention it serves (a tensor-parallel rank holds only its kv heads).
        attentions = [self.layers[layer_id].attention for layer_id in self._schedule]
        widths = [a.n_kv_heads * a.head_dim for a in attentions]
        elements = max_batch_size * max_seq_len * max(widths)
        if elements * dtype.itemsize > TORCH_MAX_TENSOR_BYTES:  # torch's own limit (it matters on meta)
            raise ValueError(f"setup_cache({max_batch_size}, {max_seq_len}): a cache of {elements:,} elements "
                             f"of {dtype.itemsize} bytes exceeds torch's limit of 2**63 - 1 bytes for one tensor")
        old = self.caches
        freeable = 0
        if old is not None:
            freeable = sum(b.numel() * b.element_size() for b in old.buffers() if b.device == self.device)
        need = sum(2 * max_batch_size * max_seq_len * w * dtype.itemsize for w in widths)  # keys + values per run
        check_memory(need, self.device,
                     f"setup_cache(max_batch_size={max_batch_size}, max_seq_len={max_seq_len}): keys and values "
                     f"for {len(attentions)} layer run(s) in {dtype}", freeable_bytes=freeable)
        self.caches = None  # free the old cache before allocating the new one
        del old
        self.caches = nn.ModuleList(
            KVCache(max_batch_size, max_seq_len, a.n_kv_heads, a.head_dim, device=self.device, dtype=dtype)
            for a in attentions
        )
        self.reserve_positions(max_seq_len)  # every position the cache can hold has its rotation ready

    def clear_cache(self) -> None:
        """Drop the KV cache (and its memory); ``start_pos`` must be 0 until ``setup_cache`` is called again."""
        self.caches = None

    def reset_cache(self) -> None:
        """Mark every cache slot empty without reallocating: the next call must start at ``start_pos=0``."""
        if self.caches is not None:
            for cache in self.caches:
                cache.reset()

    def mark_cache_filled(self, n_positions: int, bsz: Optional[int] = None) -> None:
        """Declare positions ``[0, n_positions)`` of rows ``[:bsz]`` written *without computing them*.

        For timing and op counting only, where the cached values do not matter (the cache then holds
        zeros or stale keys there, so logits computed over it are meaningless): a decode step after
        C cached tokens does the same work whatever the keys are, and a real prefill of C tokens can
        cost far more than the step being measured. Never use it before generating.
        """
        if self.caches is None:
            raise ValueError("mark_cache_filled() needs a KV cache: call setup_cache() first")
        max_batch, max_seq = self.caches[0].max_batch_size, self.caches[0].max_seq_len
        bsz = max_batch if bsz is None else bsz
        if isinstance(bsz, bool) or not isinstance(bsz, int) or not 0 < bsz <= max_batch:
            raise ValueError(f"bsz must be an int in [1, {max_batch}] (the cache's max_batch_size), got {bsz!r}")
        if isinstance(n_positions, bool) or not isinstance(n_positions, int) or not 0 <= n_positions <= max_seq:
            raise ValueError(f"n_positions must be an int in [0, {max_seq}] (the cache's max_seq_len), got {n_positions!r}")
        for cache in self.caches:
            cache.mark_written(0, bsz, n_positions)

    def cache_filled(self, bsz: Optional[int] = None) -> Optional[int]:
        """How many leading positions the KV cache holds for every row of ``[:bsz]`` (default: all rows)
        in every schedule run: the largest ``start_pos`` the next call may use. ``None`` without a cache."""
        if self.caches is None:
            return None
        return min(cache.filled_len(bsz) for cache in self.caches)

    def check_finite(self) -> None:
        """Raise :class:`~llama_ref.errors.NonFiniteError` naming every weight that holds NaN or inf.

        One ``aminmax`` pass per tensor (about memory bandwidth); nothing to check on the meta device.
        """
        bad = [f"{name} ({describe_nonfinite(p)})" for name, p in self.named_parameters() if not all_finite(p.detach())]
        if bad:
            shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise NonFiniteError(f"{len(bad)} weight tensor(s) hold NaN or inf: {shown}")

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, tokens: torch.Tensor, start_pos: int) -> int:
        """Refuse bad input before any tensor work; returns ``start_pos`` as a Python int.

        Adds no tensor op beyond the vocabulary check's min/max (the counters require every forward to
        run the same ops), and no data-dependent Python on the meta device.
        """
        if not isinstance(tokens, torch.Tensor):
            raise ValueError(f"tokens must be a LongTensor of shape (bsz, seqlen), got {type(tokens).__name__}")
        if tokens.layout != torch.strided:
            raise ValueError(f"tokens must be a dense tensor, got layout {tokens.layout}")
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (bsz, seqlen), got shape {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be integer ids (int64/int32), got {tokens.dtype}")
        bsz, seqlen = tokens.shape
        if bsz == 0 or seqlen == 0:
            raise ValueError(f"empty input: tokens has shape {tuple(tokens.shape)}")
        if not _same_device(tokens.device, self.device):
            raise ValueError(f"tokens are on device {tokens.device} but the model is on {self.device}")
        # numbers.Integral admits numpy ints; a tensor, float or bool start_pos is refused.
        if isinstance(start_pos, bool) or not isinstance(start_pos, numbers.Integral) or start_pos < 0:
            raise ValueError(f"start_pos must be a non-negative int, got {start_pos!r} ({type(start_pos).__name__})")
        start_pos = int(start_pos)
        bsz, seqlen = int(bsz), int(seqlen)  # plain ints: under torch.jit.trace sizes are 0-dim tensors
        end = start_pos + seqlen
        if end > self.config.max_seq_len:
            raise ValueError(
                f"sequence end {end} (start_pos {start_pos} + seqlen {seqlen}) exceeds max_seq_len={self.config.max_seq_len}"
            )
        # Beyond torch's tensor size limit a forward fails deep inside (even on meta): refuse it here.
        what = f"a forward of {bsz:,} sequence(s) x {seqlen:,} tokens after {start_pos:,} cached"
        check_tensor_sizes(forward_tensor_sizes(self.config, bsz, seqlen, start_pos),
                           max(self.compute_dtype.itemsize, 4), what)
        if self.device.type != "meta":
            # Activations beyond the memory available end in an allocator error deep inside, or (Linux
            # overcommit) in the OOM killer with no message at all. The estimate is integer arithmetic; the
            # memory is looked up only for a forward large enough to matter.
            act = activation_bytes(self.config, bsz=bsz, seqlen=seqlen, start_pos=start_pos,
                                   compute_dtype=self.compute_dtype, kernel=self.attn_kernel)
            if act > ACTIVATION_CHECK_BYTES:
                check_memory(act, self.device, f"{what} (its largest activations)")
        if self.caches is None:
            if start_pos != 0:
                raise ValueError(f"start_pos={start_pos} needs a KV cache: call setup_cache() first")
        else:
            self._check_caches(start_pos, bsz, seqlen)
        # Value checks need data; a meta tensor has none (and must stay free of data-dependent Python).
        if tokens.device.type != "meta":
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        return start_pos

    def _check_caches(self, start_pos: int, bsz: int, seqlen: int) -> None:
        """Every schedule run has a cache of the right shape on the model's device that can take this
        write (bounds, and no unwritten positions before ``start_pos``), checked before any layer runs."""
        if len(self.caches) != len(self._schedule):
            raise ValueError(f"the model holds {len(self.caches)} KV cache(s) for a schedule of {len(self._schedule)} "
                             "layer runs; call setup_cache() again")
        for pos, (cache, layer_id) in enumerate(zip(self.caches, self._schedule)):
            if not isinstance(cache, KVCache):
                raise ValueError(f"caches[{pos}] is a {type(cache).__name__}, not a KVCache; call setup_cache()")
            attention = self.layers[layer_id].attention  # a tensor-parallel rank's holds only its kv heads
            want = (attention.n_kv_heads, attention.head_dim)
            if tuple(cache.cache_k.shape[2:]) != want:
                raise ValueError(f"caches[{pos}] holds {tuple(cache.cache_k.shape[2:])} (n_kv_heads, head_dim) "
                                 f"per position, the model needs {want}; call setup_cache()")
            if not _same_device(cache.cache_k.device, self.device):
                raise ValueError(f"caches[{pos}] is on {cache.cache_k.device} but the model is on {self.device}; "
                                 "call setup_cache()")
            cache.check_write(start_pos, bsz, seqlen)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Logits in fp32, shape (bsz, seqlen, vocab_size). With a cache, reads and fills it from ``start_pos``."""
        start_pos = self._check_inputs(tokens, start_pos)
        bsz, seqlen = tokens.shape
        h = self.tok_embeddings(tokens).to(self.compute_dtype)  # (bsz, seqlen, dim)
        if start_pos + seqlen > self._rope_positions:
            self.reserve_positions(start_pos + seqlen)  # counters reserve beforehand: no table work when counted
        freqs_cis = self.freqs_cis[start_pos : start_pos + seqlen]  # (seqlen, head_dim // 2)
        mask = None
        if seqlen > 1:
            # Causal within the new tokens; every cached position (the first start_pos columns) is visible.
            mask = torch.full((seqlen, seqlen), float("-inf"), device=tokens.device, dtype=self.compute_dtype)
            mask = torch.triu(mask, diagonal=1)
            mask = torch.hstack(
                [torch.zeros((seqlen, start_pos), device=tokens.device, dtype=self.compute_dtype), mask]
            )  # (seqlen, start_pos + seqlen)
        checkpointed = self._checkpoint_layers and torch.is_grad_enabled() and self.caches is None
        for pos, layer_id in enumerate(self._schedule):
            cache = self.caches[pos] if self.caches is not None else None
            if checkpointed:
                with torch.utils.checkpoint.set_checkpoint_early_stop(False):
                    h = torch.utils.checkpoint.checkpoint(self.layers[layer_id], h, start_pos, freqs_cis, mask, None,
                                                          use_reentrant=False)  # (bsz, seqlen, dim)
            else:
                h = self.layers[layer_id](h, start_pos, freqs_cis, mask, cache)  # (bsz, seqlen, dim)
        h = self.norm(h)
        return self.output(h).float()  # (bsz, seqlen, vocab_size)

    # ------------------------------------------------------------------ conveniences
    def num_params(self) -> int:
        """Distinct parameters: a tied embedding/output matrix counts once."""
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "Llama":
        return cls(LlamaConfig.from_preset(name), **kwargs)

    @classmethod
    def from_pretrained(cls, path, *, device: DeviceLike = "cpu", dtype: Optional[torch.dtype] = None, **kwargs) -> "Llama":
        """Load a checkpoint directory: HF (``config.json`` + safetensors/bin) or Meta (``params.json`` + ``consolidated.*.pth``)."""
        from .loading import load_pretrained

        return load_pretrained(path, device=device, dtype=dtype, **kwargs)

    @classmethod
    def from_hf(cls, hf_model, **kwargs) -> "Llama":
        """Convert a live ``transformers`` ``LlamaForCausalLM`` (weights are copied, q/k un-permuted)."""
        from .hf import from_hf_model

        return from_hf_model(hf_model, **kwargs)


def _tied_state_dict_pre_hook(module: "Llama", state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
    """Accept a tied model's state dict with the embedding only (add the head as the same tensor),
    or with both copies when they are equal; refuse two different matrices for one tied parameter."""
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


def _retie_after_load(module: "Llama", incompatible_keys) -> None:
    # load_state_dict(assign=True) sets each module's Parameter separately, which would untie them.
    module.tie_weights()


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    if a.is_meta or b.is_meta:
        return True  # no data to compare; shapes agree
    wide = torch.promote_types(a.dtype, b.dtype)  # exact: compare values, not roundings of them
    return bool(torch.equal(a.to(wide), b.to(device=a.device, dtype=wide)))


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` name the same device when the current device is 0; an unset index matches any."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)
