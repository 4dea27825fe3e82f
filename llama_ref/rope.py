"""Rotary position embedding by complex multiplication, as in Meta's reference code.

Channels are rotated in *interleaved* pairs (0,1), (2,3), ...: each pair is one complex number
that is multiplied by ``e^{i * pos * theta_k}``. (HF checkpoints permute q/k weights so that HF's
rotate-half code sees the same rotation; the loaders undo that permutation, this file never changes.)
"""

from __future__ import annotations

import torch
from torch import nn


def precompute_freqs_cis(head_dim: int, end: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """Unit complex numbers ``e^{i * t * theta^(-2k/head_dim)}`` for t < end: ``(end, head_dim // 2)`` complex64."""
    # fp32 exactly like Meta's code; the frequency spectrum is what RoPE is defined by.
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
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
