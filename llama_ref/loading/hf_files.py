"""Hugging Face layout: ``config.json`` plus ``model.safetensors`` / ``pytorch_model.bin``, or shards
listed in ``*.index.json``. Names and the q/k row permutation come from :mod:`llama_ref.hf`."""

from __future__ import annotations

import logging
import os
import re
from typing import Optional

import torch

from ..config import LlamaConfig
from ..config_files import read_hf_dtype, read_json
from ..dtypes import DTYPES
from ..hf import HF_IGNORED_SUFFIXES, hf_to_meta_key, meta_to_hf_key
from .detect import CheckpointFiles
from .errors import CheckpointError, fmt_shape
from .files import check_file, read_json_file
from .plan import PlannedTensor
from .readers import OpenFiles, StoredTensor

logger = logging.getLogger(__name__)



def read_hf_config(files: CheckpointFiles) -> tuple[LlamaConfig, Optional[torch.dtype]]:
    """The model config and the dtype ``config.json`` says the weights are in (``None``: not stated).
    The file is read once; both come from the same strict reader (:mod:`llama_ref.config_files`)."""
    raw, source = read_json(files.config, "config.json")
    config = LlamaConfig.from_hf(raw, source=source)
    try:
        name = read_hf_dtype(raw, source)  # transformers < 5 writes "torch_dtype", 5.x writes "dtype"
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return config, None if name is None else DTYPES[name]


def read_weight_map(index_path: str) -> dict[str, str]:
    """``{tensor name: shard path}`` from an HF index, with every shard checked to be a readable file.

    The index is authoritative (as in ``transformers``): shard files it does not list are not read.
    Its shard names must be consistent (``model-0000k-of-0000N``: one N, 1 <= k <= N), and a file of
    the same set that exists but is not listed is refused: the index is then stale and that file's
    tensors would be silently ignored. Files of another set (another N) are leftovers; they are
    ignored with a warning.
    """
    index = read_json_file(index_path, "index file")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no 'weight_map' object mapping tensor names to shard files")
    root = os.path.dirname(index_path)
    out = {}
    for name, shard in weight_map.items():
        # A plain file name only: an index must not point outside the checkpoint directory.
        if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index_path}: tensor {name!r} maps to {shard!r}, expected a shard file name")
        out[name] = os.path.join(root, shard)
    _check_shard_names(index_path, sorted({os.path.basename(s) for s in out.values()}))
    for shard in sorted(set(out.values())):
        example = next(n for n, s in out.items() if s == shard)
        try:
            check_file(shard, "shard")
        except FileNotFoundError as e:
            if "broken symbolic link" in str(e):
                raise FileNotFoundError(f"{e}; it is listed in {index_path} (e.g. for tensor {example!r})") from None
            raise FileNotFoundError(f"shard {shard} listed in {index_path} (e.g. for tensor {example!r}) is missing") from None
    return out


_SHARD_NAME = re.compile(r"^(model|pytorch_model)-([0-9]{1,18})-of-([0-9]{1,18})\.(safetensors|bin)$")


def _check_shard_names(index_path: str, listed: list[str]) -> None:
    """See :func:`read_weight_map`: one set of ``k-of-N`` names, and no unlisted file of that set."""
    numbered = {n: m for n in listed if (m := _SHARD_NAME.match(n))}
    if not numbered:
        return
    totals = {}
    for n, m in numbered.items():
        totals.setdefault(int(m.group(3)), n)
    if len(totals) > 1:
        a, b = sorted(totals.values())[:2]
        raise CheckpointError(f"{index_path} lists shards of different sets ({a} and {b}): files of two "
                              "downloads are mixed; re-download the checkpoint")
    total = next(iter(totals))
    for n, m in numbered.items():
        if not 1 <= int(m.group(2)) <= total:
            raise CheckpointError(f"{index_path} lists shard {n}, whose number is outside 1..{total}")
    root = os.path.dirname(index_path)
    try:
        on_disk = sorted(os.listdir(root))
    except OSError:
        return  # find_checkpoint_files listed it a moment ago; nothing more to learn here
    family = {(m.group(1), m.group(4)) for m in numbered.values()}
    for n in on_disk:
        m = _SHARD_NAME.match(n)
        if m is None or n in numbered or (m.group(1), m.group(4)) not in family:
            continue
        if int(m.group(3)) == total:
            raise CheckpointError(f"{os.path.join(root, n)} is a shard of this checkpoint's set (-of-{m.group(3)}) "
                                  f"but {os.path.basename(index_path)} does not list it: the index is stale or "
                                  "incomplete, and that file's tensors would be ignored; re-download the index")
        logger.warning("%s: ignoring %s, a shard of another set (the index lists files of %d shards)", root, n, total)


