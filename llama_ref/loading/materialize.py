"""Copy planned tensors, one at a time, from memory-mapped files into freshly allocated storage in
the target dtype and device. Peak memory: the model in its target dtype, plus one tensor, plus the
mapped pages :class:`~.readers.OpenFiles` keeps (at most its byte budget per file)."""

from __future__ import annotations

import logging
import sys
from typing import Optional, Sequence

import torch

from ..config import LlamaConfig
from ..hf import convert_hf_tensor
from .plan import PlannedTensor
from .readers import OpenFiles

logger = logging.getLogger(__name__)


def materialize(plan: Sequence[PlannedTensor], opener: OpenFiles, config: LlamaConfig, *,
                device: torch.device, dtype: torch.dtype, progress: Optional[bool] = None,
                desc: str = "loading") -> dict[str, torch.Tensor]:
    """``{name: tensor}`` for every planned tensor, in ``dtype`` on ``device``."""
    total = sum(p.nbytes for p in plan)
    state = {}
    with _progress_bar(total, progress, desc) as bar:
        for p in plan:
            out = torch.empty(p.shape, dtype=dtype, device=device)
            fill(p, out, opener, config)
            state[p.name] = out
            bar.update(p.nbytes)
    return state


def fill(p: PlannedTensor, out: torch.Tensor, opener: OpenFiles, config: LlamaConfig) -> None:
    """Write ``p``'s data into ``out``. ``copy_`` converts dtype and device in one pass, so no
    intermediate full-size copy is made (except HF q/k, whose row permutation needs one)."""
    if p.split_dim is None:
        # One part, or a norm replicated in every Meta shard: the first copy is the weight.
        with opener.tensor(p.parts[0]) as src:
            if p.hf_name is not None:
                _, src = convert_hf_tensor(p.hf_name, src, config)
            out.copy_(src)
            del src  # drop the view so the file's map can really be closed
        return
    start = 0
    for part in p.parts:
        with opener.tensor(part) as src:
            size = src.shape[p.split_dim]
            out.narrow(p.split_dim, start, size).copy_(src)
            del src
        start += size


def _progress_bar(total: int, progress: Optional[bool], desc: str):
    """A tqdm bar over bytes; by default only when stderr is a terminal (quiet in logs and CI)."""
    from tqdm.auto import tqdm

    enabled = sys.stderr.isatty() if progress is None else bool(progress)
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=not enabled, file=sys.stderr, leave=False)
