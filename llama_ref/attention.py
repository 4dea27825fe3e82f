"""Grouped-query attention with a KV cache and two interchangeable kernels."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import LlamaConfig
from .layers import Linear
from .rope import RotaryEmbedding

ATTENTION_KERNELS = ("math", "sdpa")


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``torch.repeat_interleave(x, dim=2, repeats=n_rep)``: (bsz, seqlen, n_kv_heads, head_dim) ->
    (bsz, seqlen, n_kv_heads * n_rep, head_dim). Query heads g*n_rep .. g*n_rep+n_rep-1 share kv head g."""
    if n_rep == 1:
        return x
    bsz, seqlen, n_kv_heads, head_dim = x.shape
    return (
        x[:, :, :, None, :]
        .expand(bsz, seqlen, n_kv_heads, n_rep, head_dim)
        .reshape(bsz, seqlen, n_kv_heads * n_rep, head_dim)
    )


class KVCache(nn.Module):
    """Keys and values of one attention *run*, in Meta's layout (bsz, max_seq_len, n_kv_heads, head_dim)."""

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 device=None, dtype=torch.float32) -> None:
        super().__init__()
        shape = (max_batch_size, max_seq_len, n_kv_heads, head_dim)
        # Not persistent: a cache is runtime state, never part of a checkpoint.
        self.register_buffer("cache_k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("cache_v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    @property
    def max_batch_size(self) -> int:
        return self.cache_k.shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.cache_k.shape[1]

    def update(self, start_pos: int, xk: torch.Tensor, xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (bsz, seqlen, n_kv_heads, head_dim) at ``start_pos`` and return everything up to it:
        (bsz, start_pos + seqlen, n_kv_heads, head_dim) each."""
        bsz, seqlen = xk.shape[:2]
        self.cache_k[:bsz, start_pos : start_pos + seqlen] = xk.to(self.cache_k.dtype)
        self.cache_v[:bsz, start_pos : start_pos + seqlen] = xv.to(self.cache_v.dtype)
        return self.cache_k[:bsz, : start_pos + seqlen], self.cache_v[:bsz, : start_pos + seqlen]


class AttentionCore(nn.Module):
    """softmax(q k^T / sqrt(head_dim) + mask) v over the heads, with GQA by ``repeat_kv``.

    ``kernel="math"`` spells out matmul-softmax-matmul (the reference: every op visible to hooks,
    fvcore and FlopCounterMode); ``kernel="sdpa"`` calls ``F.scaled_dot_product_attention``.
    Both compute the same dense ``seqlen x (start_pos + seqlen)`` score matrix.
    """

    def __init__(self, n_rep: int, kernel: str = "math") -> None:
        super().__init__()
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(f"unknown attention kernel {kernel!r}; choose one of {ATTENTION_KERNELS}")
        self.n_rep = n_rep
        self.kernel = kernel

    def forward(self, xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: Optional[torch.Tensor]) -> torch.Tensor:
        bsz, seqlen, n_heads, head_dim = xq.shape
        keys = repeat_kv(keys, self.n_rep)  # (bsz, kvlen, n_heads, head_dim)
        values = repeat_kv(values, self.n_rep)  # (bsz, kvlen, n_heads, head_dim)
        q = xq.transpose(1, 2)  # (bsz, n_heads, seqlen, head_dim)
        k = keys.transpose(1, 2)  # (bsz, n_heads, kvlen, head_dim)
        v = values.transpose(1, 2)  # (bsz, n_heads, kvlen, head_dim)
        if self.kernel == "math":
            scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(head_dim)  # (bsz, n_heads, seqlen, kvlen)
            if mask is not None:
                scores = scores + mask  # (seqlen, kvlen) broadcast
            # Softmax in fp32: exp of bf16 logits loses the small differences that matter.
            scores = F.softmax(scores.float(), dim=-1).type_as(q)
            output = torch.matmul(scores, v)  # (bsz, n_heads, seqlen, head_dim)
        else:
            if mask is not None and mask.shape[-1] == seqlen:
                # No cached prefix: the mask is plain causal, which the fused kernels handle natively.
                output = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                output = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (bsz, n_heads, seqlen, head_dim)
        return output.transpose(1, 2).reshape(bsz, seqlen, n_heads * head_dim)  # (bsz, seqlen, dim)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, kernel: str = "math", device=None, dtype=None) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.n_rep = config.n_rep
        self.head_dim = config.head_dim
        self.wq = Linear(config.dim, config.n_heads * config.head_dim, device=device, dtype=dtype)
        self.wk = Linear(config.dim, config.kv_dim, device=device, dtype=dtype)
        self.wv = Linear(config.dim, config.kv_dim, device=device, dtype=dtype)
        self.wo = Linear(config.n_heads * config.head_dim, config.dim, device=device, dtype=dtype)
        self.rope = RotaryEmbedding()
        self.core = AttentionCore(config.n_rep, kernel)

    def forward(self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor,
                mask: Optional[torch.Tensor], cache: Optional[KVCache] = None) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)  # (bsz, seqlen, n_heads, head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)  # (bsz, seqlen, n_kv_heads, head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)  # (bsz, seqlen, n_kv_heads, head_dim)
        xq, xk = self.rope(xq, xk, freqs_cis)
        if cache is not None:
            keys, values = cache.update(start_pos, xk, xv)  # (bsz, start_pos + seqlen, n_kv_heads, head_dim)
            keys, values = keys.to(xq.dtype), values.to(xq.dtype)
        else:
            keys, values = xk, xv
        return self.wo(self.core(xq, keys, values, mask))  # (bsz, seqlen, dim)
