"""Rotary position embedding by complex multiplication, as in Meta's reference code.

Channels are rotated in *interleaved* pairs (0,1), (2,3), ...: each pair is one complex number
that is multiplied by ``e^{i * pos * inv_freq_k}``. (HF checkpoints permute q/k weights so that HF's
rotate-half code sees the same rotation; the loaders undo that permutation, this file never changes.)

RoPE scaling (Llama 3.1's ``llama3``, ``linear``) changes only the frequencies ``inv_freq``; the
rotation itself is the same complex multiply.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .rope_scaling import RopeScaling

# RoPE positions a model's table covers when it is made (fewer if max_seq_len is smaller); more on demand.
ROPE_EAGER_POSITIONS = 4096


def rope_inv_freq(head_dim: int, theta: float = 10000.0, scaling: Optional[RopeScaling] = None,
                  device=None) -> torch.Tensor:
    """``theta^(-2k/head_dim)`` for k < head_dim/2, then scaled: ``(head_dim // 2,)`` fp32."""
    # fp32 exactly like Meta's code (and transformers'); the frequency spectrum is what RoPE is defined by.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    return inv_freq if scaling is None else scaled_inv_freq(inv_freq, scaling)


def scaled_inv_freq(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Apply ``scaling`` to fp32 frequencies, op for op as transformers' ``_compute_llama3_parameters``
    / ``_compute_linear_scaling_rope_parameters`` (and Meta's ``apply_scaling``), so tables agree bit for bit."""
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor  # same as dividing every position by factor
    if scaling.rope_type != "llama3":
        raise ValueError(f"unsupported rope_type {scaling.rope_type!r}")
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_context_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context_len / low  # longer wavelengths than this: interpolate (divide by factor)
    high_freq_wavelen = old_context_len / high  # shorter: keep (many full turns within the trained context)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    # Between the two: blend smoothly from "divide by factor" to "keep".
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def precompute_freqs_cis(head_dim: int, end: int, theta: float = 10000.0, device=None, *,
                         scaling: Optional[RopeScaling] = None) -> torch.Tensor:
    """Unit complex numbers ``e^{i * t * inv_freq}`` for t < end: ``(end, head_dim // 2)`` complex64.

    Every entry depends only on its own position, so a table for ``end`` positions is, row for row,
    bit-identical to the first ``end`` rows of a longer one (which is what lets the model grow it).
    """
    freqs = rope_inv_freq(head_dim, theta, scaling, device=device)  # (head_dim // 2,)
    t = torch.arange(end, device=device, dtype=torch.float32)
    freqs = torch.outer(t, freqs)  # (end, head_dim // 2)
    return torch.polar(torch.ones_like(freqs), freqs)  # complex64, |z| = 1


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k. ``xq``: (bsz, seqlen, n_heads, head_dim), ``xk``: (bsz, seqlen, n_kv_heads, head_dim),
    ``freqs_cis``: (seqlen, head_dim // 2). Computed in fp32 whatever the input dtype, then cast back."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))  # (bsz, seqlen, n_heads, head_dim//2)
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))  # (bsz, seqlen, n_kv_heads, head_dim//2)
    freqs = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])  # (1, seqlen, 1, head_dim//2): broadcast over batch, heads
    xq_out = torch.view_as_real(xq_ * freqs).flatten(3)  # (bsz, seqlen, n_heads, head_dim)
    xk_out = torch.view_as_real(xk_ * freqs).flatten(3)  # (bsz, seqlen, n_kv_heads, head_dim)
    return xq_out.type_as(xq), xk_out.type_as(xk)


class RotaryEmbedding(nn.Module):
    """Parameter-free wrapper around :func:`apply_rotary_emb`.

    It exists so that forward hooks (and fvcore's module scopes) see RoPE as a module of its own
    and its complex multiplies are attributed to it rather than vanishing into ``Attention``.
    """

    def forward(self, xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary_emb(xq, xk, freqs_cis)
