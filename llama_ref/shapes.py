"""The shape algebra: every size, count and byte figure of a Llama that follows from its config, in one place.

The model's guards, the loaders, the counters (analytic, estimates, tensor parallel), the commands and the
studies all take these from here: the parameter count, the weight and KV-cache bytes and the largest tensors a
forward makes (against torch's size limit). The memory of a whole request (every activation, its peak) is
:mod:`llama_ref.memory_algebra`'s, which builds on these.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

import torch

from .config import LlamaConfig

#: RoPE positions a model's table covers when it is made (fewer if max_seq_len is smaller); more on demand.
ROPE_EAGER_POSITIONS = 4096
#: Bytes of one complex64 entry of the RoPE table (fp32 real + fp32 imaginary).
FREQS_CIS_ENTRY_BYTES = 8
#: The most bytes one tensor may span: torch computes a storage's size as ``numel * itemsize`` in 64-bit signed
#: arithmetic and refuses anything beyond, on every device, the meta device included.
TORCH_MAX_TENSOR_BYTES = 2**63 - 1


# ---------------------------------------------------------------------------- parameters and weights
def layer_param_count(config: LlamaConfig) -> int:
    """Weights of one decoder layer: wq, wk, wv, wo, w1, w3, w2 and its two norms."""
    c = config
    return (c.dim * c.q_dim + 2 * c.dim * c.kv_dim + c.q_dim * c.dim  # wq, wk, wv, wo
            + 3 * c.dim * c.hidden_dim  # w1, w3, w2
            + 2 * c.dim)  # attention_norm, ffn_norm


def param_count(config: LlamaConfig, tp: Optional[int] = None) -> int:
    """Exact number of distinct weights of ``Llama(config)``: the embedding, the output head unless it is tied
    to the embedding (then it is the same tensor), the layers and the final norm. With ``tp``: what one rank of
    a ``tp``-way tensor-parallel model holds (every split tensor's 1/tp, the norms whole)."""
    vocab_matrices = 1 if config.tie_word_embeddings else 2
    total = vocab_matrices * config.vocab_size * config.dim + config.n_layers * layer_param_count(config) + config.dim
    if tp is None:
        return total
    TPShares(config, tp)  # every divisibility problem
    norms = (2 * config.n_layers + 1) * config.dim
    return (total - norms) // tp + norms


def rope_positions_for(config: LlamaConfig, end: int = 0) -> int:
    """Positions the RoPE table covers once positions ``[0, end)`` are reserved: the eager size, grown to the
    next power of two, capped at ``max_seq_len`` (see ``Llama.reserve_positions``)."""
    grown = 1 << max(end - 1, 0).bit_length() if end > ROPE_EAGER_POSITIONS else 0
    return min(config.max_seq_len, max(ROPE_EAGER_POSITIONS, grown))


def rope_table_bytes(config: LlamaConfig, end: int = 0) -> int:
    return rope_positions_for(config, end) * (config.head_dim // 2) * FREQS_CIS_ENTRY_BYTES


def weight_bytes(config: LlamaConfig, dtype: torch.dtype) -> int:
    """Bytes of ``Llama(config, dtype=dtype)`` on a real device: the weights plus the RoPE table it is made with."""
    return param_count(config) * dtype.itemsize + rope_table_bytes(config)


def kv_cache_bytes(config: LlamaConfig, *, batch: int, n_positions: int, n_runs: Optional[int] = None,
                   kv_dtype_bytes: int, n_kv_heads: Optional[int] = None) -> int:
    """Bytes of the KV caches ``setup_cache`` allocates: keys and values, one cache per schedule run (default:
    every layer once), each (batch, n_positions, n_kv_heads, head_dim). ``n_kv_heads``: a tensor-parallel
    rank's share (default the model's)."""
    n_runs = config.n_layers if n_runs is None else n_runs
    n_kv_heads = config.n_kv_heads if n_kv_heads is None else n_kv_heads
    return 2 * batch * n_positions * n_kv_heads * config.head_dim * kv_dtype_bytes * n_runs


# ---------------------------------------------------------------------------- torch's size limit
def weight_tensor_sizes(config: LlamaConfig) -> dict[str, int]:
    """Elements of the largest weight tensor of each kind of ``Llama(config)``."""
    c = config
    return {"tok_embeddings.weight": c.vocab_size * c.dim, "output.weight": c.vocab_size * c.dim,
            "attention.wq.weight": c.q_dim * c.dim, "attention.wk.weight": c.kv_dim * c.dim,
            "feed_forward.w1.weight": c.hidden_dim * c.dim}


def forward_tensor_sizes(config: LlamaConfig, bsz: int, seqlen: int, start_pos: int = 0) -> dict[str, int]:
    """Elements of the largest tensors one forward of ``bsz`` sequences of ``seqlen`` new tokens after
    ``start_pos`` cached positions makes (whatever the device and the kernel)."""
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
    """``ValueError`` when one of ``sizes`` (elements) of ``itemsize`` bytes is beyond
    :data:`TORCH_MAX_TENSOR_BYTES`, which torch refuses with a ``RuntimeError`` from deep inside."""
    for name, elements in sizes.items():
        if elements * itemsize > TORCH_MAX_TENSOR_BYTES:
            raise ValueError(
                f"{what}: {name} would hold {elements:,} elements of {itemsize} bytes, beyond torch's limit of "
                f"2**63 - 1 bytes for one tensor (on every device, meta included)")


# ---------------------------------------------------------------------------- one tensor-parallel rank
def check_world_size(world_size: object) -> int:
    """``world_size`` as an int >= 1, or a ``ValueError`` naming it."""
    if isinstance(world_size, bool) or not isinstance(world_size, numbers.Integral):
        raise ValueError(f"tensor-parallel world size must be an int, got {world_size!r}")
    if world_size <= 0:
        raise ValueError(f"tensor-parallel world size must be at least 1, got {world_size}")
    return int(world_size)


@dataclass(frozen=True)
class TPShares:
    """One rank's sizes of a model split ``world_size`` ways in Meta's tensor-parallel layout (query heads, kv
    heads, FFN width, output-head vocabulary and embedding columns divided by ``world_size``; ``dim`` whole);
    every problem refused on construction. Properties, never stored: e.g. ``TPShares(cfg, 8).n_heads``."""

    config: LlamaConfig
    world_size: int

    def __post_init__(self) -> None:
        n = check_world_size(self.world_size)
        c = self.config
        if getattr(c, "tie_word_embeddings", False):
            raise ValueError(
                f"{c.name}: tied embeddings (tie_word_embeddings=True) cannot be tensor-parallel in Meta's layout: "
                "the embedding is split on the model dimension and the output head on the vocabulary, so one "
                "tensor cannot be both; untie them (give output.weight its own copy of the embedding) to run it"
            )
        if n > c.n_heads:
            raise ValueError(
                f"cannot split {c.name} across {n} tensor-parallel ranks: more ranks than attention heads "
                f"(n_heads={c.n_heads}); every rank needs whole heads"
            )
        problems = []
        if c.n_heads % n:
            problems.append(f"n_heads={c.n_heads} (query heads)")
        if c.n_kv_heads % n:
            problems.append(f"n_kv_heads={c.n_kv_heads} (key/value heads; replicating kv heads on several ranks "
                            "is not supported)")
        if c.hidden_dim % n:
            problems.append(f"hidden_dim={c.hidden_dim} (FFN width)")
        if c.vocab_size % n:
            problems.append(f"vocab_size={c.vocab_size} (output head rows; no vocabulary padding)")
        if c.dim % n:
            problems.append(f"dim={c.dim} (embedding width)")
        if problems:
            raise ValueError(
                f"cannot split {c.name} across {n} tensor-parallel ranks: {'; '.join(problems)} "
                f"{'is' if len(problems) == 1 else 'are'} not divisible by {n}. Meta's layout gives every rank "
                "an equal share of each; choose a world size that divides all of them"
            )

    # ------------------------------------------------------------------ what one rank holds
    @property
    def n_heads(self) -> int:
        """Query heads per rank."""
        return self.config.n_heads // self.world_size

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads per rank."""
        return self.config.n_kv_heads // self.world_size

    @property
    def hidden_dim(self) -> int:
        """FFN width per rank (rows of w1/w3, columns of w2)."""
        return self.config.hidden_dim // self.world_size

    @property
    def vocab_size(self) -> int:
        """Output-head rows (logits) per rank."""
        return self.config.vocab_size // self.world_size

    @property
    def embed_dim(self) -> int:
        """Embedding columns per rank (the embedding is split on the model dimension)."""
        return self.config.dim // self.world_size


__all__ = ["FREQS_CIS_ENTRY_BYTES", "TPShares", "check_world_size", "ROPE_EAGER_POSITIONS", "TORCH_MAX_TENSOR_BYTES",
           "check_tensor_sizes", "forward_tensor_sizes", "kv_cache_bytes", "layer_param_count", "param_count",
           "rope_positions_for", "rope_table_bytes", "weight_bytes", "weight_tensor_sizes"]
