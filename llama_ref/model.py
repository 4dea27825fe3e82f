"""The Llama-2/3 decoder in one file, read top to bottom: RMSNorm, RoPE, the KV cache, grouped-query
attention, the SwiGLU feed-forward, the decoder layer and the model.

Parameter names are Meta's (``tok_embeddings``, ``layers.{i}.attention.wq``, ...). ``forward`` is a pure
tensor program (no ``.item()``, no I/O, no data-dependent Python), so ``torch.compile(fullgraph=True)``
takes it whole. Refusing bad input happens before it, once per request, in :mod:`llama_ref.guards`:
an eager call runs the cheap plain-Python checks (shapes, positions, the KV cache's fill marks) first;
:func:`llama_ref.guards.check_inputs` adds the checks that read data or the machine (token values,
memory), which ``generate``, the loaders and the command line run once per request.

Small modules exist where a counter must see a piece of work on its own (``RotaryEmbedding``,
``AttentionCore``, ``GatedSiLU``): forward hooks and fvcore attribute each op to the module that ran it.
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from . import guards
from .config import LlamaConfig
from .rope_scaling import RopeScaling
from .shapes import ROPE_EAGER_POSITIONS

logger = logging.getLogger(__name__)
Positions = Union[int, torch.Tensor]  # start_pos: an int, or a 0-dim LongTensor (static cache, compiled decoding)


# ====================================================================== building blocks
class Linear(nn.Linear):
    """``nn.Linear`` without bias whose weight is cast to the activation dtype on the fly: bf16-stored weights
    run fp32 math one weight at a time, without a second fp32 copy of the model. Same dtype: ``.to`` is a no-op."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))  # (..., in) @ (in, out) -> (..., out)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back (a sum of squares over 4096+ channels loses
    precision in bf16), as Meta's and HF's code do."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self._norm(x.float()).type_as(x)
        return output * self.weight.to(x.dtype)


# ====================================================================== rotary position embedding
def rope_inv_freq(head_dim: int, theta: float = 10000.0, scaling: Optional[RopeScaling] = None,
                  device=None) -> torch.Tensor:
    """``theta^(-2k/head_dim)`` for k < head_dim/2, then scaled: ``(head_dim // 2,)`` fp32, like Meta's and HF's."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    return inv_freq if scaling is None else scaled_inv_freq(inv_freq, scaling)


def scaled_inv_freq(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Long-context frequency scaling, op for op as transformers' ``_compute_llama3_parameters`` /
    ``_compute_linear_scaling_rope_parameters`` (and Meta's ``apply_scaling``), so tables agree bit for bit."""
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor  # same as dividing every position by factor
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_context_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context_len / low  # longer wavelengths than this: interpolate (divide by factor)
    high_freq_wavelen = old_context_len / high  # shorter: keep (many full turns within the trained context)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low) / (high - low)  # between the two: blend smoothly
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def precompute_freqs_cis(head_dim: int, end: int, theta: float = 10000.0, device=None, *,
                         scaling: Optional[RopeScaling] = None) -> torch.Tensor:
    """Unit complex numbers ``e^{i * t * inv_freq}`` for t < end: ``(end, head_dim // 2)`` complex64. Each row
    depends on its own position only, so a shorter table is bit for bit the start of a longer one."""
    freqs = rope_inv_freq(head_dim, theta, scaling, device=device)  # (head_dim // 2,)
    t = torch.arange(end, device=device, dtype=torch.float32)
    freqs = torch.outer(t, freqs)  # (end, head_dim // 2)
    return torch.polar(torch.ones_like(freqs), freqs)  # complex64, |z| = 1


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate channel pairs (0,1), (2,3), ... of q and k, each pair one complex number times ``freqs_cis``
    (HF checkpoints permute q/k rows for their rotate-half code; the loaders undo it). In fp32, cast back.
    ``xq`` (bsz, seqlen, n_heads, head_dim), ``xk`` (bsz, seqlen, n_kv_heads, head_dim), ``freqs_cis`` (seqlen, head_dim // 2)."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))  # (bsz, seqlen, n_heads, head_dim // 2)
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))  # (bsz, seqlen, n_kv_heads, head_dim // 2)
    freqs = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])  # (1, seqlen, 1, head_dim // 2): over batch and heads
    xq_out = torch.view_as_real(xq_ * freqs).flatten(3)  # (bsz, seqlen, n_heads, head_dim)
    xk_out = torch.view_as_real(xk_ * freqs).flatten(3)  # (bsz, seqlen, n_kv_heads, head_dim)
    return xq_out.type_as(xq), xk_out.type_as(xk)


