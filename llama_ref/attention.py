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


def _ints(*values) -> tuple[int, ...]:
    """Python ints. Under ``torch.jit.trace`` (fvcore's counter) sizes read off ``tensor.shape`` are 0-dim
    tensors; stored as fill marks they would turn every later check into tensor ops (``aten.gt``...)
    in the counted forwards that follow. ``int`` adds no node to the traced graph."""
    return tuple(int(v) for v in values)


class KVCache(nn.Module):
    """Keys and values of one attention *run*, in Meta's layout (bsz, max_seq_len, n_kv_heads, head_dim).

    The cache also knows how far it is filled, per batch row, in plain Python ints (no tensor work,
    so it works on the meta device and adds nothing to a counted forward). A write must start at or
    before the fill mark of every row it covers: starting beyond it would attend to positions never
    written (zeros, or another sequence's stale keys). Writing at ``start_pos < filled`` is allowed
    (re-running a step, chunked prefill) and sets the mark of rows ``[:bsz]`` to ``start_pos + seqlen``:
    whatever lies beyond is stale from then on.
    """

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 device=None, dtype=torch.float32) -> None:
        super().__init__()
        for name, value in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len),
                            ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVCache {name} must be a positive int, got {value!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"KVCache dtype must be a floating-point torch.dtype, got {dtype!r}")
        shape = (max_batch_size, max_seq_len, n_kv_heads, head_dim)
        # Not persistent: a cache is runtime state, never part of a checkpoint.
        self.register_buffer("cache_k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("cache_v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        # Fill marks, run-length encoded over rows: [(row_end, filled), ...] with increasing row_end
        # means rows [previous row_end, row_end) hold positions [0, filled). Writes always cover rows
        # [:bsz], so there are at most as many segments as distinct batch sizes used (never one
        # entry per row: max_batch_size may be huge on the meta device).
        self._fill: list[tuple[int, int]] = [(max_batch_size, 0)]

    @property
    def max_batch_size(self) -> int:
        return self.cache_k.shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.cache_k.shape[1]

    @property
    def fill_marks(self) -> tuple[tuple[int, int], ...]:
        """``((row_end, filled), ...)``: rows ``[previous row_end, row_end)`` hold positions ``[0, filled)``."""
        return tuple(self._fill)

    def filled_len(self, bsz: Optional[int] = None) -> int:
        """How many leading positions are written for *every* row of ``[:bsz]`` (default: all rows)."""
        bsz = self.max_batch_size if bsz is None else bsz
        filled = self._fill[0][1]
        for row_end, mark in self._fill:
            filled = min(filled, mark)
            if row_end >= bsz:
                break
        return filled

    def reset(self) -> None:
        """Forget the contents (no tensor work: positions past the fill mark are never read)."""
        self._fill = [(self.max_batch_size, 0)]

    def check_write(self, start_pos: int, bsz: int, seqlen: int) -> None:
        """Raise ``ValueError`` unless rows ``[:bsz]``, positions ``[start_pos, start_pos + seqlen)`` can
        be written and everything before ``start_pos`` has been."""
        start_pos, bsz, seqlen = _ints(start_pos, bsz, seqlen)
        if bsz > self.max_batch_size:
            raise ValueError(f"batch size {bsz} exceeds the cache's max_batch_size={self.max_batch_size}")
        end = start_pos + seqlen
        if end > self.max_seq_len:
            raise ValueError(f"sequence end {end} exceeds the cache's max_seq_len={self.max_seq_len}")
        filled = self.filled_len(bsz)
        if start_pos > filled:
            rows = "row 0 holds" if bsz == 1 else f"rows 0-{bsz - 1} hold"
            raise ValueError(
                f"start_pos={start_pos} is beyond the filled part of the KV cache: {rows} positions "
                f"[0, {filled}) only (filled up to {filled}), so positions {filled}..{start_pos - 1} were never "
                f"written; continue from start_pos <= {filled}, or prefill from 0"
            )

    def mark_written(self, start_pos: int, bsz: int, seqlen: int) -> None:
        """Record that rows ``[:bsz]`` now hold positions ``[0, start_pos + seqlen)`` (nothing beyond)."""
        start_pos, bsz, seqlen = _ints(start_pos, bsz, seqlen)
        self._fill = [(bsz, start_pos + seqlen)] + [seg for seg in self._fill if seg[0] > bsz]

    def update(self, start_pos: int, xk: torch.Tensor, xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (bsz, seqlen, n_kv_heads, head_dim) at ``start_pos`` and return everything up to it:
        (bsz, start_pos + seqlen, n_kv_heads, head_dim) each."""
        bsz, seqlen = xk.shape[:2]
        self.check_write(start_pos, bsz, seqlen)
        self.cache_k[:bsz, start_pos : start_pos + seqlen] = xk.to(self.cache_k.dtype)
        self.cache_v[:bsz, start_pos : start_pos + seqlen] = xv.to(self.cache_v.dtype)
        self.mark_written(start_pos, bsz, seqlen)
        return self.cache_k[:bsz, : start_pos + seqlen], self.cache_v[:bsz, : start_pos + seqlen]

    def extra_repr(self) -> str:
        return (f"max_batch_size={self.max_batch_size}, max_seq_len={self.max_seq_len}, "
                f"filled={self.filled_len()}")


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
