"""Turn planned tensors into model weights, reading the memory-mapped files once.

* A tensor stored in the target dtype, on CPU, in Meta's layout, in one piece is used *as it is
  mapped*: the weight is a view of the file's private, copy-on-write map (zero copy; see
  :class:`~.readers.OpenFiles` for what that asks of the file).
* Anything else is one copy straight into the weight's fresh storage: converting dtype or device,
  permuting HF q/k rows, or concatenating the model-parallel parts of a Meta tensor. No
  intermediate full-size tensor is made.

The non-finite check reads each stored part once, before it is used or copied: one ``aminmax`` over
the mapped bytes (:func:`llama_ref.finite.all_finite`), which also tells whether converting to the
target dtype would overflow. Peak memory: the copied weights, plus nothing for the mapped ones (their
pages are the shared page cache, dropped from this process's RSS after reading; see :mod:`.pages`).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from typing import Optional, Sequence

import torch

from ..config import LlamaConfig
from ..finite import all_finite, describe_counts, describe_nonfinite, nonfinite_counts
from ..hf import qk_heads, unpermute_qk_into
from .errors import NonFiniteWeightError
from .pages import prefer_huge_pages
from .plan import PlannedTensor
from .readers import OpenFiles

logger = logging.getLogger(__name__)


def materialize(plan: Sequence[PlannedTensor], opener: OpenFiles, config: LlamaConfig, *,
                device: torch.device, dtype: torch.dtype, progress: Optional[bool] = None,
                desc: str = "loading", check_finite: bool = True) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` for every planned tensor, in ``dtype`` on ``device``, each a view of the mapped
    file where it can be (see the module docstring) and otherwise a fresh copy.

    ``check_finite``: refuse (:class:`~.errors.NonFiniteWeightError`) a tensor holding NaN or inf, or
    one that would overflow ``dtype``.
    """
    total = sum(p.nbytes for p in plan)
    state = {}
    handed_out: set[int] = set()  # storages already used as a weight: a second user gets its own copy
    with _progress_bar(total, progress, desc) as bar:
        for p in plan:
            state[p.name] = _materialize_one(p, opener, config, device, dtype, check_finite, handed_out)
            bar.update(p.nbytes)
    return state


def _materialize_one(p: PlannedTensor, opener: OpenFiles, config: LlamaConfig, device: torch.device,
                     dtype: torch.dtype, check_finite: bool, handed_out: set[int]) -> torch.Tensor:
    if p.split_dim is not None:
        out = _empty(p, dtype, device)
        fill(p, out, opener, config, check_finite=check_finite)
        return out
    # One part, or a norm replicated in every Meta shard: the first copy is the weight.
    with opener.tensor(p.parts[0]) as src:
        if check_finite:
            _check(p, src, dtype, opener)
        if _usable_as_is(p, src, config, device, dtype, handed_out):
            handed_out.add(src.untyped_storage().data_ptr())
            return src
        out = _empty(p, dtype, device)
        _copy_part(p, src, out, config)
        return out


def _empty(p: PlannedTensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(p.shape, dtype=dtype, device=device)
    prefer_huge_pages(out)  # before the copy first touches it
    return out


def _usable_as_is(p: PlannedTensor, src: torch.Tensor, config: LlamaConfig, device: torch.device,
                  dtype: torch.dtype, handed_out: set[int]) -> bool:
    """Whether the mapped tensor can be the weight itself: right dtype and device, Meta's row order,
    dense, and not sharing storage with a weight already handed out (tensors saved sharing storage in
    a ``.bin``, e.g. tied embeddings, would otherwise stay tied through in-place ops)."""
    return (device.type == "cpu" and src.device.type == "cpu" and src.dtype == dtype and src.is_contiguous()
            and (p.hf_name is None or qk_heads(p.name, config) is None)
            and src.untyped_storage().data_ptr() not in handed_out)


def fill(p: PlannedTensor, out: torch.Tensor, opener: OpenFiles, config: LlamaConfig, *,
         check_finite: bool = False) -> None:
    """Write ``p``'s data into ``out``: one copy per stored part, straight from the mapped file, converting
    dtype and device (and permuting HF q/k rows) within that copy. ``check_finite``: refuse a part holding
    NaN or inf, or overflowing ``out.dtype``, before copying it."""
    if p.split_dim is None:
        with opener.tensor(p.parts[0]) as src:
            if check_finite:
                _check(p, src, out.dtype, opener)
            _copy_part(p, src, out, config)
        return
    start = 0
    for part in p.parts:
        with opener.tensor(part) as src:
            if check_finite:
                _check(p, src, out.dtype, opener)
            size = src.shape[p.split_dim]
            out.narrow(p.split_dim, start, size).copy_(src)
        start += size


def _copy_part(p: PlannedTensor, src: torch.Tensor, out: torch.Tensor, config: LlamaConfig) -> None:
    heads = None if p.hf_name is None else qk_heads(p.name, config)
    if heads is None:
        out.copy_(src)
    else:
        unpermute_qk_into(out, src, heads)  # HF's rotate-half row order -> Meta's interleaved pairs


def _check(p: PlannedTensor, src: torch.Tensor, dtype: torch.dtype, opener: OpenFiles) -> None:
    if not all_finite(src, as_dtype=dtype):
        raise NonFiniteWeightError(_nonfinite_message(p, dtype, opener))


def _nonfinite_message(p: PlannedTensor, dtype: torch.dtype, opener: OpenFiles) -> str:
    """Which file holds the bad values, or whether the dtype conversion would make them (overflow)."""
    key = p.hf_name or p.name
    parts = p.parts if p.split_dim is not None else p.parts[:1]
    stored_bad = []
    for part in parts:
        with opener.tensor(part) as src:
            if not all_finite(src):
                stored_bad.append(f"{os.path.basename(part.file)} ({describe_nonfinite(src)})")
    if stored_bad:
        return (f"tensor {key!r} holds NaN or inf in {', '.join(stored_bad)}: the checkpoint is corrupt "
                f"(or the weights diverged) in {os.path.dirname(p.parts[0].file) or '.'}; nothing was loaded. "
                "Pass check_finite=False to load it anyway.")
    n_nan = n_inf = 0
    for part in parts:
        with opener.tensor(part) as src:
            a, b = nonfinite_counts(src, as_dtype=dtype)
        n_nan, n_inf = n_nan + a, n_inf + b
    finfo = torch.finfo(dtype)
    return (f"tensor {key!r} from {', '.join(sorted({os.path.basename(x.file) for x in parts}))} is finite as stored "
            f"({parts[0].dtype}) but overflows {dtype} (largest finite value {finfo.max:.4g}): "
            f"{describe_counts(n_nan, n_inf, math.prod(p.shape))} after conversion; load with dtype=torch.float32 or "
            "torch.bfloat16")


def _progress_bar(total: int, progress: Optional[bool], desc: str):
    """A tqdm bar over bytes; by default only when stderr is a terminal (quiet in logs and CI)."""
    from tqdm.auto import tqdm

    enabled = sys.stderr.isatty() if progress is None else bool(progress)
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=not enabled, file=sys.stderr, leave=False)
