"""Tensor parallelism as a transform of a built model (as gpt-fast's ``tp.py`` and torchtitan's
``parallelize_module`` do), never a subclass of it.

:func:`parallelize` takes a :class:`llama_ref.Llama` and a process group and, in place, swaps each
projection for this rank's column- or row-parallel slice in Meta's layout (:mod:`.layout`): wq, wk, wv, w1,
w3 and the output head split by output feature, wo and w2 by input feature (their partial sums all-reduced),
the embedding by model dimension (its lookups all-gathered). Each attention keeps ``n_heads / N`` query
heads and ``n_kv_heads / N`` kv heads; the norms stay whole. ``forward`` is the model's own: a rank is a
Llama whose layers hold fewer heads and communicate. Parameter names stay the single-process (Meta) ones,
so rank k's state dict has exactly the keys of Meta's ``consolidated.k.pth``.

Every rank runs every forward in lockstep with the others (same tokens, same ``start_pos``); every rank gets
the full fp32 logits. Caches, schedules, both kernels, ``generate`` and the meta device work as for one process.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..devices import parse_device
from ..model import Llama, RMSNorm
from ..shapes import param_count
from .collectives import GroupLike, TPGroup
from .layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from .layout import TPLayout
from .memory import check_device, check_fits


def tp_group_of(model: nn.Module) -> Optional[TPGroup]:
    """The group a :func:`parallelize`-d model communicates over; ``None`` for a single-process model."""
    return getattr(model, "tp_group", None)


def parallelize(model: Llama, group: GroupLike = None) -> Llama:
    """Make ``model`` rank ``group.rank`` of a ``group.world_size``-way tensor-parallel model, in place, and
    return it. Its weights become this rank's slices (copies; the full tensors are released), on the device
    and in the dtype they had (meta stays meta). Any KV cache is dropped. A world size that does not divide
    the model raises ``ValueError`` naming the sizes, before anything changes."""
    if not isinstance(model, Llama):
        raise ValueError(f"parallelize needs a llama_ref Llama, got {type(model).__name__}")
    if tp_group_of(model) is not None:
        raise ValueError(f"the model is already tensor-parallel ({tp_group_of(model).world_size} ranks)")
    group = TPGroup.of(group)
    layout = TPLayout(model.config, group.world_size)  # every divisibility problem, before anything changes
    model.tok_embeddings = ParallelEmbedding.shard(model.tok_embeddings, group)
    for layer in model.layers:
        attention, feed_forward = layer.attention, layer.feed_forward
        attention.wq = ColumnParallelLinear.shard(attention.wq, group)
        attention.wk = ColumnParallelLinear.shard(attention.wk, group)
        attention.wv = ColumnParallelLinear.shard(attention.wv, group)
        attention.wo = RowParallelLinear.shard(attention.wo, group)
        # A rank holds whole groups: its query heads and the kv heads they share (n_rep is unchanged).
        attention.n_heads, attention.n_kv_heads = layout.n_heads, layout.n_kv_heads
        feed_forward.w1 = ColumnParallelLinear.shard(feed_forward.w1, group)
        feed_forward.w3 = ColumnParallelLinear.shard(feed_forward.w3, group)
        feed_forward.w2 = RowParallelLinear.shard(feed_forward.w2, group)
    model.output = ColumnParallelLinear.shard(model.output, group, gather_output=True)
    model.tp_group = group
    model.clear_cache()
    return model


def tensor_parallel_llama(config, *, group: GroupLike = None, device="cpu", dtype: Optional[torch.dtype] = None,
                          **kwargs) -> Llama:
    """Rank ``group.rank`` of a tensor-parallel ``Llama(config, dtype=dtype, **kwargs)`` on ``device``, built
    without ever holding the full model: made on meta, parallelized, then this rank's share allocated (checked
    first against the memory the ranks on this host share) and initialised as ``nn.Linear``/``nn.Embedding``
    are (norms 1)."""
    group = TPGroup.of(group)
    TPLayout(config, group.world_size)  # a world size the model cannot be split into, before anything is built
    device = parse_device(device)
    check_device(device)
    model = parallelize(Llama(config, device="meta", dtype=dtype, **kwargs), group)
    if device.type == "meta":
        return model
    weight_dtype = dtype or torch.get_default_dtype()
    check_fits(param_count(config, group.world_size) * weight_dtype.itemsize, device, group)
    model.to_empty(device=device)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.reset_parameters()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
    return model
