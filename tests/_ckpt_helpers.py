"""Helpers for the checkpoint tests: the synthetic-checkpoint writer, reference models,
directory snapshots, and surgery on tiny checkpoint files to make them bad in one precise way."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from llama_ref import Llama, LlamaConfig
from llama_ref.loading import synthetic

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_synthetic_checkpoint.py"

# name -> (format, shards) of the tiny checkpoints every loading test shares.
LAYOUTS = {
    "hf-single": ("hf", 1),
    "hf-3-shards": ("hf", 3),
    "hf-bin": ("hf-bin", 2),
    "meta-1-shard": ("meta", 1),
    "meta-2-shards": ("meta", 2),
}


def synth():
    """The synthetic-checkpoint writer (:mod:`llama_ref.loading.synthetic`, which ``SCRIPT`` runs)."""
    return synthetic


def tiny_config() -> LlamaConfig:
    return LlamaConfig.from_preset("tiny")


def tokens(config: LlamaConfig, bsz: int = 2, seqlen: int = 9) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (bsz, seqlen), generator=torch.Generator().manual_seed(1234))


def reference_model(config: LlamaConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> Llama:
    """The synthetic weights loaded straight from memory: what every file layout must reproduce."""
    model = Llama(config, dtype=dtype)
    model.load_state_dict(synth().synthetic_state_dict(config, seed=seed, dtype=dtype), strict=True)
    return model.eval()


def logits(model: Llama, toks: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(toks)


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``directory`` with its size and mtime: to prove loading wrote nothing."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            st = os.stat(os.path.join(root, f))
            out[os.path.relpath(os.path.join(root, f), directory)] = (st.st_size, st.st_mtime_ns)
    return out


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------- file surgery
def edit_safetensors(path: Path, mutate: Callable[[dict], None]) -> None:
    """Load a (tiny) safetensors file, let ``mutate`` change the dict of tensors, save it back."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    mutate(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def edit_safetensors_header(path: Path, mutate: Callable[[dict], None]) -> None:
    """Rewrite only the JSON header of a safetensors file, keeping its data bytes."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    mutate(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])


def edit_torch_file(path: Path, mutate: Callable[[dict], None]) -> None:
    state = torch.load(path, weights_only=True)
    mutate(state)
    torch.save(state, path)


def edit_json(path: Path, mutate: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))


def truncate(path: Path, drop: int = 100) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - drop)
