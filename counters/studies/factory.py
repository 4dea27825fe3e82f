"""Models for the studies: random weights made directly on a device, and timing one of a given shape."""

from __future__ import annotations

from typing import Optional

import torch

from llama_ref.config import LlamaConfig
from llama_ref.memory import available_memory_bytes
from llama_ref.memory_algebra import MemoryRequest, cyclic_schedule, memory
from llama_ref.model import Llama
from llama_ref.schedule import resolve_schedule

from .timing import Timing, time_forward

def random_model(config: LlamaConfig, *, schedule=None, device="cpu", dtype=torch.float32, seed: int = 0,
                 attn_kernel: str = "math", compute_dtype: Optional[torch.dtype] = None, std: float = 0.02):
    """A model with random weights made directly on ``device`` (no CPU detour, no default init):
    N(0, std) matrices, norm weights 1 + N(0, 0.1) so that swapped norms would show."""
    model = Llama(config, schedule=schedule, device="meta", dtype=dtype, attn_kernel=attn_kernel,
                  compute_dtype=compute_dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # RMSNorm weights
                p.normal_(1.0, 0.1, generator=gen)
            else:
                p.normal_(0.0, std, generator=gen)
    model.requires_grad_(False)
    model.init_buffers()
    model.eval()
    return model


def estimate_forward_memory(config: LlamaConfig, *, batch: int, seqlen: int, start_pos: int, n_runs: int,
                            dtype_bytes: int, attn_kernel: str = "math", device_type: str = "cpu") -> int:
    """Bytes :func:`measure` needs at its peak, exactly (the memory algebra): the weights, a KV cache of
    ``start_pos + seqlen`` positions, and the larger of the prefill's and the timed forward's activations;
    activations in the weight dtype, as :func:`measure` builds the model."""
    dtype = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}[dtype_bytes]
    common = dict(batch=batch, weight_dtype=dtype, compute_dtype=dtype, attn_kernel=attn_kernel, device_type=device_type,
                  schedule=cyclic_schedule(config.n_layers, n_runs), cache_positions=start_pos + seqlen)
    peak = memory(MemoryRequest(config, seqlen=seqlen, start_pos=start_pos, **common)).peak
    if start_pos:  # the prefill that fills the cache first
        peak = max(peak, memory(MemoryRequest(config, seqlen=start_pos, **common)).peak)
    return peak


MEASURE_HINT = ("measure fewer layers of the same shape with --layers K (every decoder layer costs the same), a smaller "
                "--batch or --tokens, or drop --measure to get the prediction alone")


def check_measure_memory(config: LlamaConfig, *, device, dtype: torch.dtype, batch: int, seqlen: int,
                         start_pos: int, schedule=None, attn_kernel: str = "math", hint: str = MEASURE_HINT) -> None:
    """Refuse (``MemoryError`` naming the estimate, the memory available and the way out) a :func:`measure`
    that cannot fit on ``device``. Cheap: call it before any other work."""
    device = torch.device(device)
    n_runs = len(resolve_schedule(schedule, config.n_layers))
    need = estimate_forward_memory(config, batch=batch, seqlen=seqlen, start_pos=start_pos, n_runs=n_runs,
                                   dtype_bytes=dtype.itemsize, attn_kernel=attn_kernel,
                                   device_type="cuda" if device.type == "cuda" else "cpu")
    avail = available_memory_bytes(device)
    if avail is not None and need > 0.9 * avail:
        raise MemoryError(
            f"measuring {config.name} ({config.n_layers} layers) in {dtype} on {device} with batch {batch}, "
            f"{seqlen} new + {start_pos} cached tokens needs about {need / 2**30:.1f} GiB but {avail / 2**30:.1f} GiB "
            f"are available; {hint}"
        )


def measure(config: LlamaConfig, *, device, dtype: torch.dtype, batch: int, seqlen: int, start_pos: int,
            schedule=None, attn_kernel: str = "math", warmup: int = 1, repeats: int = 3, level: str = "layer",
            seed: int = 0, check_memory: bool = True) -> Timing:
    """Build a random-weight model on ``device`` and time one forward of the requested shape."""
    device = torch.device(device)
    if check_memory:
        check_measure_memory(config, device=device, dtype=dtype, batch=batch, seqlen=seqlen, start_pos=start_pos,
                             schedule=schedule, attn_kernel=attn_kernel)
    model = random_model(config, schedule=schedule, device=device, dtype=dtype, seed=seed, attn_kernel=attn_kernel,
                         compute_dtype=dtype)
    model.setup_cache(batch, start_pos + seqlen)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    tokens = torch.randint(0, config.vocab_size, (batch, seqlen), generator=gen).to(device)
    if start_pos:  # a real prefix: the cache refuses to decode after positions never written
        prefix = torch.randint(0, config.vocab_size, (batch, start_pos), generator=gen).to(device)
        with torch.inference_mode():
            model(prefix, 0)
    try:
        return time_forward(model, tokens, start_pos, warmup=warmup, repeats=repeats, level=level)
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
