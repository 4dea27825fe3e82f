"""Meta layout: ``params.json`` plus ``consolidated.00.pth`` ... ``consolidated.NN.pth``.

13B ships as 2 and 70B as 8 model-parallel (fairscale) shards. Each weight was split along the
dimension its parallel layer partitions, and is concatenated back along it:

* ColumnParallelLinear (output features split): ``wq, wk, wv, w1, w3, output`` -> dim 0
* RowParallelLinear (input features split): ``wo, w2`` -> dim 1
* ParallelEmbedding (embedding dim split, Llama-2): ``tok_embeddings`` -> dim 1; Llama-3's
  VocabParallelEmbedding splits the vocabulary instead -> dim 0 (told apart by the shard's width)
* RMSNorm weights are replicated in every shard.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from ..config import LlamaConfig
from ..config_files import read_json
from .detect import CheckpointFiles
from .errors import CheckpointError, fmt_shape
from .plan import PlannedTensor
from .readers import OpenFiles, StoredTensor

logger = logging.getLogger(__name__)

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
    """The config from ``params.json`` plus what only the weights tell.

    * The vocabulary: ``params.json`` says ``"vocab_size": -1`` for Llama-2, so it is the
      embedding's row count (summed over shards when the embedding is split by vocabulary rows).
    * Tied embeddings: Meta's files have no flag, and Meta's model code always has a separate
      ``output``; a checkpoint without ``output.weight`` in any shard is read as tied (the head is
      the embedding), one with it as untied.
    """
    params, source = read_json(files.config, "params.json")
    shard_tensors = [opener.describe(s) for s in files.shards]
    first = files.shards[0]
    emb = shard_tensors[0].get(_EMBEDDING)
    if emb is None or len(emb.shape) != 2:
        raise CheckpointError(f"{first}: no 2-D tensor {_EMBEDDING!r}, cannot tell the vocabulary size")
    vocab = emb.shape[0]
    if _embedding_split_dim(emb.shape, params.get("dim"), len(files.shards)) == 0:
        vocab = sum(t[_EMBEDDING].shape[0] for t in shard_tensors if _EMBEDDING in t)
    tied = not any(_HEAD in t for t in shard_tensors)
    if tied:
        logger.info("%s: no %r in %s: reading the head as tied to the embedding", files.root, _HEAD,
                    ", ".join(os.path.basename(s) for s in files.shards))
    return LlamaConfig.from_meta(params, source=source, vocab_size=vocab, tie_word_embeddings=tied)


_EMBEDDING, _HEAD = "tok_embeddings.weight", "output.weight"


def _embedding_split_dim(shard_shape: tuple[int, ...], model_dim, n_shards: int) -> Optional[int]:
    """Llama-2's ParallelEmbedding splits the embedding width (dim 1); Llama-3's VocabParallelEmbedding
    splits the vocabulary (dim 0). A shard holding the full width was split by vocabulary."""
    if n_shards == 1:
        return None
    if isinstance(model_dim, int) and not isinstance(model_dim, bool) and shard_shape[1] == model_dim:
        return 0
    return 1


def plan_meta(files: CheckpointFiles, opener: OpenFiles) -> tuple[list[PlannedTensor], list[str]]:
    shard_tensors = [opener.describe(s) for s in files.shards]
    names = list(dict.fromkeys(n for tensors in shard_tensors for n in tensors))  # shard 0's order first
    model_dim = read_json(files.config, "params.json")[0].get("dim")
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
        merged = _merge(name, parts, problems, model_dim)
        if merged is not None:
            plan.append(merged)
    return plan, problems


def _merge(name: str, parts: list[StoredTensor], problems: list[str], model_dim=None) -> Optional[PlannedTensor]:
    """The planned full tensor, or ``None`` after appending why the shards cannot be merged."""
    if len(parts) == 1:
        return PlannedTensor(name, parts[0].shape, tuple(parts))
    listing = ", ".join(f"{os.path.basename(p.file)} {fmt_shape(p.shape)} {p.dtype}" for p in parts)
    if len({p.dtype for p in parts}) > 1 or len({len(p.shape) for p in parts}) > 1:
        problems.append(f"tensor {name!r}: shards disagree in dtype or rank: {listing}")
        return None
    dim = meta_split_dim(name)
    if name == _EMBEDDING and len(parts[0].shape) == 2:
        dim = _embedding_split_dim(parts[0].shape, model_dim, len(parts))
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