class RotaryEmbedding(nn.Module):
    """:func:`apply_rotary_emb` as a module, so counters attribute its complex multiplies to RoPE."""

    def forward(self, xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary_emb(xq, xk, freqs_cis)


# ====================================================================== attention
def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``torch.repeat_interleave(x, dim=2, repeats=n_rep)``: query heads g*n_rep .. g*n_rep+n_rep-1 share kv head g."""
    if n_rep == 1:
        return x
    bsz, seqlen, n_kv_heads, head_dim = x.shape
    return (
        x[:, :, :, None, :]
        .expand(bsz, seqlen, n_kv_heads, n_rep, head_dim)
        .reshape(bsz, seqlen, n_kv_heads * n_rep, head_dim)  # (bsz, seqlen, n_heads, head_dim)
    )


class KVCache(nn.Module):
    """Keys and values of one attention *run* (Meta's layout), and how far each batch row is written.

    ``fill`` (:class:`llama_ref.guards.FillMarks`) is plain-Python bookkeeping kept by the eager guards, never
    by the tensor program: a call must not start beyond what is written (it would attend to zeros or to
    another sequence's stale keys), which is checked before any work.
    """

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 device=None, dtype=torch.float32) -> None:
        super().__init__()
        guards.check_cache_shape(max_batch_size, max_seq_len, n_kv_heads, head_dim, dtype)
        shape = (max_batch_size, max_seq_len, n_kv_heads, head_dim)
        # Not persistent: a cache is runtime state, never part of a checkpoint.
        self.register_buffer("cache_k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("cache_v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.fill = guards.FillMarks(max_batch_size, max_seq_len)

    def update(self, start_pos: Positions, xk: torch.Tensor, xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``xk``, ``xv`` (bsz, seqlen, n_kv_heads, head_dim) at ``start_pos``. Returns the keys and
        values to attend over: positions [0, start_pos + seqlen), or for a tensor ``start_pos`` the whole
        cache (static shapes; the mask hides what lies ahead)."""
        bsz, seqlen = xk.shape[:2]
        if isinstance(start_pos, torch.Tensor):
            pos = start_pos + torch.arange(seqlen, device=xk.device)  # (seqlen,)
            self.cache_k[:bsz, pos] = xk.to(self.cache_k.dtype)
            self.cache_v[:bsz, pos] = xv.to(self.cache_v.dtype)
            return self.cache_k[:bsz], self.cache_v[:bsz]  # (bsz, max_seq_len, n_kv_heads, head_dim)
        self.cache_k[:bsz, start_pos : start_pos + seqlen] = xk.to(self.cache_k.dtype)
        self.cache_v[:bsz, start_pos : start_pos + seqlen] = xv.to(self.cache_v.dtype)
        end = start_pos + seqlen
        return self.cache_k[:bsz, :end], self.cache_v[:bsz, :end]  # (bsz, start_pos + seqlen, n_kv_heads, head_dim)

    def extra_repr(self) -> str:
        return f"max_batch_size={self.cache_k.shape[0]}, max_seq_len={self.cache_k.shape[1]}, filled={self.fill.filled()}"


class AttentionCore(nn.Module):
    """softmax(q k^T / sqrt(head_dim) + mask) v over every query head, kv heads shared by ``repeat_kv``.

    ``kernel="math"`` spells out matmul-softmax-matmul (every op visible to hooks, fvcore and FlopCounterMode);
    ``"sdpa"`` calls ``F.scaled_dot_product_attention``. Both compute the dense ``seqlen x kvlen`` scores.
    """

    def __init__(self, n_rep: int, attn_kernel: str = "math") -> None:
        super().__init__()
        guards.check_kernel(attn_kernel)
        self.n_rep = n_rep
        self.attn_kernel = attn_kernel

    def forward(self, xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: Optional[torch.Tensor]) -> torch.Tensor:
        bsz, seqlen, n_heads, head_dim = xq.shape
        keys = repeat_kv(keys, self.n_rep)  # (bsz, kvlen, n_heads, head_dim)
        values = repeat_kv(values, self.n_rep)  # (bsz, kvlen, n_heads, head_dim)
        q = xq.transpose(1, 2)  # (bsz, n_heads, seqlen, head_dim)
        k = keys.transpose(1, 2)  # (bsz, n_heads, kvlen, head_dim)
        v = values.transpose(1, 2)  # (bsz, n_heads, kvlen, head_dim)
        if self.attn_kernel == "math":
            scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(head_dim)  # (bsz, n_heads, seqlen, kvlen)
            if mask is not None:
                scores = scores + mask  # (seqlen, kvlen), broadcast
            # Softmax in fp32: exp of bf16 logits loses the small differences that matter.
            scores = F.softmax(scores.float(), dim=-1).type_as(q)
            output = torch.matmul(scores, v)  # (bsz, n_heads, seqlen, head_dim)
        elif mask is None and seqlen > 1:
            # No cached prefix (the model built no mask): plain causal, which the fused kernels apply natively.
            output = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (bsz, n_heads, seqlen, head_dim)
        else:
            output = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (bsz, n_heads, seqlen, head_dim)
        return output.transpose(1, 2).reshape(bsz, seqlen, n_heads * head_dim)  # (bsz, seqlen, n_heads * head_dim)


class Attention(nn.Module):
    """Grouped-query attention: ``n_heads`` query heads share ``n_kv_heads`` key/value heads (``n_rep`` each).
    ``n_heads``/``n_kv_heads`` are the heads *this module* holds (a tensor-parallel rank's share, see
    :func:`llama_ref.parallel.parallelize`)."""

    def __init__(self, config: LlamaConfig, attn_kernel: str = "math", device=None, dtype=None) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.wq = Linear(config.dim, config.q_dim, device=device, dtype=dtype)
        self.wk = Linear(config.dim, config.kv_dim, device=device, dtype=dtype)
        self.wv = Linear(config.dim, config.kv_dim, device=device, dtype=dtype)
        self.wo = Linear(config.q_dim, config.dim, device=device, dtype=dtype)
        self.rope = RotaryEmbedding()
        self.core = AttentionCore(config.n_rep, attn_kernel)

    def forward(self, x: torch.Tensor, start_pos: Positions, freqs_cis: torch.Tensor,
                mask: Optional[torch.Tensor], cache: Optional[KVCache] = None) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)  # (bsz, seqlen, n_heads, head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)  # (bsz, seqlen, n_kv_heads, head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)  # (bsz, seqlen, n_kv_heads, head_dim)
        xq, xk = self.rope(xq, xk, freqs_cis)
        if cache is not None:
            keys, values = cache.update(start_pos, xk, xv)  # (bsz, kvlen, n_kv_heads, head_dim)
            keys, values = keys.to(xq.dtype), values.to(xq.dtype)
        else:
            keys, values = xk, xv
        return self.wo(self.core(xq, keys, values, mask))  # (bsz, seqlen, dim)


# ====================================================================== feed-forward and the decoder layer
class GatedSiLU(nn.Module):
    """The SwiGLU gate ``silu(gate) * up``: a module so counters see its elementwise work."""

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up


class FeedForward(nn.Module):
    """SwiGLU MLP: ``w2(silu(w1 x) * w3 x)`` (HF: gate_proj = w1, up_proj = w3, down_proj = w2)."""

    def __init__(self, dim: int, hidden_dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.w1 = Linear(dim, hidden_dim, device=device, dtype=dtype)
        self.w2 = Linear(hidden_dim, dim, device=device, dtype=dtype)
        self.w3 = Linear(dim, hidden_dim, device=device, dtype=dtype)
        self.act = GatedSiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x), self.w3(x)))  # (bsz, seqlen, dim) -> (.., hidden_dim) -> (.., dim)


