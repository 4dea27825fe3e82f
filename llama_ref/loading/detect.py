"""Which checkpoint layout a directory holds, and which files make it up.

Precedence when several are present follows ``transformers``: HF safetensors, then HF ``.bin``,
then Meta. (The ``meta-llama/*-hf`` repos ship both safetensors and ``.bin`` copies.)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

HF_SAFETENSORS = "hf-safetensors"
HF_BIN = "hf-bin"
META = "meta"
FORMATS = (HF_SAFETENSORS, HF_BIN, META)

HF_CONFIG = "config.json"
META_PARAMS = "params.json"
_HF_WEIGHTS = {
    HF_SAFETENSORS: ("model.safetensors", "model.safetensors.index.json", re.compile(r"^model-\d+-of-\d+\.safetensors$")),
    HF_BIN: ("pytorch_model.bin", "pytorch_model.bin.index.json", re.compile(r"^pytorch_model-\d+-of-\d+\.bin$")),
}
_META_SHARD = re.compile(r"^consolidated\.(\d+)\.pth$")


@dataclass(frozen=True)
class CheckpointFiles:
    """Where a checkpoint's pieces are. ``weights`` is the single weight file, or ``None`` when
    ``index`` (HF) or ``shards`` (Meta) list them."""

    format: str
    root: str
    config: str  # config.json or params.json
    weights: Optional[str] = None
    index: Optional[str] = None
    shards: tuple[str, ...] = ()


def detect_format(path: "str | os.PathLike") -> str:
    """``"hf-safetensors"``, ``"hf-bin"`` or ``"meta"`` for a checkpoint directory.

    Raises ``FileNotFoundError`` naming what is missing when the directory holds none of them.
    """
    return find_checkpoint_files(path).format


def find_checkpoint_files(path: "str | os.PathLike") -> CheckpointFiles:
    root = os.fspath(path)
    if not os.path.exists(root):
        raise FileNotFoundError(f"checkpoint directory {root} does not exist")
    if not os.path.isdir(root):
        raise ValueError(f"{root} is a file; pass the checkpoint directory that contains it")
    names = set(os.listdir(root))
    if HF_CONFIG in names:
        for fmt in (HF_SAFETENSORS, HF_BIN):
            found = _hf_files(root, names, fmt)
            if found is not None:
                return found
    if META_PARAMS in names:
        return _meta_files(root, names)
    raise FileNotFoundError(_nothing_found_message(root, names))


def _hf_files(root: str, names: set[str], fmt: str) -> Optional[CheckpointFiles]:
    single, index, shard_pattern = _HF_WEIGHTS[fmt]
    config = os.path.join(root, HF_CONFIG)
    if single in names:
        return CheckpointFiles(fmt, root, config, weights=os.path.join(root, single))
    if index in names:
        return CheckpointFiles(fmt, root, config, index=os.path.join(root, index))
    shards = sorted(n for n in names if shard_pattern.match(n))
    if shards:
        # Without the index we would have to guess which tensors belong where; HF always writes it.
        raise FileNotFoundError(
            f"{root}: found shard(s) {', '.join(shards[:3])} but no {index} listing them"
        )
    return None


def _meta_files(root: str, names: set[str]) -> CheckpointFiles:
    numbered = {}
    for n in names:
        m = _META_SHARD.match(n)
        if m:
            numbered[int(m.group(1))] = n
    params = os.path.join(root, META_PARAMS)
    if not numbered:
        raise FileNotFoundError(f"{root}: {META_PARAMS} found but no consolidated.00.pth weight shard")
    # Shards are numbered 0..N-1; a hole means a failed or partial download.
    missing = [i for i in range(max(numbered) + 1) if i not in numbered]
    if missing:
        raise FileNotFoundError(
            f"{root}: Meta shard consolidated.{missing[0]:02d}.pth is missing "
            f"(found {', '.join(numbered[i] for i in sorted(numbered))})"
        )
    shards = tuple(os.path.join(root, numbered[i]) for i in sorted(numbered))
    return CheckpointFiles(META, root, params, shards=shards)


def _nothing_found_message(root: str, names: set[str]) -> str:
    if HF_CONFIG in names:
        return (f"{root}: config.json found but no weights (model.safetensors, model.safetensors.index.json, "
                "pytorch_model.bin or pytorch_model.bin.index.json)")
    hint = ""
    if os.path.isfile(os.path.join(root, "original", META_PARAMS)):
        hint = f"; the Meta-layout weights seem to be in {os.path.join(root, 'original')}"
    return (f"{root}: not a Llama checkpoint: expected config.json with model.safetensors / pytorch_model.bin "
            f"(Hugging Face), or params.json with consolidated.00.pth (Meta){hint}")
