"""Parallel linear layers and embedding (Meta's fairscale layout): each holds one rank's slice of the full
weight, under the full weight's name, and does its collective in ``forward``. :func:`llama_ref.parallel.parallelize`
swaps them in for a built model's projections (``shard``: this rank's slice of an existing layer)."""

from __future__ import annotations

import torch
from torch import nn

from ..model import Linear
from .collectives import TPGroup, copy_to_tensor_parallel, gather_from_tensor_parallel, reduce_from_tensor_parallel


def _split(features: int, group: TPGroup, what: str) -> int:
    if features % group.world_size:
        raise ValueError(f"{what}={features} is not divisible by the tensor-parallel world size {group.world_size}")
    return features // group.world_size


def _take_slice(module: nn.Module, full: torch.Tensor, dim: int, group: TPGroup) -> nn.Module:
    """Give ``module`` this rank's chunk of ``full`` along ``dim``, as a copy (the full tensor can be freed)."""
    chunk = full.shape[dim] // group.world_size
    with torch.no_grad():
        piece = full.detach().narrow(dim, group.rank * chunk, chunk).clone()
    module.weight = nn.Parameter(piece, requires_grad=full.requires_grad)
    return module


class ColumnParallelLinear(Linear):
    """``Linear`` with the output features split: rank r holds rows [r*k, (r+1)*k) of the full
    (out_features, in_features) weight, k = out_features / world_size.

    ``gather_output=False`` (wq, wk, wv, w1, w3) leaves the output split, for the next layer to consume;
    ``gather_output=True`` (the output head) all-gathers it.
    """

    def __init__(self, in_features: int, out_features: int, group: TPGroup, *, gather_output: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, _split(out_features, group, "out_features"), device=device, dtype=dtype)
        self.group = group
        self.gather_output = gather_output

    @classmethod
    def shard(cls, linear: nn.Linear, group: TPGroup, *, gather_output: bool = False) -> "ColumnParallelLinear":
        w = linear.weight
        new = cls(w.shape[1], w.shape[0], group, gather_output=gather_output, device="meta", dtype=w.dtype)
        return _take_slice(new, w, 0, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(copy_to_tensor_parallel(x, self.group))  # (..., out_features / world_size)
        return gather_from_tensor_parallel(y, self.group) if self.gather_output else y  # (..., out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, world_size={self.group.world_size}, gather_output={self.gather_output}"


class RowParallelLinear(Linear):
    """``Linear`` with the input features split: rank r holds columns [r*k, (r+1)*k) of the full weight and
    takes the matching slice of the input (the split output of a column-parallel layer). The partial
    products are summed over the ranks with an all-reduce."""

    def __init__(self, in_features: int, out_features: int, group: TPGroup, *, device=None, dtype=None) -> None:
        super().__init__(_split(in_features, group, "in_features"), out_features, device=device, dtype=dtype)
        self.group = group

    @classmethod
    def shard(cls, linear: nn.Linear, group: TPGroup) -> "RowParallelLinear":
        w = linear.weight
        return _take_slice(cls(w.shape[1], w.shape[0], group, device="meta", dtype=w.dtype), w, 1, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = super().forward(x)  # (..., in_features / world_size) -> (..., out_features), this rank's share
        return reduce_from_tensor_parallel(partial, self.group)  # (..., out_features), summed over ranks

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, world_size={self.group.world_size}"


class ParallelEmbedding(nn.Embedding):
    """Embedding split on the model dimension: rank r holds columns [r*k, (r+1)*k) of every vector
    (k = dim / world_size); the looked-up slices are all-gathered to full vectors."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group: TPGroup, *, device=None, dtype=None) -> None:
        super().__init__(num_embeddings, _split(embedding_dim, group, "embedding_dim"), device=device, dtype=dtype)
        self.group = group

    @classmethod
    def shard(cls, embedding: nn.Embedding, group: TPGroup) -> "ParallelEmbedding":
        w = embedding.weight
        return _take_slice(cls(w.shape[0], w.shape[1], group, device="meta", dtype=w.dtype), w, 1, group)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = super().forward(tokens)  # (bsz, seqlen, dim / world_size)
        return gather_from_tensor_parallel(local, self.group)  # (bsz, seqlen, dim)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, world_size={self.group.world_size}"