class TransformerBlock(nn.Module):
    """One decoder layer: pre-norm attention and pre-norm SwiGLU, each with a residual add."""

    def __init__(self, layer_id: int, config: LlamaConfig, attn_kernel: str = "math", device=None, dtype=None) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(config, attn_kernel, device=device, dtype=dtype)
        self.feed_forward = FeedForward(config.dim, config.hidden_dim, device=device, dtype=dtype)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps, device=device, dtype=dtype)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, start_pos: Positions, freqs_cis: torch.Tensor,
                mask: Optional[torch.Tensor], cache: Optional[KVCache] = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start_pos, freqs_cis, mask, cache)  # (bsz, seqlen, dim)
        return h + self.feed_forward(self.ffn_norm(h))  # (bsz, seqlen, dim)


# ====================================================================== the model
class Llama(nn.Module):
    """Token embedding, a *schedule* of decoder-layer runs (:mod:`llama_ref.schedule`: layers may be skipped
    or repeated), the final norm and the output head.

    Args:
        config: the model shape.
        schedule: which layers to run, in order; default all.
        device, dtype: where and in what dtype the *weights* live (``"meta"``: shapes only, no storage).
        attn_kernel: ``"math"`` (the reference, default) or ``"sdpa"``.
        compute_dtype: dtype of the activations. ``"auto"`` (default) takes the weight dtype where the device
            multiplies it natively (CUDA; CPUs with AMX or AVX512-BF16 for bf16), else fp32
            (:mod:`llama_ref.compute_dtype`; the choice and why: ``compute_dtype_reason``). A dtype wins.
    """

    def __init__(self, config: LlamaConfig, *, schedule=None, device=None, dtype: Optional[torch.dtype] = None,
                 attn_kernel: str = "math", compute_dtype: Union[str, torch.dtype, None] = "auto") -> None:
        super().__init__()
        # Everything that can be refused is refused before a single weight is allocated.
        schedule, device = guards.check_build(config, schedule=schedule, device=device, dtype=dtype,
                                              attn_kernel=attn_kernel, compute_dtype=compute_dtype)
        self.config = config
        # No random init on meta: normal_ on meta imports torch._dynamo, a second of every checkpoint load.
        on_meta = torch.empty(0, device=device).is_meta
        table = torch.empty(config.vocab_size, config.dim, device="meta", dtype=dtype) if on_meta else None
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim, device=device, dtype=dtype, _weight=table)
        self.layers = nn.ModuleList(TransformerBlock(i, config, attn_kernel, device=device, dtype=dtype)
                                    for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps, device=device, dtype=dtype)
        self.output = Linear(config.dim, config.vocab_size, device=device, dtype=dtype)
        self.tie_weights()
        guards.register_tied_load_hooks(self)  # a tied state dict may hold the embedding alone, or both copies
        self._compute_dtype_request = compute_dtype
        # The RoPE table covers positions [0, rope_positions) and grows on demand (reserve_positions), never
        # eagerly to max_seq_len (2**31 - 1 positions would be an 8.6 GB table).
        self.rope_positions = min(config.max_seq_len, ROPE_EAGER_POSITIONS)
        self.register_buffer("freqs_cis", torch.empty(0, dtype=torch.complex64, device=device), persistent=False)
        self.init_buffers()
        self._schedule: tuple[int, ...] = schedule
        self.caches: Optional[nn.ModuleList] = None  # one per schedule *position*: a repeated layer gets two
        self.activation_checkpointing = False

    def init_buffers(self) -> None:
        """(Re)build what derives from the config and the weights' device: the RoPE table and the compute
        dtype. Called after any move (``.to``, ``to_empty``) and by the loaders after assigning weights."""
        c, device = self.config, self.device
        dtype, self.compute_dtype_reason = guards.resolve_compute_dtype(
            self._compute_dtype_request, device, self.tok_embeddings.weight.dtype)
        if dtype != getattr(self, "compute_dtype", None):
            logger.info("%s on %s computes in %s: %s", self.config.name, device, dtype, self.compute_dtype_reason)
        self.compute_dtype = dtype
        # A table made in inference_mode would be unusable by a later forward with autograd: build a normal one.
        # On the CPU, then moved: every device gets the bit-identical table (as Meta's code does). On meta only its
        # shape (computed there, its scalar ops would import torch._dynamo: a second of every checkpoint load).
        with torch.inference_mode(False), torch.no_grad():
            if device.type == "meta":
                table = torch.empty(self.rope_positions, c.head_dim // 2, dtype=torch.complex64, device=device)
            else:
                table = precompute_freqs_cis(c.head_dim, self.rope_positions, c.rope_theta, scaling=c.rope_scaling)
        self.freqs_cis = table.to(device)  # (rope_positions, head_dim // 2) complex64

    def reserve_positions(self, end: int) -> None:
        """Make the RoPE table cover positions ``[0, end)``, growing it to the next power of two (capped at
        ``max_seq_len``) so that a decode loop rebuilds it O(log n) times. Counting tools call it before a
        counted forward, so that the forward does no table work."""
        guards.check_reserve(self, end)
        if end > self.rope_positions:
            self.rope_positions = min(self.config.max_seq_len, 1 << (end - 1).bit_length())
            self.init_buffers()

    def tie_weights(self) -> None:
        """With ``tie_word_embeddings``, ``output.weight`` is the very Parameter of ``tok_embeddings``."""
        if self.config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def _apply(self, fn, *args, **kwargs):
        # ``.to(torch.bfloat16)`` would turn the complex64 RoPE table into a *real* tensor (dropping the sin
        # part): the table is derived, never state, so it is left out and rebuilt after any conversion.
        self._buffers["freqs_cis"] = None  # Module._apply skips None buffers
        try:
            super()._apply(fn, *args, **kwargs)
        finally:
            self.tie_weights()  # a conversion that makes new Parameters (to_empty) would untie the head
            self.init_buffers()
        return self

    def to(self, *args, **kwargs) -> "Llama":
        guards.check_to_device(args, kwargs)  # a device this process lacks: a clear error, not torch's assert
        return super().to(*args, **kwargs)

    def cuda(self, device=None) -> "Llama":
        guards.check_to_device((torch.device("cuda", device) if isinstance(device, int) else device or "cuda",), {})
        return super().cuda(device)

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def schedule(self) -> tuple[int, ...]:
        """Layer runs of a forward, in order (see :meth:`set_schedule`)."""
        return self._schedule

    @property
    def attn_kernel(self) -> str:
        return self.layers[0].attention.core.attn_kernel

    def set_attn_kernel(self, attn_kernel: str) -> None:
        """Switch every layer to attention ``attn_kernel``; the logits are the same."""
        guards.check_kernel(attn_kernel)
        for layer in self.layers:
            layer.attention.core.attn_kernel = attn_kernel

    def set_schedule(self, schedule) -> None:
        """Change the layer schedule. Drops any KV cache: its slots belonged to the old runs."""
        self._schedule = guards.resolve_schedule(schedule, self.config.n_layers)
        self.caches = None

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """With ``enabled``, a forward that records gradients keeps only each layer run's input and runs the
        whole layer again during backward (``torch.utils.checkpoint``, non-reentrant, early stop off: the
        executed work is exactly one more forward of every layer run)."""
        self.activation_checkpointing = guards.check_flag("enabled", enabled)

    # ------------------------------------------------------------------ KV cache
    def setup_cache(self, max_batch_size: int, max_seq_len: Optional[int] = None,
                    dtype: Optional[torch.dtype] = None) -> None:
        """Allocate one KV cache per schedule *run* (a repeated layer gets two), in the compute dtype by
        default, after checking the bytes against the memory available. Any previous cache is dropped."""
        max_seq_len = self.config.max_seq_len if max_seq_len is None else max_seq_len
        dtype = self.compute_dtype if dtype is None else dtype
        guards.check_cache_request(self, max_batch_size, max_seq_len, dtype)
        self.caches = None  # free the old cache before allocating the new one
        attentions = [self.layers[layer_id].attention for layer_id in self.schedule]
        self.caches = nn.ModuleList(KVCache(max_batch_size, max_seq_len, a.n_kv_heads, a.head_dim,
                                            device=self.device, dtype=dtype) for a in attentions)
        self.reserve_positions(max_seq_len)  # every position the cache can hold has its rotation ready

    def clear_cache(self) -> None:
        """Drop the KV cache (and its memory)."""
        self.caches = None

    def reset_cache(self) -> None:
        """Mark every cache slot empty without reallocating: the next call must start at ``start_pos=0``."""
        for cache in self.caches or ():
            cache.fill.reset()

    def cache_filled(self, bsz: Optional[int] = None) -> Optional[int]:
        """How many leading positions every cache holds for rows ``[:bsz]``: the largest ``start_pos`` the next
        call may use. ``None`` without a cache."""
        return None if self.caches is None else min(cache.fill.filled(bsz) for cache in self.caches)

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: torch.Tensor, start_pos: Positions = 0, *, last_only: bool = False) -> torch.Tensor:
        """fp32 logits (bsz, seqlen, vocab_size) of ``tokens`` (bsz, seqlen) at positions ``start_pos`` onwards;
        with a cache, reads and fills it. ``last_only``: the head runs on the last position only (bsz, 1,
        vocab_size), as generation needs. A 0-dim LongTensor ``start_pos`` (compiled decoding) attends over
        the whole cache with a mask, so every step has the same shapes and compiles once."""
        eager = not torch.compiler.is_compiling()
        if eager:  # plain-Python checks before any work: shapes, positions, the caches' fill marks
            first = guards.check_call(self, tokens, start_pos)
        bsz, seqlen = tokens.shape
        h = self.tok_embeddings(tokens).to(self.compute_dtype)  # (bsz, seqlen, dim)
        if isinstance(start_pos, torch.Tensor):
            positions = start_pos + torch.arange(seqlen, device=tokens.device)  # (seqlen,)
            freqs_cis = self.freqs_cis[positions]  # (seqlen, head_dim // 2)
            kv_pos = torch.arange(self.caches[0].cache_k.shape[1], device=tokens.device)  # (max_seq_len,)
            mask = torch.zeros(seqlen, kv_pos.shape[0], device=tokens.device, dtype=self.compute_dtype)
            mask = mask.masked_fill(kv_pos[None, :] > positions[:, None], float("-inf"))  # (seqlen, max_seq_len)
        else:
            freqs_cis = self.freqs_cis[start_pos : start_pos + seqlen]  # (seqlen, head_dim // 2)
            mask = None
            # Causal within the new tokens; every cached position (the first start_pos) is visible. Without a
            # cached prefix the sdpa kernel applies it itself (is_causal): no seqlen x seqlen tensor to build.
            if seqlen > 1 and not (start_pos == 0 and self.attn_kernel == "sdpa"):
                mask = torch.full((seqlen, seqlen), float("-inf"), device=tokens.device, dtype=self.compute_dtype)
                mask = torch.triu(mask, diagonal=1)
                mask = torch.hstack([torch.zeros((seqlen, start_pos), device=tokens.device, dtype=self.compute_dtype),
                                     mask])  # (seqlen, start_pos + seqlen)
        checkpointed = self.activation_checkpointing and torch.is_grad_enabled() and self.caches is None
        for pos, layer_id in enumerate(self.schedule):
            layer = self.layers[layer_id]
            if checkpointed:
                with torch.utils.checkpoint.set_checkpoint_early_stop(False):
                    h = torch.utils.checkpoint.checkpoint(layer, h, start_pos, freqs_cis, mask, None,
                                                          use_reentrant=False)  # (bsz, seqlen, dim)
            else:
                h = layer(h, start_pos, freqs_cis, mask, None if self.caches is None else self.caches[pos])
        h = self.norm(h)  # (bsz, seqlen, dim)
        if last_only:
            h = h[:, -1:]  # (bsz, 1, dim): only the next token's logits are needed
        logits = self.output(h).float()  # (bsz, seqlen or 1, vocab_size)
        if eager:
            guards.mark_written(self, tokens, first)
        return logits

    # ------------------------------------------------------------------ conveniences
    def param_count(self) -> int:
        """Distinct parameters this module holds (a tied head counts once; a tensor-parallel rank: its share)."""
        return sum(p.numel() for p in self.parameters())

    def check_finite(self) -> None:
        """Raise :class:`~llama_ref.errors.NonFiniteError` naming every weight holding NaN or inf."""
        guards.check_finite_weights(self)

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "Llama":
        return cls(LlamaConfig.from_preset(name), **kwargs)
