"""Small building blocks: a dtype-following Linear, RMSNorm and the SwiGLU gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """``nn.Linear`` without bias whose weight is cast to the activation dtype on the fly.

    This is how bf16-stored weights are used with fp32 compute on CPU (where bf16 matmuls are
    hundreds of times slower) without keeping a second fp32 copy of the whole model: only one
    weight at a time is upcast. When dtypes already match ``.to`` is a no-op.
    """

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))  # (..., in) @ (out, in)^T -> (..., out)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back (as Meta's and HF's code do)."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # A sum of squares over 4096+ channels loses precision in bf16, hence the fp32 upcast.
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self._norm(x.float()).type_as(x)
        return output * self.weight.to(x.dtype)


class GatedSiLU(nn.Module):
    """The SwiGLU gate ``silu(gate) * up``: a module so hooks see its elementwise work."""

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up


class FeedForward(nn.Module):
    """SwiGLU MLP: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden_dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.w1 = Linear(dim, hidden_dim, device=device, dtype=dtype)  # gate (HF gate_proj)
        self.w2 = Linear(hidden_dim, dim, device=device, dtype=dtype)  # down (HF down_proj)
        self.w3 = Linear(dim, hidden_dim, device=device, dtype=dtype)  # up   (HF up_proj)
        self.act = GatedSiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x), self.w3(x)))  # (bsz, seqlen, dim) -> (.., hidden_dim) -> (.., dim)
