"""A load plan: for every model parameter, which stored tensor(s) it comes from. Checked against
the model's expected names and shapes before any data is read."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .errors import CheckpointError, fmt_shape, problems_message
from .readers import StoredTensor


@dataclass(frozen=True)
class PlannedTensor:
    """One model parameter (Meta name, Meta layout) and where its data is.

    ``parts`` has one entry, or one per Meta model-parallel shard concatenated along ``split_dim``.
    ``hf_name`` is set for Hugging Face tensors, which go through ``llama_ref.hf.convert_hf_tensor``.
    """

    name: str
    shape: tuple[int, ...]
    parts: tuple[StoredTensor, ...]
    split_dim: Optional[int] = None
    hf_name: Optional[str] = None

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def label(self) -> str:
        """How the user's files spell this tensor: 'model.layers.0...' in 'model-00001-of-00002.safetensors'."""
        key = self.hf_name or self.name
        files = sorted({os.path.basename(p.file) for p in self.parts})
        return f"{key!r} in {', '.join(files)}"


def check_plan(plan: Sequence[PlannedTensor], expected: dict[str, tuple[int, ...]], *, source: str,
               config_file: str, extra_problems: Sequence[str] = (), hf_names: Optional[dict[str, str]] = None) -> None:
    """Raise one ``CheckpointError`` listing every missing, unexpected or mis-shaped tensor.

    ``source`` names where the tensor list came from (the index, the file, the shards);
    ``hf_names`` maps our names to the checkpoint's when they differ, so messages use the user's names.
    """
    problems = list(extra_problems)
    planned = {p.name: p for p in plan}
    for p in plan:
        if p.name not in expected:
            problems.append(f"unexpected tensor {p.label}")
        elif tuple(p.shape) != tuple(expected[p.name]):
            problems.append(
                f"tensor {p.label} has shape {fmt_shape(p.shape)} but {os.path.basename(config_file)} implies "
                f"{fmt_shape(expected[p.name])}"
            )
    for name in expected:
        if name not in planned:
            shown = (hf_names or {}).get(name, name)
            problems.append(f"missing tensor {shown!r} (not in {source})")
    if problems:
        raise CheckpointError(problems_message(
            f"checkpoint {os.path.dirname(config_file) or '.'} does not match {os.path.basename(config_file)} "
            f"({len(problems)} problem(s)); nothing was loaded:", problems))


def stored_dtype(plan: Sequence[PlannedTensor]) -> torch.dtype:
    """The dtype holding most of the bytes (a few fp32 norms in a bf16 checkpoint do not count)."""
    counts: Counter = Counter()
    for p in plan:
        for part in p.parts:
            counts[part.dtype] += part.nbytes
    if not counts:
        raise CheckpointError("checkpoint holds no tensors")
    return counts.most_common(1)[0][0]
