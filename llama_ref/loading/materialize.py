"""Copy planned tensors, one at a time, from memory-mapped files into freshly allocated storage in
the target dtype and device. Peak memory: the model in its target dtype, plus one tensor, plus the
mapped pages :class:`~.readers.OpenFiles` keeps (at most its byte budget per file).

Each tensor is checked for NaN/inf right after it is copied (one ``aminmax`` pass over the copy,
no extra allocation; see :mod:`llama_ref.finite`), so a corrupt checkpoint is refused naming the
tensor and its file instead of loading and producing NaN logits.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional, Sequence

import torch

from ..config import LlamaConfig
from ..finite import all_finite, describe_nonfinite
from ..hf import convert_hf_tensor
from .errors import NonFiniteWeightError
from .plan import PlannedTensor
from .readers import OpenFiles

logger = logging.getLogger(__name__)


def materialize(plan: Sequence[PlannedTensor], opener: OpenFiles, config: LlamaConfig, *,
                device: torch.device, dtype: torch.dtype, progress: Optional[bool] = None,
                desc: str = "loading", check_finite: bool = True) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` for every planned tensor, in ``dtype`` on ``device``.

    ``check_finite``: refuse (:class:`~.errors.NonFiniteWeightError`) a tensor holding NaN or inf.
    """
    total = sum(p.nbytes for p in plan)
    state = {}
    with _progress_bar(total, progress, desc) as bar:
        for p in plan:
            out = torch.empty(p.shape, dtype=dtype, device=device)
            fill(p, out, opener, config)
            if check_finite and not all_finite(out):
                raise NonFiniteWeightError(_nonfinite_message(p, out, opener))
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


def _nonfinite_message(p: PlannedTensor, out: torch.Tensor, opener: OpenFiles) -> str:
    """Which file holds the bad values, or whether the dtype conversion made them (overflow)."""
    key = p.hf_name or p.name
    parts = p.parts if p.split_dim is not None else p.parts[:1]
    stored_bad = []
    for part in parts:
        with opener.tensor(part) as src:
            if not all_finite(src):
                stored_bad.append(f"{os.path.basename(part.file)} ({describe_nonfinite(src)})")
            del src
    if stored_bad:
        return (f"tensor {key!r} holds NaN or inf in {', '.join(stored_bad)}: the checkpoint is corrupt "
                f"(or the weights diverged) in {os.path.dirname(p.parts[0].file) or '.'}; nothing was loaded. "
                "Pass check_finite=False to load it anyway.")
    finfo = torch.finfo(out.dtype)
    return (f"tensor {key!r} from {', '.join(sorted({os.path.basename(x.file) for x in parts}))} is finite as stored "
            f"({parts[0].dtype}) but overflows {out.dtype} (largest finite value {finfo.max:.4g}): "
            f"{describe_nonfinite(out)} after conversion; load with dtype=torch.float32 or torch.bfloat16")


def _progress_bar(total: int, progress: Optional[bool], desc: str):
    """A tqdm bar over bytes; by default only when stderr is a terminal (quiet in logs and CI)."""
    from tqdm.auto import tqdm

    enabled = sys.stderr.isatty() if progress is None else bool(progress)
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=not enabled, file=sys.stderr, leave=False)
