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

import numbers
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from ..config import LlamaConfig
from ..loading.meta_files import meta_split_dim


def tp_split_dim(name: str) -> Optional[int]:
    """Dimension parameter ``name`` is split on across tensor-parallel ranks; ``None`` when replicated."""
    return meta_split_dim(name)


def check_world_size(world_size: object) -> int:
    """``world_size`` as an int >= 1, or a ``ValueError`` naming it."""
    if isinstance(world_size, bool) or not isinstance(world_size, numbers.Integral):
        raise ValueError(f"tensor-parallel world size must be an int, got {world_size!r}")
    if world_size <= 0:
        raise ValueError(f"tensor-parallel world size must be at least 1, got {world_size}")
    return int(world_size)


@dataclass(frozen=True)
class TPLayout:
    """One model split ``world_size`` ways in Meta's layout; validated on construction.

    The per-rank sizes are properties (derived, never stored), e.g. ``TPLayout(cfg, 8).n_heads``.
    """

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
