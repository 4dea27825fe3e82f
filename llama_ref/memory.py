"""Memory estimates, and a refusal *before* an allocation that cannot fit.

Without it, ``Llama(llama-2-70b config, device="cpu")`` (276 GB in fp32) or ``setup_cache(10**6, ...)``
ends in an allocator error deep inside torch or, on Linux, in the OOM killer with no message at all.
The check is a necessary condition: it refuses what cannot fit, not what fits tightly.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .config import LlamaConfig
from .errors import InsufficientMemoryError
from .rope import ROPE_EAGER_POSITIONS

logger = logging.getLogger(__name__)


def available_memory_bytes(device: Union[str, torch.device]) -> Optional[int]:
    """Memory a new allocation on ``device`` can use now, in bytes; ``None`` when unknown.

    CUDA: free device memory (``torch.cuda.mem_get_info``). CPU: the kernel's ``MemAvailable``
    (free plus reclaimable page cache) from ``/proc/meminfo``, else free physical pages.
    The meta device and other backends: ``None`` (nothing to check).
    """
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, _total = torch.cuda.mem_get_info(device)
        except (RuntimeError, AssertionError, ValueError):
            return None
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="utf-8") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def parameter_count(config: LlamaConfig) -> int:
    """Exact number of weights of ``Llama(config)`` (embedding, output head unless tied to it, layers, norms)."""
    c = config
    q_width = c.n_heads * c.head_dim
    per_layer = (
        c.dim * q_width  # wq
        + 2 * c.dim * c.kv_dim  # wk, wv
        + q_width * c.dim  # wo
        + 3 * c.dim * c.hidden_dim  # w1, w3, w2
        + 2 * c.dim  # attention_norm, ffn_norm
    )
    vocab_matrices = 1 if c.tie_word_embeddings else 2  # a tied head is the embedding tensor itself
    return vocab_matrices * c.vocab_size * c.dim + c.n_layers * per_layer + c.dim


def weight_bytes(config: LlamaConfig, dtype: torch.dtype) -> int:
    """Bytes of ``Llama(config, dtype=dtype)`` on a real device: the weights plus the complex64 RoPE table of
    the positions built when the model is made (:data:`~llama_ref.rope.ROPE_EAGER_POSITIONS`; it grows later,
    checked again then)."""
    rope_table = min(config.max_seq_len, ROPE_EAGER_POSITIONS) * (config.head_dim // 2) * 8
    return parameter_count(config) * dtype.itemsize + rope_table


def kv_cache_bytes(config: LlamaConfig, max_batch_size: int, max_seq_len: int, n_runs: int,
                   dtype: torch.dtype) -> int:
    """Bytes of the KV caches ``setup_cache`` allocates: keys and values, one cache per schedule run,
    each (max_batch_size, max_seq_len, n_kv_heads, head_dim)."""
    return 2 * max_batch_size * max_seq_len * config.n_kv_heads * config.head_dim * dtype.itemsize * n_runs


# ---------------------------------------------------------------------------- torch's size limit
#: The most bytes one tensor may span: torch computes a storage's size as ``numel * itemsize`` in 64-bit
#: signed arithmetic and refuses anything beyond ("Storage size calculation overflowed"), on every
#: device, the meta device included.
TORCH_MAX_TENSOR_BYTES = 2**63 - 1


def weight_tensor_sizes(config: LlamaConfig) -> dict[str, int]:
    """Elements of the largest weight tensor of each kind of ``Llama(config)``."""
    c = config
    return {"tok_embeddings.weight": c.vocab_size * c.dim, "output.weight": c.vocab_size * c.dim,
            "attention.wq.weight": c.q_dim * c.dim, "attention.wk.weight": c.kv_dim * c.dim,
            "feed_forward.w1.weight": c.hidden_dim * c.dim}


def forward_tensor_sizes(config: LlamaConfig, bsz: int, seqlen: int, start_pos: int = 0) -> dict[str, int]:
    """Elements of the largest tensors one forward of ``bsz`` sequences of ``seqlen`` new tokens after
    ``start_pos`` cached positions creates (independent of the device and of the kernel)."""
    c = config
    kvlen = start_pos + seqlen
    rows = bsz * seqlen
    return {"the logits": rows * c.vocab_size,
            "the attention scores": bsz * c.n_heads * seqlen * kvlen,  # (bsz, n_heads, seqlen, kvlen)
            "the attention mask": seqlen * kvlen,  # (seqlen, kvlen)
            "the keys repeated over the query heads": bsz * kvlen * c.q_dim,  # (bsz, kvlen, n_heads, head_dim)
            "the MLP activations": rows * c.hidden_dim,  # (bsz, seqlen, hidden_dim)
            "the queries": rows * c.q_dim,
            "the hidden states": rows * c.dim}


def check_tensor_sizes(sizes: dict[str, int], itemsize: int, what: str) -> None:
    """``ValueError`` when one of ``sizes`` (elements) times ``itemsize`` bytes is beyond
    :data:`TORCH_MAX_TENSOR_BYTES`, which torch refuses with a ``RuntimeError`` from deep inside."""
    for name, elements in sizes.items():
        if elements * itemsize > TORCH_MAX_TENSOR_BYTES:
            raise ValueError(
                f"{what}: {name} would hold {elements:,} elements of {itemsize} bytes, beyond torch's limit of "
                f"2**63 - 1 bytes for one tensor (on every device, meta included)")


# ---------------------------------------------------------------------------- one forward
@dataclass(frozen=True)
class ForwardMemory:
    """Bytes one forward needs on a real device, in three parts (an estimate: weights and cache are exact,
    activations are the largest transient tensors alive at once, rounded up)."""

    weights: int  # parameters + the RoPE table
    kv_cache: int
    activations: int
    gradients: int = 0  # a training step: one gradient per parameter

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.gradients

    def describe(self) -> str:
        grads = f", gradients {format_bytes(self.gradients)}" if self.gradients else ""
        return (f"{format_bytes(self.total)}: weights {format_bytes(self.weights)}{grads}, KV cache "
                f"{format_bytes(self.kv_cache)}, activations {format_bytes(self.activations)}")


def activation_bytes(config: LlamaConfig, *, bsz: int, seqlen: int, start_pos: int = 0,
                     compute_dtype: torch.dtype = torch.float32, kernel: str = "math") -> int:
    """The largest transient tensors of one forward alive at once, in bytes (an upper-ish estimate).

    The math kernel holds about three score tensors at a time (the product, the masked scores and the
    softmax, which is taken in fp32); ``sdpa`` at most one. Around them: the keys and values repeated
    over the query heads, the mask, the MLP's gate, up and product, a handful of hidden-state-sized
    tensors, and the logits (in the compute dtype, then fp32).
    """
    cd = compute_dtype.itemsize
    s = forward_tensor_sizes(config, bsz, seqlen, start_pos)
    score_copies = 3 if kernel == "math" else 1
    scores = score_copies * s["the attention scores"] * max(cd, 4)
    repeated_kv = 2 * s["the keys repeated over the query heads"] * cd if config.n_rep > 1 else 0
    mask = 3 * s["the attention mask"] * cd if seqlen > 1 else 0
    mlp = 3 * s["the MLP activations"] * cd
    hidden = 8 * bsz * seqlen * max(config.dim, config.q_dim) * cd
    logits = s["the logits"] * (cd + 4)
    return scores + repeated_kv + mask + mlp + hidden + logits + bsz * seqlen * 8


def forward_memory(config: LlamaConfig, *, batch: int, n_tokens: int, n_cached: int = 0,
                   n_runs: Optional[int] = None, weight_dtype: torch.dtype = torch.float32,
                   compute_dtype: Optional[torch.dtype] = None, kv_cache: Optional[bool] = None,
                   kernel: str = "math") -> ForwardMemory:
    """What a model of ``config`` needs to run one forward of ``n_tokens`` new tokens per sequence after
    ``n_cached`` cached ones (``batch`` sequences, ``n_runs`` layer runs, default all layers).

    ``kv_cache`` (default: when ``n_cached > 0``) adds a cache for ``n_cached + n_tokens`` positions in the
    compute dtype, and the forward that prefilled it (``n_cached`` tokens) counts among the transients:
    the peak is the larger of the prefill and the step. ``compute_dtype`` defaults to the weight dtype.
    """
    compute_dtype = weight_dtype if compute_dtype is None else compute_dtype
    n_runs = config.n_layers if n_runs is None else n_runs
    kv_cache = n_cached > 0 if kv_cache is None else kv_cache
    end = n_cached + n_tokens
    rope_positions = min(config.max_seq_len, max(ROPE_EAGER_POSITIONS, 1 << max(end - 1, 0).bit_length()))
    weights = parameter_count(config) * weight_dtype.itemsize + rope_positions * (config.head_dim // 2) * 8
    cache = kv_cache_bytes(config, batch, end, n_runs, compute_dtype) if kv_cache else 0
    act = activation_bytes(config, bsz=batch, seqlen=n_tokens, start_pos=n_cached, compute_dtype=compute_dtype,
                           kernel=kernel)
    if kv_cache and n_cached > 0:
        act = max(act, activation_bytes(config, bsz=batch, seqlen=n_cached, compute_dtype=compute_dtype,
                                        kernel=kernel))
    return ForwardMemory(weights=weights, kv_cache=cache, activations=act)


def training_memory(config: LlamaConfig, *, batch: int, n_tokens: int, n_runs: Optional[int] = None,
                    weight_dtype: torch.dtype = torch.float32, compute_dtype: Optional[torch.dtype] = None,
                    kernel: str = "math", recompute: bool = False) -> ForwardMemory:
    """What one training step (forward + loss + backward of ``batch`` sequences of ``n_tokens``, every
    parameter trainable) needs: the weights, one gradient per parameter (in the weight dtype), the
    activations autograd keeps for the backward and the largest transients (an upper-ish estimate).

    Kept per layer run: the math kernel's scores and their softmax (fp32), the keys and values repeated
    over the query heads (GQA), four MLP-width tensors and about ten hidden-width ones; with activation
    checkpointing (``recompute``) only each layer run's input is kept, plus one layer's worth while it is
    recomputed. Kept once: the logits and their log-softmax and its gradient (fp32).
    """
    compute_dtype = weight_dtype if compute_dtype is None else compute_dtype
    n_runs = config.n_layers if n_runs is None else n_runs
    cd = compute_dtype.itemsize
    s = forward_tensor_sizes(config, batch, n_tokens)
    rows = batch * n_tokens
    per_run = ((2 * s["the attention scores"] * max(cd, 4) if kernel == "math" else 0)
               + (2 * s["the keys repeated over the query heads"] * cd if config.n_rep > 1 else 0)
               + 4 * s["the MLP activations"] * cd + 10 * rows * max(config.dim, config.q_dim) * cd)
    kept = n_runs * rows * config.dim * cd + per_run if recompute else n_runs * per_run
    logits = s["the logits"] * (cd + 4 + 4)
    act = kept + logits + activation_bytes(config, bsz=batch, seqlen=n_tokens, compute_dtype=compute_dtype,
                                           kernel=kernel)
    rope_positions = min(config.max_seq_len, max(ROPE_EAGER_POSITIONS, 1 << max(n_tokens - 1, 0).bit_length()))
    params = parameter_count(config) * weight_dtype.itemsize
    return ForwardMemory(weights=params + rope_positions * (config.head_dim // 2) * 8, kv_cache=0, activations=act,
                         gradients=params)


def format_bytes(n: int) -> str:
    """'122.07 GiB (131,072,000,000 bytes)': readable, and exact for tests and bug reports."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.2f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def check_memory(need_bytes: int, device: Union[str, torch.device], what: str, *, freeable_bytes: int = 0) -> None:
    """Raise :class:`InsufficientMemoryError` when ``need_bytes`` exceed what ``device`` has available.

    ``freeable_bytes``: memory the caller releases before allocating (e.g. the old KV cache it
    replaces), counted as available. Nothing is checked on the meta device or when the amount
    available cannot be determined.
    """
    device = torch.device(device)
    available = available_memory_bytes(device)
    if available is None:
        logger.debug("%s: available memory on %s unknown; not checked", what, device)
        return
    available += freeable_bytes
    if need_bytes > available:
        source = "torch.cuda.mem_get_info" if device.type == "cuda" else "MemAvailable in /proc/meminfo"
        raise InsufficientMemoryError(
            f"{what} needs about {format_bytes(need_bytes)} on {device}, but only {format_bytes(available)} "
            f"is available ({source}); nothing was allocated"
        )


__all__ = ["ForwardMemory", "TORCH_MAX_TENSOR_BYTES", "activation_bytes", "available_memory_bytes",
           "check_memory", "check_tensor_sizes", "format_bytes", "forward_memory", "forward_tensor_sizes",
           "kv_cache_bytes", "parameter_count", "training_memory", "weight_bytes", "weight_tensor_sizes"]
