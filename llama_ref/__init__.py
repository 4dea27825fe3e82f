"""llama_ref: a from-scratch, readable PyTorch reference implementation of Llama-2 (and Llama-3 shapes)."""

from .attention import ATTENTION_KERNELS, Attention, AttentionCore, KVCache, repeat_kv
from .block import TransformerBlock
from .config import PRESETS, LlamaConfig, RopeScaling, meta_ffn_hidden_dim
from .errors import DeviceUnavailableError, InsufficientMemoryError, NonFiniteError
from .generate import generate, sample_top_p
from .layers import FeedForward, GatedSiLU, Linear, RMSNorm
from .model import Llama
from .rope import RotaryEmbedding, apply_rotary_emb, precompute_freqs_cis, rope_inv_freq, scaled_inv_freq
from .schedule import (MAX_SCHEDULE_RUNS, SCHEDULE_NAMES, SCHEDULE_PRESETS, format_schedule, parse_schedule,
                       resolve_schedule)

__version__ = "0.1.0"

__all__ = [
    "ATTENTION_KERNELS", "Attention", "AttentionCore", "DeviceUnavailableError", "FeedForward", "GatedSiLU",
    "InsufficientMemoryError", "KVCache", "Linear", "Llama", "LlamaConfig", "MAX_SCHEDULE_RUNS", "NonFiniteError",
    "PRESETS", "RMSNorm", "RopeScaling", "RotaryEmbedding", "SCHEDULE_NAMES", "SCHEDULE_PRESETS",
    "TransformerBlock", "apply_rotary_emb", "format_schedule", "generate", "meta_ffn_hidden_dim",
    "parse_schedule", "precompute_freqs_cis", "repeat_kv", "resolve_schedule", "rope_inv_freq", "sample_top_p",
    "scaled_inv_freq",
]
