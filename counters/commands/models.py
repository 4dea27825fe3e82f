"""The model a command works on: resolve a MODEL argument, choose the device, build it.

MODEL is a preset name, a Hugging Face checkpoint directory or ``config.json``, or a Meta directory
(``params.json``). Without weights, small models get random weights on the CPU and large ones the
``meta`` device (counts depend on shapes only); with weights they are loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from llama_ref.config import PRESETS, LlamaConfig
from llama_ref.dtypes import DTYPES as ALL_DTYPES
from llama_ref.dtypes import names as dtype_names
from llama_ref.errors import InsufficientMemoryError
from llama_ref.hub import is_hub_id
from llama_ref.loading import find_checkpoint_files
from llama_ref.memory import available_memory_bytes, format_bytes
from llama_ref.loading import load_pretrained
from llama_ref.model import Llama
from llama_ref.guards import resolve_compute_dtype
from llama_ref.memory_algebra import MemoryBreakdown
from llama_ref.memory_algebra import forward_need as algebra_forward_need
from llama_ref.shapes import param_count

from ..studies.factory import random_model
from ..training import Training
from .common import BadInput

# Random weights serve only to run real kernels (counts depend on shapes, never on values), so a
# random-init model is built on the CPU only when it is small; anything larger is counted on meta.
RANDOM_INIT_MAX_BYTES = 1 << 30
#: The dtype names a command accepts for weights (from the one table, llama_ref.dtypes).
DTYPES = {name: ALL_DTYPES[name] for name in dtype_names((torch.float32, torch.bfloat16, torch.float16))}


@dataclass
class ModelSource:
    config: LlamaConfig
    kind: str  # "preset" | "hf" | "meta" | "hub"
    path: Optional[str] = None  # file or directory given
    checkpoint_dir: Optional[str] = None  # directory holding weights, if any

    @property
    def has_weights(self) -> bool:
        return self.checkpoint_dir is not None


def _has_weights(directory: str) -> bool:
    """The directory holds a checkpoint in a layout the loader reads (its detector decides)."""
    try:
        find_checkpoint_files(directory)
    except FileNotFoundError as e:
        # Config only (no weight files at all) is a random-init model; anything half there is an error.
        if "no weights" in str(e) or "no consolidated" in str(e):
            return False
        raise
    return True


def resolve_model(spec: str, *, vocab_size: Optional[int] = None, revision: Optional[str] = None) -> ModelSource:
    """A preset name, an HF directory / config.json, a Meta directory / params.json, or a Hugging Face
    Hub model id ``org/name`` (only its ``config.json`` is fetched, at ``revision``)."""
    if revision is not None and not is_hub_id(spec):
        raise BadInput(f"--revision applies to a Hub model id (org/name), not to {spec!r}")
    if spec in PRESETS:
        if vocab_size is not None and vocab_size != PRESETS[spec].vocab_size:
            raise BadInput(f"--vocab-size {vocab_size} contradicts preset {spec} (vocab_size "
                           f"{PRESETS[spec].vocab_size})")
        return ModelSource(PRESETS[spec], "preset")
    if is_hub_id(spec):  # never an existing local path (is_hub_id checks)
        config = LlamaConfig.from_hf(spec, revision=revision)
        if vocab_size is not None and vocab_size != config.vocab_size:
            raise BadInput(f"--vocab-size {vocab_size} contradicts {spec} (vocab_size {config.vocab_size})")
        return ModelSource(config, "hub", path=spec)
    if not os.path.exists(spec):
        raise BadInput(f"unknown model {spec!r}: not a preset ({', '.join(sorted(PRESETS))}), "
                       "no such file or directory, and not a Hub model id (org/name)")
    if os.path.isdir(spec):
        directory = spec
        # lexists, not isfile: a config.json that is a directory, a FIFO or a broken link is named as such
        # by the reader, not reported as absent.
        if os.path.lexists(os.path.join(spec, "config.json")):
            kind, cfg_file = "hf", os.path.join(spec, "config.json")
        elif os.path.lexists(os.path.join(spec, "params.json")):
            kind, cfg_file = "meta", os.path.join(spec, "params.json")
        else:
            raise BadInput(f"{spec}: directory has neither config.json (Hugging Face) nor params.json (Meta)")
        weights = _has_weights(spec)
    else:
        directory = os.path.dirname(os.path.abspath(spec))
        kind = "meta" if os.path.basename(spec) == "params.json" else "hf"
        cfg_file = spec
        weights = False  # a config file alone: no weights, whatever sits next to it
    if weights:
        # The loader reads the config the way it will load the weights (a Meta params.json says
        # vocab_size -1: the checkpoint's tok_embeddings decides) and checks every tensor header.
        config = load_pretrained(directory, device="meta").config
        if vocab_size is not None and vocab_size != config.vocab_size:
            raise BadInput(f"--vocab-size {vocab_size} contradicts the checkpoint in {directory} "
                           f"(vocab_size {config.vocab_size})")
    elif kind == "hf":
        config = LlamaConfig.from_hf(cfg_file)
        if vocab_size is not None and vocab_size != config.vocab_size:
            raise BadInput(f"--vocab-size {vocab_size} contradicts {cfg_file} (vocab_size {config.vocab_size})")
    else:
        try:
            config = LlamaConfig.from_meta(cfg_file, vocab_size=vocab_size)
        except ValueError as e:
            if vocab_size is None and "pass vocab_size=" in str(e):
                raise BadInput(f"{cfg_file} leaves vocab_size to the tokenizer and there is no checkpoint to read "
                               "it from: pass --vocab-size (32000 for Llama-2)") from None
            raise
    if config.name in ("hf", "meta", "custom"):  # no name in the files: call it after its directory
        config = config.replace(name=os.path.basename(os.path.normpath(directory)) or config.name)
    return ModelSource(config, kind, path=spec, checkpoint_dir=directory if weights else None)


# Weights of this many bytes per element are counted as this dtype; only the size matters to the memory.
_DTYPE_OF_BYTES = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}


def forward_need(config: LlamaConfig, device_type: str, dtype_bytes: int, *, batch: int = 1, seqlen: int = 1,
                 start_pos: int = 0, n_runs: Optional[int] = None, attn_kernel: str = "math",
                 training: Optional[Training] = None) -> MemoryBreakdown:
    """Memory a counted forward needs on a real device of type ``device_type``, exactly (the memory algebra,
    :func:`llama_ref.memory_algebra.forward_need`): the weights (``dtype_bytes`` each), the KV cache and the
    prefill of ``start_pos`` positions when there are any, every activation at the peak; with ``training``, a
    training step (gradients and the activations kept for the backward). Activations in the compute dtype the
    model would choose on that device (:func:`llama_ref.guards.resolve_compute_dtype`)."""
    weight_dtype = _DTYPE_OF_BYTES[dtype_bytes]
    compute, _reason = resolve_compute_dtype("auto", torch.device(device_type), weight_dtype)
    train = training is not None
    return algebra_forward_need(config, device_type=device_type, weight_dtype=weight_dtype, compute_dtype=compute,
                                batch=batch, seqlen=seqlen, start_pos=0 if train else start_pos, n_runs=n_runs,
                                attn_kernel=attn_kernel, train=train, loss=training.loss if train else "cross-entropy",
                                recompute=training.recompute if train else False)


def choose_device(requested: Optional[str], source: ModelSource, dtype_bytes: int, *, batch: int = 1,
                  seqlen: int = 1, start_pos: int = 0, n_runs: Optional[int] = None,
                  attn_kernel: str = "math", training: Optional[Training] = None) -> tuple[str, str]:
    """(device, reason). ``--device`` wins; otherwise real weights load on the CPU when they fit in
    RAM, random weights only when small (counts do not depend on values), and everything else runs
    on the meta device (shapes only: seconds and well under 1 GiB even for 70B).

    The forward to count (``batch`` x ``seqlen`` after ``start_pos``, ``n_runs`` layer runs) is part of
    the decision: its activations and KV cache can outgrow the weights by far (``--batch 100000``). On a
    requested real device a forward that cannot fit is refused *before* anything is built
    (:class:`~llama_ref.errors.InsufficientMemoryError`, naming the estimate and what is available)."""
    weight_bytes = param_count(source.config) * dtype_bytes
    shape = dict(batch=batch, seqlen=seqlen, start_pos=start_pos, n_runs=n_runs, attn_kernel=attn_kernel, training=training)
    gib = 1 << 30
    if requested is not None:
        if not requested.strip():
            raise BadInput("--device is empty: use cpu, meta or cuda[:N]")
        if requested == "meta":
            return "meta", "--device meta"
        try:
            dev = torch.device(requested)
        except (RuntimeError, ValueError):
            raise BadInput(f"bad --device {requested!r}: use cpu, meta or cuda[:N]") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise BadInput(f"--device {requested}: no CUDA device available (this torch sees none)")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise BadInput(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s)")
        elif dev.type != "cpu":
            raise BadInput(f"bad --device {requested!r}: use cpu, meta or cuda[:N]")
        need = forward_need(source.config, dev.type, dtype_bytes, **shape)
        avail = available_memory_bytes(dev)
        if avail is not None and need.peak > avail:
            where = "RAM" if dev.type == "cpu" else f"free memory on {dev}"
            raise InsufficientMemoryError(
                f"--device {requested}: counting this {'training step' if training else 'forward'} needs about "
                f"{need.describe()}, but only "
                f"{format_bytes(avail)} of {where} is available; use --device meta (counts are the same)")
        return requested, f"--device {requested}"
    avail = available_memory_bytes("cpu") or 0
    need = forward_need(source.config, "cpu", dtype_bytes, **shape)
    run_bytes = need.peak - weight_bytes  # the forward's activations, KV cache, RoPE table and tokens
    if source.has_weights:
        if weight_bytes * 5 // 4 + run_bytes <= avail:
            return "cpu", f"checkpoint weights ({weight_bytes / gib:.1f} GiB) fit in available RAM ({avail / gib:.1f} GiB)"
        return "meta", (f"checkpoint weights ({weight_bytes / gib:.1f} GiB) and the forward ({run_bytes / gib:.1f} GiB) "
                        f"exceed available RAM ({avail / gib:.1f} GiB): counted on meta without loading")
    limit = min(RANDOM_INIT_MAX_BYTES, avail // 2)
    if weight_bytes <= limit and need.peak <= avail // 2:
        return "cpu", f"random weights ({weight_bytes / gib:.2f} GiB) on the CPU"
    return "meta", (f"no checkpoint, and random weights ({weight_bytes / gib:.1f} GiB, limit {limit / gib:.1f} GiB) "
                    f"plus the forward ({run_bytes / gib:.1f} GiB) are too large for the CPU: counted on meta "
                    "(shapes only)")


def build_model(source: ModelSource, *, device: str, dtype: Optional[torch.dtype], schedule, attn_kernel: str,
                seed: int = 0) -> tuple[Llama, str]:
    """The model to count, and a word on its weights."""
    if source.has_weights:
        # On meta the loader checks the files and returns a shape-only model.
        model = load_pretrained(source.checkpoint_dir, device=device, dtype=dtype, attn_kernel=attn_kernel,
                                      schedule=schedule)
        return model, ("checkpoint weights" if device != "meta" else "checkpoint not loaded (meta)")
    if dtype is None:
        # On meta nothing is stored: bf16 (as Llama-2 ships) sets the bytes reported; on a real
        # device fp32, the CPU compute dtype.
        dtype = torch.bfloat16 if device == "meta" else torch.float32
    if device == "meta":
        return Llama(source.config, schedule=schedule, device="meta", dtype=dtype, attn_kernel=attn_kernel), "no weights (meta)"
    return random_model(source.config, schedule=schedule, device=device, dtype=dtype, seed=seed,
                        attn_kernel=attn_kernel), "random weights"
