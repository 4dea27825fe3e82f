"""One decoder layer: pre-norm attention and pre-norm SwiGLU, each with a residual add."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .attention import Attention, KVCache
from .config import LlamaConfig
from .layers import FeedForward, RMSNorm


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, config: LlamaConfig, kernel: str = "math", device=None, dtype=None) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(config, kernel, device=device, dtype=dtype)
        self.feed_forward = FeedForward(config.dim, config.hidden_dim, device=device, dtype=dtype)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps, device=device, dtype=dtype)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor,
                mask: Optional[torch.Tensor], cache: Optional[KVCache] = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start_pos, freqs_cis, mask, cache)  # (bsz, seqlen, dim)
        return h + self.feed_forward(self.ffn_norm(h))  # (bsz, seqlen, dim)
