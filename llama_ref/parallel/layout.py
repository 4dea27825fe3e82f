"""Meta's tensor-parallel layout: which dimension of each weight is split across ranks, and what one
rank holds.

It is the layout of Meta's own ``consolidated.NN.pth`` shards (fairscale model parallelism):

* column-parallel (output features split, dim 0): ``wq, wk, wv, w1, w3, output``;
* row-parallel (input features split, dim 1): ``wo, w2``; each rank's partial sums are all-reduced;
* the embedding split on the model dimension (dim 1): each rank looks up its slice of every vector;
* RMSNorm weights replicated.

Rank ``r`` of ``N`` holds the ``r``-th of ``N`` equal contiguous chunks along the split dimension.
Query heads ``g*n_rep .. g*n_rep + n_rep - 1`` share kv head ``g`` (see ``repeat_kv``), so chunk ``r`` of
the query heads needs exactly chunk ``r`` of the kv heads: grouped-query attention splits cleanly as long
as both head counts are divisible by ``N``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from ..loading.meta_files import meta_split_dim
from ..shapes import TPShares, check_world_size  # noqa: F401  (re-exported)


def tp_split_dim(name: str) -> Optional[int]:
    """Dimension parameter ``name`` is split on across tensor-parallel ranks; ``None`` when replicated."""
    return meta_split_dim(name)


@dataclass(frozen=True)
class TPLayout(TPShares):
    """One model split ``world_size`` ways in Meta's layout (validated, and one rank's sizes, by
    :class:`llama_ref.shapes.TPShares`), and what that means for each weight tensor.
    """

    # ------------------------------------------------------------------ tensors
    def local_shape(self, name: str, full_shape: Sequence[int]) -> tuple[int, ...]:
        shape = list(full_shape)
        dim = tp_split_dim(name)
        if dim is not None:
            shape[dim] //= self.world_size
        return tuple(shape)

    def full_shape(self, name: str, local_shape: Sequence[int]) -> tuple[int, ...]:
        shape = list(local_shape)
        dim = tp_split_dim(name)
        if dim is not None:
            shape[dim] *= self.world_size
        return tuple(shape)

    def shard(self, name: str, tensor: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank ``rank``'s part of the full tensor ``name`` (a view; the tensor itself if replicated)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a tensor-parallel world of size {self.world_size}")
        dim = tp_split_dim(name)
        if dim is None:
            return tensor
        size = tensor.shape[dim]
        if size % self.world_size:
            raise ValueError(f"{name} of shape {tuple(tensor.shape)} cannot be split {self.world_size} ways on dim {dim}")
        chunk = size // self.world_size
        return tensor.narrow(dim, rank * chunk, chunk)

    def shard_state_dict(self, state_dict: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
        """Rank ``rank``'s state dict from a full (single-process, Meta-layout) one; every tensor a fresh copy."""
        return {name: self.shard(name, t, rank).clone() for name, t in state_dict.items()}
