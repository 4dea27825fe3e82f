"""Per-rank loading: each rank reads only its part of a checkpoint, one tensor at a time.

* A Meta checkpoint with as many shards as ranks (``consolidated.k.pth`` is rank k's part in exactly
  this layout): rank k opens only its own shard and copies its tensors as they are (``shard-per-rank``).
  (Llama-3 checkpoints split the embedding by vocabulary instead: those are ``sliced``, below.)
* Anything else (Meta with another shard count, HF safetensors/``.bin``): every rank plans the full
  tensors like the single-process loader, then copies only its slice of each from the memory-mapped
  files (``sliced``), touching only the shards that overlap its slice. HF q/k rows are un-permuted per
  head after slicing (the permutation works within a head, so slicing whole heads commutes with it).

Peak memory per rank: its share of the weights, plus one tensor's mapped pages (see
``loading.readers.OpenFiles``). Nothing is communicated while loading.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..compute_dtype import parse_compute_dtype
from ..config import LlamaConfig
from ..config_files import read_json
from ..hf import unpermute_qk
from ..loading.api import parse_dtype
from ..loading.detect import META, CheckpointFiles, find_checkpoint_files
from ..loading.errors import CheckpointError
from ..loading.hf_files import hf_name_map, plan_hf, read_hf_config
from ..loading.materialize import fill
from ..loading.meta_files import missing_shard_hint, plan_meta, read_meta_config
from ..loading.plan import PlannedTensor, check_plan, stored_dtype
from ..loading.readers import OpenFiles
from ..schedule import ScheduleSpec
from ..shapes import param_count
from .collectives import GroupLike, TPGroup
from .layout import TPLayout, tp_split_dim
from .memory import check_fits
from .tp import tensor_parallel_llama

logger = logging.getLogger(__name__)

SHARD_PER_RANK = "shard-per-rank"
SLICED = "sliced"


@dataclass(frozen=True)
class RankPlan:
    """What one rank will read. ``plan`` holds full tensors (``sliced``) or this rank's shard's tensors
    (``shard-per-rank``); ``files`` the checkpoint files this rank may open."""

    mode: str
    files: CheckpointFiles
    config: LlamaConfig
    config_dtype: Optional[torch.dtype]
    plan: list[PlannedTensor]
    problems: list[str]
    source: str


def plan_rank(files: CheckpointFiles, opener: OpenFiles, rank: int, world_size: int) -> RankPlan:
    """Read headers (only rank ``rank``'s shard for a matching Meta checkpoint) and plan the load."""
    if files.format == META and len(files.shards) == world_size and not _vocab_split_embedding(files, opener, rank):
        own = dataclasses.replace(files, shards=(files.shards[rank],))
        config = read_meta_config(own, opener)
        plan, problems = plan_meta(own, opener)
        mode, source, config_dtype = SHARD_PER_RANK, os.path.basename(own.shards[0]), None
        files = own
    elif files.format == META:
        config = read_meta_config(files, opener)
        plan, problems = plan_meta(files, opener)
        mode, source, config_dtype = SLICED, ", ".join(os.path.basename(s) for s in files.shards), None
    else:
        config, config_dtype = read_hf_config(files)
        plan, problems = plan_hf(files, opener, config)
        mode, source = SLICED, os.path.basename(files.index or files.weights)
    if not plan:
        raise CheckpointError(f"{files.root}: {source} hold(s) no Llama weight tensors"
                              + (f" ({problems[0]})" if problems else ""))
    return RankPlan(mode, files, config, config_dtype, plan, problems, source)


def _vocab_split_embedding(files: CheckpointFiles, opener: OpenFiles, rank: int) -> bool:
    """Llama-3's VocabParallelEmbedding split ``tok_embeddings`` by vocabulary rows (a shard holds the
    full width), not by width as this layout does: then the embedding must be gathered from every
    shard, and the checkpoint is loaded ``sliced`` (every other tensor still from this rank's shard)."""
    if len(files.shards) == 1:
        return False
    emb = opener.describe(files.shards[rank]).get("tok_embeddings.weight")
    dim = read_json(files.config, "params.json")[0].get("dim")
    return emb is not None and len(emb.shape) == 2 and emb.shape[1] == dim


def load_tp_pretrained(path: Union[str, os.PathLike], *, group: GroupLike = None,
                       device: Union[str, torch.device] = "cpu", dtype: Union[None, str, torch.dtype] = None,
                       attn_kernel: str = "math", schedule: ScheduleSpec = None,
                       compute_dtype: Union[str, torch.dtype] = "auto", max_seq_len: Optional[int] = None,
                       requires_grad: bool = False):
    """Load this rank's part of a checkpoint directory: a :func:`~llama_ref.parallel.parallelize`-d ``Llama``.

    Arguments as for :func:`llama_ref.load`; ``group``: a ``torch.distributed`` process group (default: the
    initialized default group) or a :class:`~llama_ref.parallel.TPGroup`.
    Before any weight data is read: a world size the model cannot be split into raises ``ValueError``
    (naming the sizes), every name and shape is checked (a ``CheckpointError`` names the file and
    tensor), and a shard that does not fit in this device's free memory is refused. ``device="meta"``
    checks the files and returns a shape-only model.
    """
    group = TPGroup.of(group)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a valid torch device ({e})") from None
    dtype = parse_dtype(dtype, "dtype")
    compute_dtype = parse_compute_dtype(compute_dtype)
    files = find_checkpoint_files(path)
    t0 = time.perf_counter()
    with OpenFiles() as opener:
        rp = plan_rank(files, opener, group.rank, group.world_size)
        config = rp.config if max_seq_len is None else rp.config.replace(max_seq_len=max_seq_len)
        layout = TPLayout(config, group.world_size)
        target = dtype or rp.config_dtype or stored_dtype(rp.plan)
        model = tensor_parallel_llama(config, group=group, device="meta", dtype=target, attn_kernel=attn_kernel,
                                      schedule=schedule, compute_dtype=compute_dtype)
        local = {n: tuple(p.shape) for n, p in model.named_parameters()}
        problems = list(rp.problems)
        if rp.mode == SHARD_PER_RANK:
            expected = local
        else:
            expected = {n: layout.full_shape(n, s) for n, s in local.items()}
            if files.format == META:
                hint = missing_shard_hint(rp.plan, expected, len(files.shards))
                if hint:
                    problems.insert(0, hint)
        check_plan(rp.plan, expected, source=rp.source, config_file=files.config, extra_problems=problems,
                   hf_names=None if files.format == META else hf_name_map(expected))
        if device.type != "meta":
            check_fits(param_count(config, group.world_size) * target.itemsize, device, group)
            state = {}
            for p in rp.plan:
                out = torch.empty(local[p.name], dtype=target, device=device)
                if rp.mode == SHARD_PER_RANK:
                    fill(p, out, opener, config)
                else:
                    fill_rank_slice(p, out, opener, layout, group.rank)
                state[p.name] = out
            model.load_state_dict(state, strict=True, assign=True)
            del state
    model.requires_grad_(requires_grad)
    model.init_buffers()
    logger.info("rank %d/%d: loaded %s checkpoint %s (%s, %d tensors, %s) in %.1f s", group.rank, group.world_size,
                files.format, files.root, rp.mode, len(rp.plan), target, time.perf_counter() - t0)
    return model.eval()


def fill_rank_slice(p: PlannedTensor, out: torch.Tensor, opener: OpenFiles, layout: TPLayout, rank: int) -> None:
    """Copy rank ``rank``'s slice of the full planned tensor ``p`` into ``out`` (this rank's shape)."""
    dim = tp_split_dim(p.name)
    if dim is None:
        # Replicated (norms): any copy will do; take it from a file this rank reads anyway.
        part = p.parts[rank * len(p.parts) // layout.world_size]
        with opener.tensor(part) as src:
            out.copy_(src)
            del src
        return
    start, length = rank * out.shape[dim], out.shape[dim]  # this rank's range on the full tensor
    if p.hf_name is not None:  # HF: one file, the full tensor, q/k rows in HF's rotate-half order
        with opener.tensor(p.parts[0]) as src:
            piece = src.narrow(dim, start, length)
            if p.name.endswith(("attention.wq.weight", "attention.wk.weight")):
                piece = unpermute_qk(piece, length // layout.config.head_dim)  # whole heads of this rank
            out.copy_(piece)
            del src, piece
        return
    # Meta: one part (the full tensor) or one per shard, stacked along the checkpoint's split dim, which
    # is this layout's split dim except for Llama-3's vocabulary-split embedding. Copy the block where
    # each part's region of the full tensor meets this rank's; parts that do not meet it are not opened.
    want_lo = [0] * out.dim()
    want_hi = list(p.shape)
    want_lo[dim], want_hi[dim] = start, start + length
    offset = 0
    for part in p.parts:
        part_lo, part_hi = [0] * out.dim(), list(p.shape)
        if len(p.parts) > 1:
            part_lo[p.split_dim], part_hi[p.split_dim] = offset, offset + part.shape[p.split_dim]
            offset += part.shape[p.split_dim]
        lo = [max(a, b) for a, b in zip(want_lo, part_lo)]
        hi = [min(a, b) for a, b in zip(want_hi, part_hi)]
        if any(a >= b for a, b in zip(lo, hi)):
            continue
        with opener.tensor(part) as src:
            src_block, out_block = src, out
            for d, (a, b) in enumerate(zip(lo, hi)):
                src_block = src_block.narrow(d, a - part_lo[d], b - a)
                out_block = out_block.narrow(d, a - want_lo[d], b - a)
            out_block.copy_(src_block)
            del src, src_block
