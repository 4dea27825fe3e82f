"""llama_ref: a from-scratch, readable PyTorch reference implementation of Llama-2 (and Llama-3 shapes).

    import llama_ref
    model = llama_ref.load("path/to/checkpoint")          # HF safetensors/.bin or Meta consolidated.*.pth
    model = llama_ref.Llama.from_preset("llama-2-7b", device="meta")   # shapes only, no memory
    llama_ref.check_inputs(model, tokens)                 # every check of a request, once
    logits = model(tokens)                                # (bsz, seqlen, vocab_size) fp32
"""

from .config import PRESETS, LlamaConfig, RopeScaling, meta_ffn_hidden_dim
from .errors import DeviceUnavailableError, InsufficientMemoryError, NonFiniteError
from .generate import generate, sample_top_p
from .guards import ATTENTION_KERNELS, check_inputs, mark_cache_filled
from .hf import from_hf_model as from_hf
from .loading import load_pretrained as load
from .model import (Attention, AttentionCore, FeedForward, GatedSiLU, KVCache, Linear, Llama, RMSNorm,
                    RotaryEmbedding, TransformerBlock, apply_rotary_emb, precompute_freqs_cis, repeat_kv,
                    rope_inv_freq, scaled_inv_freq)
from .schedule import (MAX_SCHEDULE_RUNS, SCHEDULE_NAMES, SCHEDULE_PRESETS, format_schedule, parse_schedule,
                       resolve_schedule)
from .shapes import param_count

__version__ = "0.1.0"

__all__ = [
    "ATTENTION_KERNELS", "Attention", "AttentionCore", "DeviceUnavailableError", "FeedForward", "GatedSiLU",
    "InsufficientMemoryError", "KVCache", "Linear", "Llama", "LlamaConfig", "MAX_SCHEDULE_RUNS", "NonFiniteError",
    "PRESETS", "RMSNorm", "RopeScaling", "RotaryEmbedding", "SCHEDULE_NAMES", "SCHEDULE_PRESETS",
    "TransformerBlock", "apply_rotary_emb", "check_inputs", "format_schedule", "from_hf", "generate", "load",
    "mark_cache_filled", "meta_ffn_hidden_dim", "param_count", "parse_schedule", "precompute_freqs_cis",
    "repeat_kv", "resolve_schedule", "rope_inv_freq", "sample_top_p", "scaled_inv_freq",
]