def plan_hf(files: CheckpointFiles, opener: OpenFiles, config: LlamaConfig) -> tuple[list[PlannedTensor], list[str]]:
    """The load plan, plus problems (tensors that are not Llama parameters) for ``check_plan``."""
    stored: dict[str, StoredTensor] = {}
    problems: list[str] = []
    if files.index is not None:
        weight_map = read_weight_map(files.index)
        headers = {shard: opener.describe(shard) for shard in sorted(set(weight_map.values()))}
        for name, shard in weight_map.items():
            if name not in headers[shard]:
                problems.append(f"tensor {name!r} is listed in {os.path.basename(files.index)} as being in "
                                f"{os.path.basename(shard)}, which does not contain it")
            else:
                stored[name] = headers[shard][name]
        for shard, tensors in headers.items():
            unlisted = [k for k in tensors if weight_map.get(k) != shard]
            if unlisted:  # transformers reads only what the index lists; so do we
                logger.debug("%s: ignoring %d tensor(s) the index does not list here, e.g. %s",
                             shard, len(unlisted), unlisted[0])
    else:
        stored = opener.describe(files.weights)
    if config.tie_word_embeddings:
        problems += _drop_tied_head(stored, opener)
    plan = []
    for hf_name, s in stored.items():
        if hf_name.endswith(HF_IGNORED_SUFFIXES):
            # Derived buffers (RoPE inv_freq) some versions saved; recomputed from the config.
            logger.debug("%s: ignoring %s", s.file, hf_name)
            continue
        name = hf_to_meta_key(hf_name)
        if name is None:
            problems.append(f"unexpected tensor {hf_name!r} in {os.path.basename(s.file)}: not a Llama parameter")
            continue
        plan.append(PlannedTensor(name, s.shape, (s,), hf_name=hf_name))
    # Read files front to back: sequential I/O on spinning or network disks.
    plan.sort(key=lambda p: (p.parts[0].file, p.parts[0].offset))
    return plan, problems


def hf_name_map(names) -> dict[str, str]:
    """Our names -> HF names, so 'missing tensor' messages use the names the user's files use."""
    return {n: meta_to_hf_key(n) for n in names}


_HF_EMBED, _HF_HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _drop_tied_head(stored: dict[str, StoredTensor], opener: OpenFiles) -> list[str]:
    """With ``tie_word_embeddings``, the head *is* the embedding. transformers' ``save_pretrained``
    stores only the embedding; some files store both: then they must be equal (checked here, by
    value), and the head's copy is not loaded. Returns problems for ``check_plan``."""
    head = stored.pop(_HF_HEAD, None)
    embed = stored.get(_HF_EMBED)
    if head is None:
        return []
    if embed is None:
        return [f"tie_word_embeddings=true but {os.path.basename(head.file)} has {_HF_HEAD!r} without "
                f"{_HF_EMBED!r}"]
    if head.shape != embed.shape:
        return [f"tie_word_embeddings=true but {_HF_HEAD!r} {fmt_shape(head.shape)} and {_HF_EMBED!r} "
                f"{fmt_shape(embed.shape)} differ in shape"]
    with opener.tensor(embed) as a, opener.tensor(head) as b:
        wide = torch.promote_types(a.dtype, b.dtype)  # exact: compare values, not roundings
        same = torch.equal(a.to(wide), b.to(wide))
        del a, b  # drop the views so the files' maps can be closed
    if not same:
        return [f"tie_word_embeddings=true but {_HF_HEAD!r} in {os.path.basename(head.file)} differs from "
                f"{_HF_EMBED!r} in {os.path.basename(embed.file)}: refusing to pick one of two different "
                "matrices for one tied parameter"]
    logger.debug("%s: %s equals %s (tied); loading it once", head.file, _HF_HEAD, _HF_EMBED)
    return []
