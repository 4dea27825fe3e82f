"""Meta layout: ``params.json`` plus ``consolidated.00.pth`` ... ``consolidated.NN.pth``.

13B ships as 2 and 70B as 8 model-parallel (fairscale) shards. Each weight was split along the
dimension its parallel layer partitions, and is concatenated back along it:

* ColumnParallelLinear (output features split): ``wq, wk, wv, w1, w3, output`` -> dim 0
* RowParallelLinear (input features split): ``wo, w2`` -> dim 1
* ParallelEmbedding (embedding dim split): ``tok_embeddings`` -> dim 1
* RMSNorm weights are replicated in every shard.
"""

from __future__ import annotations

import os
from typing import Optional

from ..config import LlamaConfig
from .detect import CheckpointFiles
from .errors import CheckpointError, fmt_shape
from .plan import PlannedTensor
from .readers import OpenFiles, StoredTensor

# Tensors Meta's checkpoints carry that the model does not load: the RoPE frequencies of
# LLaMA-1-era code, recomputed from the config here.
META_KNOWN_EXTRAS = ("rope.freqs",)
_SPLIT_DIMS = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def meta_split_dim(name: str) -> Optional[int]:
    """Dimension a Meta weight is split on across model-parallel shards; ``None`` when replicated."""
    parts = name.split(".")
    leaf = parts[-2] if len(parts) >= 2 and parts[-1] == "weight" else name
    return _SPLIT_DIMS.get(leaf)


def read_meta_config(files: CheckpointFiles, opener: OpenFiles) -> LlamaConfig:
    """``params.json`` says ``"vocab_size": -1``; the vocabulary is the embedding's row count."""
    first = files.shards[0]
    tensors = opener.describe(first)
    emb = tensors.get("tok_embeddings.weight")
    if emb is None or len(emb.shape) != 2:
        raise CheckpointError(f"{first}: no 2-D tensor 'tok_embeddings.weight', cannot tell the vocabulary size")
    return LlamaConfig.from_meta(files.config, vocab_size=emb.shape[0])


def plan_meta(files: CheckpointFiles, opener: OpenFiles) -> tuple[list[PlannedTensor], list[str]]:
    shard_tensors = [opener.describe(s) for s in files.shards]
    names = list(dict.fromkeys(n for tensors in shard_tensors for n in tensors))  # shard 0's order first
    plan, problems = [], []
    for name in names:
        if name in META_KNOWN_EXTRAS:
            continue
        parts = [tensors.get(name) for tensors in shard_tensors]
        absent = [os.path.basename(f) for f, p in zip(files.shards, parts) if p is None]
        if absent:
            present = next(p.file for p in parts if p is not None)
            problems.append(f"tensor {name!r} is in {os.path.basename(present)} but missing from {', '.join(absent)}")
            continue
        merged = _merge(name, parts, problems)
        if merged is not None:
            plan.append(merged)
    return plan, problems


def _merge(name: str, parts: list[StoredTensor], problems: list[str]) -> Optional[PlannedTensor]:
    """The planned full tensor, or ``None`` after appending why the shards cannot be merged."""
    if len(parts) == 1:
        return PlannedTensor(name, parts[0].shape, tuple(parts))
    listing = ", ".join(f"{os.path.basename(p.file)} {fmt_shape(p.shape)} {p.dtype}" for p in parts)
    if len({p.dtype for p in parts}) > 1 or len({len(p.shape) for p in parts}) > 1:
        problems.append(f"tensor {name!r}: shards disagree in dtype or rank: {listing}")
        return None
    dim = meta_split_dim(name)
    if dim is None or dim >= len(parts[0].shape):
        # Replicated (norms) -- or a name we do not know, which check_plan reports as unexpected.
        if len({p.shape for p in parts}) > 1:
            problems.append(f"replicated tensor {name!r} differs in shape between shards: {listing}")
            return None
        return PlannedTensor(name, parts[0].shape, tuple(parts))
    others = {p.shape[:dim] + p.shape[dim + 1:] for p in parts}
    if len(others) > 1:
        problems.append(f"tensor {name!r} (split on dim {dim}) differs in its other dims between shards: {listing}")
        return None
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    return PlannedTensor(name, tuple(shape), tuple(parts), split_dim=dim)


def missing_shard_hint(plan: list[PlannedTensor], expected: dict[str, tuple[int, ...]], n_shards: int) -> Optional[str]:
    """If every split weight is exactly 1/k of its expected size along its split dim, say so: the
    last shards of a model-parallel checkpoint are missing (a hole in the numbering is caught earlier)."""
    ratios = set()
    for p in plan:
        dim = meta_split_dim(p.name)
        want = expected.get(p.name)
        if dim is None or want is None or len(want) != len(p.shape) or dim >= len(want):
            continue
        if p.shape[dim] == 0 or want[dim] % p.shape[dim]:
            return None
        ratios.add(want[dim] // p.shape[dim])
    if len(ratios) != 1:
        return None
    k = ratios.pop()
    if k == 1:
        return None
    total = k * n_shards
    return (f"every split weight is 1/{k} of its expected size: this looks like a {total}-shard checkpoint "
            f"with only {n_shards} shard(s) present (consolidated.{n_shards:02d}.pth ... "
            f"consolidated.{total - 1:02d}.pth missing?)")
