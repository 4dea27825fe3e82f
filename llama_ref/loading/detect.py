"""Which checkpoint layout a directory holds, and which files make it up.

Precedence when several layouts are present follows ``transformers``: HF safetensors, then HF
``.bin``, then Meta. (The ``meta-llama/*-hf`` repos ship both safetensors and ``.bin`` copies.)

Within one layout the choice is never a guess, and never depends on directory order (names are
sorted, nothing is chosen by iterating a set):

* HF: the single file (``model.safetensors``) *or* an index with its shards. Both a single file and
  an index (or shard files) is ambiguous and refused, unless the index lists exactly the single
  file. Shards without an index are refused (which tensor is where would be a guess).
* Meta: ``consolidated.NN.pth`` numbered 0..N-1 with Meta's two-digit names. Two files for one
  index (``consolidated.0.pth`` and ``consolidated.00.pth``), a name Meta does not write
  (``consolidated.1.pth``) and a hole in the numbering are refused, naming the files.

Every file chosen is checked to be a readable regular file (not a directory, FIFO or broken
symlink) before anything is opened; see :mod:`.files`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

from .errors import CheckpointError
from .files import check_file, read_json_file

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
_META_SHARD = re.compile(r"^consolidated\.([0-9]+)\.pth$")


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
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"checkpoint path must be a str or os.PathLike, got {type(path).__name__}")
    root = os.fspath(path)
    if isinstance(root, bytes):
        raise ValueError(f"checkpoint path must be a str, got bytes {root!r}")
    if "\0" in root:
        raise ValueError(f"checkpoint path {root!r} contains a NUL byte")
    if not os.path.exists(root):
        if os.path.islink(root):
            raise FileNotFoundError(f"checkpoint directory {root} is a broken symbolic link (to {os.readlink(root)})")
        raise FileNotFoundError(f"checkpoint directory {root} does not exist")
    if not os.path.isdir(root):
        raise ValueError(f"{root} is a file; pass the checkpoint directory that contains it")
    try:
        names = sorted(os.listdir(root))
    except PermissionError:
        raise PermissionError(f"cannot list checkpoint directory {root}: permission denied") from None
    except OSError as e:
        raise CheckpointError(f"cannot list checkpoint directory {root}: {e.strerror or e}") from None
    present = set(names)
    found: Optional[CheckpointFiles] = None
    if HF_CONFIG in present:
        for fmt in (HF_SAFETENSORS, HF_BIN):
            found = _hf_files(root, names, fmt)
            if found is not None:
                break
    if found is None and META_PARAMS in present:
        found = _meta_files(root, names)
    if found is None:
        raise FileNotFoundError(_nothing_found_message(root, present))
    check_file(found.config, "config file")
    for p in filter(None, (found.weights, found.index)):
        check_file(p, "weight file" if p == found.weights else "index file")
    for p in found.shards:
        check_file(p, "weight shard")
    return found


def _hf_files(root: str, names: list[str], fmt: str) -> Optional[CheckpointFiles]:
    single, index, shard_pattern = _HF_WEIGHTS[fmt]
    config = os.path.join(root, HF_CONFIG)
    shards = [n for n in names if shard_pattern.match(n)]
    if single in names:
        if index in names:
            listed = _index_files(os.path.join(root, index))
            if listed != {single}:
                raise CheckpointError(
                    f"{root}: both {single} and {index} (listing {', '.join(sorted(listed)[:3])}) are present; "
                    f"which weights are meant is ambiguous (transformers would silently load {single}). "
                    "Remove the stale one."
                )
        elif shards:
            raise CheckpointError(
                f"{root}: both {single} and shard file(s) {', '.join(shards[:3])} are present; which weights "
                "are meant is ambiguous. Remove the stale one(s)."
            )
        return CheckpointFiles(fmt, root, config, weights=os.path.join(root, single))
    if index in names:
        return CheckpointFiles(fmt, root, config, index=os.path.join(root, index))
    if shards:
        # Without the index we would have to guess which tensors belong where; HF always writes it.
        raise FileNotFoundError(
            f"{root}: found shard(s) {', '.join(shards[:3])} but no {index} listing them"
        )
    return None


def _index_files(index_path: str) -> set[str]:
    """The file names an HF index's ``weight_map`` points to (empty when it has none)."""
    data = read_json_file(index_path, "index file")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        return set()
    return {v for v in weight_map.values() if isinstance(v, str)}


def _meta_files(root: str, names: list[str]) -> CheckpointFiles:
    by_index: dict[int, list[str]] = {}
    for n in names:  # sorted: the same directory always gives the same messages
        m = _META_SHARD.match(n)
        if m:
            by_index.setdefault(int(m.group(1)), []).append(n)
    params = os.path.join(root, META_PARAMS)
    if not by_index:
        raise FileNotFoundError(f"{root}: {META_PARAMS} found but no consolidated.00.pth weight shard")
    duplicates = [(i, files) for i, files in sorted(by_index.items()) if len(files) > 1]
    if duplicates:
        i, files = duplicates[0]
        raise CheckpointError(
            f"{root}: {' and '.join(files)} are both model-parallel shard {i}; which one is meant is "
            "ambiguous. Remove the stale one."
        )
    odd = [files[0] for i, files in sorted(by_index.items()) if files[0] != _meta_name(i)]
    if odd:
        i = int(_META_SHARD.match(odd[0]).group(1))
        raise CheckpointError(
            f"{root}: unexpected shard name {odd[0]}: Meta names model-parallel shards with two digits "
            f"({_meta_name(i)}); rename it if it really is shard {i}"
        )
    # Shards are numbered 0..N-1; a hole means a failed or partial download. The first hole is
    # searched among 0..len (never up to the largest number: consolidated.99999999999.pth exists).
    missing = next(i for i in range(len(by_index) + 1) if i not in by_index)
    if missing < len(by_index):
        shown = [files[0] for _, files in sorted(by_index.items())]
        raise FileNotFoundError(
            f"{root}: Meta shard {_meta_name(missing)} is missing "
            f"(found {', '.join(shown[:8])}{', ...' if len(shown) > 8 else ''})"
        )
    shards = tuple(os.path.join(root, by_index[i][0]) for i in range(len(by_index)))
    return CheckpointFiles(META, root, params, shards=shards)


def _meta_name(i: int) -> str:
    return f"consolidated.{i:02d}.pth"


def _nothing_found_message(root: str, names: set[str]) -> str:
    if HF_CONFIG in names:
        return (f"{root}: config.json found but no weights (model.safetensors, model.safetensors.index.json, "
                "pytorch_model.bin or pytorch_model.bin.index.json)")
    hint = ""
    if os.path.isfile(os.path.join(root, "original", META_PARAMS)):
        hint = f"; the Meta-layout weights seem to be in {os.path.join(root, 'original')}"
    return (f"{root}: not a Llama checkpoint: expected config.json with model.safetensors / pytorch_model.bin "
            f"(Hugging Face), or params.json with consolidated.00.pth (Meta){hint}")
