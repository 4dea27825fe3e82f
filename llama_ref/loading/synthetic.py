"""Write a random-weight Llama checkpoint in the real on-disk layout of Hugging Face or Meta.

    python scripts/make_synthetic_checkpoint.py PRESET OUT --format hf|hf-bin|meta [--shards K] [--dtype bf16]

The official weights are gated; a synthetic checkpoint of the same shapes exercises the same
loading code (naming, q/k permutation, sharding, memory, speed). Tensors are generated and
written one at a time, so writing the 13.5 GB 7B checkpoint needs about one tensor of memory for
HF safetensors. PyTorch archives (``.bin``, Meta ``.pth``) can only be written whole, so those are
written one shard at a time (memory: one shard).

Every tensor is drawn from its own generator, seeded by ``seed`` and the tensor's name, so the
same weights come out whatever the layout, shard count or dtype (before rounding): the tests
rely on that to compare layouts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
import zlib
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from ..config import LlamaConfig, meta_ffn_hidden_dim
from ..dtypes import SAFETENSORS_CODES, parse_dtype, torch_name
from ..hf import convert_meta_tensor_to_hf, hf_config_dict, meta_to_hf_key
from ..model import Llama
from .meta_files import meta_split_dim

logger = logging.getLogger("make_synthetic_checkpoint")

FORMATS = ("hf", "hf-bin", "meta")
_SAFETENSORS_CODES = {dtype: code for code, dtype in SAFETENSORS_CODES.items()}
# Files a previous run may have left; --force removes only these.
_CHECKPOINT_FILE = re.compile(
    r"^(config\.json|params\.json|model(-\d+-of-\d+)?\.safetensors|pytorch_model(-\d+-of-\d+)?\.bin|"
    r".*\.index\.json|consolidated\.\d+\.pth)(\.partial)?$"
)


# ---------------------------------------------------------------------------- weights
def resolve_config(preset_or_config: Union[str, LlamaConfig]) -> LlamaConfig:
    if isinstance(preset_or_config, LlamaConfig):
        return preset_or_config
    return LlamaConfig.from_preset(preset_or_config)


def param_specs(config: LlamaConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(Meta name, shape) of every parameter, in the model's order -- taken from the model itself
    (built on the meta device, no memory) so the files can never drift from what it expects."""
    model = Llama(config, device="meta")
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def synthetic_tensor(name: str, shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """A float32 random weight in Meta layout, a pure function of (name, shape, seed).

    Embeddings std 1 (like a trained model's, so activations are O(1)); norms 1 + 0.02 N, near
    ones but distinct per norm so a mis-routed norm changes the logits; other weights std 0.02.
    """
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    t = torch.randn(tuple(shape), generator=gen)
    if name == "tok_embeddings.weight":
        return t
    if name.endswith("norm.weight"):
        return t.mul_(0.02).add_(1.0)
    return t.mul_(0.02)


def synthetic_state_dict(preset_or_config: Union[str, LlamaConfig], seed: int = 0,
                         dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """All weights in memory, Meta names and layout: the reference the written files must reproduce.
    For small configs (tests) only."""
    config = resolve_config(preset_or_config)
    return {name: synthetic_tensor(name, shape, seed).to(dtype) for name, shape in param_specs(config)}


def rope_freqs(config: LlamaConfig) -> torch.Tensor:
    """Meta's extra ``rope.freqs`` tensor: theta^(-2k/head_dim), one per rotated pair."""
    hd = config.head_dim
    return 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32)[: hd // 2] / hd))


# ---------------------------------------------------------------------------- configs
def meta_ffn_params(dim: int, hidden_dim: int) -> dict:
    """``multiple_of`` (and ``ffn_dim_multiplier`` if needed) such that Meta's FFN-width formula
    gives ``hidden_dim`` exactly. Meta's own values come first (7B/13B: 256; 70B: 4096 x 1.3;
    Llama-3-8B: 1024 x 1.3), then any multiple, then an exact multiplier as a last resort."""
    multiples = (256, 4096, 1024, 2048, 512, 128, 64, 32, 16, 8, 4, 2, 1)
    for mult in (None, 1.3):
        for m in multiples:
            if meta_ffn_hidden_dim(dim, m, mult) == hidden_dim:
                return {"multiple_of": m} if mult is None else {"multiple_of": m, "ffn_dim_multiplier": mult}
    base = int(2 * (4 * dim) / 3)
    mult = hidden_dim / base
    for _ in range(8):  # int(mult * base) may land one below hidden_dim through float rounding
        if meta_ffn_hidden_dim(dim, 1, mult) == hidden_dim:
            return {"multiple_of": 1, "ffn_dim_multiplier": mult}
        mult = math.nextafter(mult, math.inf)
    raise ValueError(f"cannot express hidden_dim={hidden_dim} for dim={dim} in Meta's params.json")


def meta_params(config: LlamaConfig) -> dict:
    """Meta's ``params.json`` for ``config`` (vocab_size -1 as in the real files: the tokenizer decides)."""
    params = {"dim": config.dim, **meta_ffn_params(config.dim, config.hidden_dim), "n_heads": config.n_heads}
    if config.n_kv_heads != config.n_heads:
        params["n_kv_heads"] = config.n_kv_heads
    params.update({"n_layers": config.n_layers, "norm_eps": config.norm_eps})
    if config.rope_theta != 10000.0:
        params["rope_theta"] = config.rope_theta
    if config.head_dim_explicit and config.head_dim * config.n_heads != config.dim:
        raise ValueError(f"Meta's params.json cannot express head_dim={config.head_dim} != dim / n_heads")
    if config.rope_scaling is not None:
        params.update(meta_rope_params(config))
    params["vocab_size"] = -1
    return params


def meta_rope_params(config: LlamaConfig) -> dict:
    """``use_scaled_rope`` (Meta's llama3 constants) plus Llama-4-style overrides where they differ.
    (Tied embeddings have no flag: the Meta writer simply has no ``output.weight`` then.)"""
    from llama_ref.config_files import META_ROPE_DEFAULTS as d

    r = config.rope_scaling
    if (r.rope_type != "llama3" or r.low_freq_factor != d["low_freq_factor"]
            or r.original_max_position_embeddings != d["original_max_position_embeddings"]):
        raise ValueError(f"Meta's params.json cannot express RoPE scaling {r}")
    out = {"use_scaled_rope": True}
    if r.factor != d["factor"]:
        out["rope_scaling_factor"] = r.factor
    if r.high_freq_factor != d["high_freq_factor"]:
        out["rope_high_freq_factor"] = r.high_freq_factor
    return out


def hf_config(config: LlamaConfig, dtype: torch.dtype) -> dict:
    return {**hf_config_dict(config), "torch_dtype": torch_name(dtype)}


# ---------------------------------------------------------------------------- writers
def shard_groups(sizes: Sequence[int], shards: int) -> list[range]:
    """Split items (in order) into ``shards`` contiguous, non-empty groups of about equal bytes."""
    n = len(sizes)
    if not 1 <= shards <= n:
        raise ValueError(f"cannot split {n} tensors into {shards} shards")
    total = sum(sizes)
    cumulative, bounds, acc = [], [0], 0
    for s in sizes:
        cumulative.append(acc)  # bytes before item i
        acc += s
    for k in range(1, shards):
        i = next((i for i in range(n) if cumulative[i] >= k * total / shards), n)
        # Leave at least one item for this group and each one after it.
        bounds.append(min(max(i, bounds[-1] + 1), n - (shards - k)))
    bounds.append(n)
    return [range(bounds[k], bounds[k + 1]) for k in range(shards)]


def write_safetensors(path: Path, entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                      produce: Callable[[int], torch.Tensor], on_bytes: Callable[[int], None] = lambda n: None) -> None:
    """Stream a safetensors file: the header is computable from shapes alone, then each tensor is
    produced, written and freed in turn (``safetensors.save_file`` would need all of them at once)."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian data; this writer assumes a little-endian machine")
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape, dtype in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": _SAFETENSORS_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as the safetensors library does
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for i, (key, shape, dtype) in enumerate(entries):
            t = produce(i)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise RuntimeError(f"{key}: produced {tuple(t.shape)} {t.dtype}, header says {shape} {dtype}")
            f.write(t.contiguous().view(torch.uint8).numpy().data)
            on_bytes(t.numel() * t.element_size())
            del t
    os.replace(partial, path)  # a crash mid-write leaves a .partial, never a truncated-but-valid-looking file


def _torch_save(obj: dict, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    torch.save(obj, partial)
    os.replace(partial, path)


def _write_hf(config: LlamaConfig, out: Path, fmt: str, shards: int, dtype: torch.dtype, seed: int, bar) -> list[Path]:
    specs = param_specs(config)
    hf_names = [meta_to_hf_key(name) for name, _ in specs]
    sizes = [math.prod(shape) * dtype.itemsize for _, shape in specs]
    groups = shard_groups(sizes, shards)
    ext = "safetensors" if fmt == "hf" else "bin"
    stem = "model" if fmt == "hf" else "pytorch_model"
    if shards == 1:
        files = [f"{stem}.{ext}"]
    else:
        files = [f"{stem}-{k + 1:05d}-of-{shards:05d}.{ext}" for k in range(shards)]

    def produce(i: int) -> torch.Tensor:
        name, shape = specs[i]
        return convert_meta_tensor_to_hf(name, synthetic_tensor(name, shape, seed).to(dtype), config)[1]

    written = []
    for group, fname in zip(groups, files):
        path = out / fname
        if fmt == "hf":
            write_safetensors(path, [(hf_names[i], specs[i][1], dtype) for i in group], lambda j, g=group: produce(g[j]),
                              bar.update)
        else:
            _torch_save({hf_names[i]: produce(i) for i in group}, path)
            bar.update(sum(sizes[i] for i in group))
        written.append(path)
    if shards > 1:
        index = {"metadata": {"total_size": sum(sizes)},
                 "weight_map": dict(sorted((hf_names[i], files[k]) for k, g in enumerate(groups) for i in g))}
        path = out / f"{stem}.{ext}.index.json"
        path.write_text(json.dumps(index, indent=2) + "\n")
        written.append(path)
    path = out / "config.json"
    path.write_text(json.dumps(hf_config(config, dtype), indent=2) + "\n")
    written.append(path)
    return written


def _write_meta(config: LlamaConfig, out: Path, shards: int, dtype: torch.dtype, seed: int, bar) -> list[Path]:
    specs = param_specs(config)
    for name, shape in specs:
        dim = meta_split_dim(name)
        if dim is not None and shape[dim] % shards:
            raise ValueError(f"{name} {shape} cannot be split into {shards} model-parallel shards along dim {dim}")
    written = []
    for k in range(shards):
        shard = {}
        for name, shape in specs:
            full = synthetic_tensor(name, shape, seed).to(dtype)
            dim = meta_split_dim(name)
            if dim is None or shards == 1:
                shard[name] = full
            else:
                size = shape[dim] // shards
                shard[name] = full.narrow(dim, k * size, size).clone()  # clone: free the full tensor
            bar.update(shard[name].numel() * dtype.itemsize)
            del full
        shard["rope.freqs"] = rope_freqs(config).to(dtype)
        path = out / f"consolidated.{k:02d}.pth"
        _torch_save(shard, path)
        del shard
        written.append(path)
    path = out / "params.json"
    path.write_text(json.dumps(meta_params(config), indent=2) + "\n")
    written.append(path)
    return written


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} is not empty; pass --force (force=True) to overwrite a checkpoint there")
        for entry in out.iterdir():
            if entry.is_file() and _CHECKPOINT_FILE.match(entry.name):
                entry.unlink()
    out.mkdir(parents=True, exist_ok=True)


def write_checkpoint(preset_or_config: Union[str, LlamaConfig], out: Union[str, os.PathLike], format: str = "hf",
                     shards: int = 1, dtype: Union[str, torch.dtype] = torch.bfloat16, seed: int = 0, *,
                     force: bool = False, progress: Optional[bool] = False) -> list[Path]:
    """Write a synthetic checkpoint; returns the files written.

    ``format``: ``"hf"`` (safetensors), ``"hf-bin"`` (``pytorch_model*.bin``) or ``"meta"``
    (``consolidated.NN.pth``; ``shards`` is then the model-parallel degree, e.g. 2 for 13B).
    Refuses a non-empty ``out`` unless ``force`` (which replaces only checkpoint files there).
    """
    from tqdm.auto import tqdm

    config = resolve_config(preset_or_config)
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be a positive int, got {shards!r}")
    dtype = parse_dtype(dtype, "dtype")
    if dtype not in _SAFETENSORS_CODES:
        raise ValueError(f"dtype {dtype} is not supported")
    out = Path(out)
    _prepare_out(out, force)
    total = sum(math.prod(s) for _, s in param_specs(config)) * dtype.itemsize
    enabled = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"writing {out.name}",
              disable=not enabled, file=sys.stderr) as bar:
        if format == "meta":
            return _write_meta(config, out, shards, dtype, seed, bar)
        return _write_hf(config, out, format, shards, dtype, seed, bar)


# ---------------------------------------------------------------------------- CLI
def main(argv: Optional[Sequence[str]] = None) -> int:
    from llama_ref.config import PRESETS

    from llama_ref.usage import OneLineParser, bad_input

    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("preset", choices=sorted(PRESETS), help="model shape")
    p.add_argument("out", type=Path, help="output directory (created; must be empty unless --force)")
    p.add_argument("--format", choices=FORMATS, default="hf",
                   help="hf: safetensors + config.json; hf-bin: pytorch_model*.bin; meta: consolidated.NN.pth + params.json")
    p.add_argument("--shards", type=int, default=1, help="HF: number of weight files; meta: model-parallel degree")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="storage dtype (default bf16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace checkpoint files already in OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    try:
        files = write_checkpoint(args.preset, args.out, args.format, args.shards, args.dtype, args.seed,
                                 force=args.force, progress=False if args.no_progress else None)
    except (ValueError, OSError, MemoryError) as e:  # FileExistsError is an OSError: one line, exit 2
        return bad_input("make_synthetic_checkpoint", e)
    size = sum(f.stat().st_size for f in files)
    print(f"wrote {args.preset} ({args.format}, {args.shards} shard(s), {args.dtype}) to {args.out}: "
          f"{len(files)} files, {size / 2**30:.2f} GiB in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
