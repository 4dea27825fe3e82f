"""Hugging Face <-> Meta parameter names, and the q/k permutation HF applies for rotate-half RoPE.

HF's ``convert_llama_weights_to_hf.py`` reorders the rows of ``wq``/``wk`` so that HF's
rotate-half RoPE (pairs (j, j + head_dim/2)) computes what Meta's complex RoPE computes on
interleaved pairs (2j, 2j+1). We undo that permutation when loading, so our RoPE stays Meta's.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

import torch

from .config import LlamaConfig
from .model import Llama

_LAYER_MAP = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_MAP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")
_META_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.weight$")
# Buffers some HF versions save; derived from the config, never loaded.
HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_to_meta_key(name: str) -> Optional[str]:
    """Meta name for an HF parameter name, or None if it is not a Llama parameter."""
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    m = _HF_LAYER.match(name)
    if m and m.group(2) in _LAYER_MAP:
        return f"layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.weight"
    return None


def meta_to_hf_key(name: str) -> str:
    inverse_top = {v: k for k, v in _TOP_MAP.items()}
    if name in inverse_top:
        return inverse_top[name]
    inverse_layer = {v: k for k, v in _LAYER_MAP.items()}
    m = _META_LAYER.match(name)
    if m and m.group(2) in inverse_layer:
        return f"model.layers.{m.group(1)}.{inverse_layer[m.group(2)]}.weight"
    raise ValueError(f"{name!r} is not a Llama parameter name")


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta -> HF row order (what HF's conversion script does). ``w``: (n_heads * head_dim, dim)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF -> Meta row order: per head, rows [0..h/2) are real parts and [h/2..h) imaginary parts; interleave them."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_qk_into(out: torch.Tensor, w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``out.copy_(unpermute_qk(w, n_heads))`` in one copy (no permuted temporary); ``out`` may differ
    from ``w`` in dtype and device. ``out``: contiguous, ``w``'s shape."""
    rows, cols = w.shape
    half = rows // n_heads // 2
    # (n_heads, 2, half, cols) -> (n_heads, half, 2, cols): the interleave happens inside copy_
    out.view(n_heads, half, 2, cols).copy_(w.reshape(n_heads, 2, half, cols).transpose(1, 2))
    return out


def qk_heads(name: str, config: LlamaConfig) -> Optional[int]:
    """How many heads HF's rotate-half permutation spans in the Meta-named weight ``name``: ``n_heads``
    for wq, ``n_kv_heads`` for wk, ``None`` for any other tensor (stored in the same layout by both)."""
    if name.endswith("attention.wq.weight"):
        return config.n_heads
    if name.endswith("attention.wk.weight"):
        return config.n_kv_heads
    return None


def convert_hf_tensor(hf_name: str, tensor: torch.Tensor, config: LlamaConfig) -> tuple[str, torch.Tensor]:
    """One HF tensor -> (Meta name, tensor in Meta layout)."""
    name = hf_to_meta_key(hf_name)
    if name is None:
        raise ValueError(f"unexpected tensor {hf_name!r}: not a Llama parameter")
    heads = qk_heads(name, config)
    if heads is not None:
        tensor = unpermute_qk(tensor, heads)
    return name, tensor


def convert_meta_tensor_to_hf(name: str, tensor: torch.Tensor, config: LlamaConfig) -> tuple[str, torch.Tensor]:
    """One Meta tensor -> (HF name, tensor in HF layout)."""
    if name.endswith("attention.wq.weight"):
        tensor = permute_qk(tensor, config.n_heads)
    elif name.endswith("attention.wk.weight"):
        tensor = permute_qk(tensor, config.n_kv_heads)
    return meta_to_hf_key(name), tensor


def convert_hf_state_dict(state_dict: Mapping[str, torch.Tensor], config: LlamaConfig) -> dict[str, torch.Tensor]:
    out = {}
    for hf_name, tensor in state_dict.items():
        if hf_name.endswith(HF_IGNORED_SUFFIXES):
            continue
        name, tensor = convert_hf_tensor(hf_name, tensor, config)
        out[name] = tensor
    return out


def hf_config_dict(config: LlamaConfig) -> dict:
    """A ``config.json`` for ``transformers.LlamaConfig`` describing the same model.

    RoPE is written in the 2024 spelling (top-level ``rope_theta``, ``rope_scaling`` dict or null),
    which transformers 4.45+ and 5.x both read; ``LlamaConfig.from_hf`` reads it back unchanged.
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None if config.rope_scaling is None else config.rope_scaling.to_hf(),
        "max_position_embeddings": config.max_seq_len,
        "hidden_act": "silu",
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """``model``'s weights under HF names and in HF layout (q/k rows permuted for rotate-half RoPE).
    Tensors other than wq/wk share storage with the model (no copy). A tied head appears under both
    names, as in transformers' own ``state_dict()``."""
    out = {}
    for name, tensor in model.state_dict().items():
        hf_name, hf_tensor = convert_meta_tensor_to_hf(name, tensor.detach(), model.config)
        out[hf_name] = hf_tensor.contiguous()
    return out


def to_hf_model(model, *, attn_implementation: str = "eager"):
    """A ``transformers.LlamaForCausalLM`` computing what ``model`` computes: same weights (q/k
    permuted; all other tensors share storage), same device and weight dtype, eval mode, frozen."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_cfg = transformers.LlamaConfig(**hf_config_dict(model.config), attn_implementation=attn_implementation)
    state = hf_state_dict(model)
    dtype = state["model.embed_tokens.weight"].dtype
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_cfg)
    hf.load_state_dict(state, strict=True, assign=True)
    if model.config.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight  # assign=True set two Parameters; tie them again
    # Buffers made on "meta" (the RoPE inverse frequencies) have no data: rebuild them for real.
    hf.model.rotary_emb = LlamaRotaryEmbedding(config=hf_cfg).to(model.device)
    hf.config.dtype = dtype
    hf.requires_grad_(False)
    return hf.eval()


def from_hf_model(hf_model, *, device=None, dtype: Optional[torch.dtype] = None, **kwargs):
    """Build a :class:`~llama_ref.model.Llama` from a live ``transformers`` ``LlamaForCausalLM``
    (``llama_ref.from_hf``): weights copied, q/k rows un-permuted."""
    hf_cfg = hf_model.config.to_dict()
    config = LlamaConfig.from_hf(hf_cfg)
    state = convert_hf_state_dict(hf_model.state_dict(), config)
    first = next(iter(state.values()))
    device = first.device if device is None else torch.device(device)
    dtype = first.dtype if dtype is None else dtype
    model = Llama(config, device="meta", dtype=dtype, **kwargs)
    state = {k: v.detach().to(device=device, dtype=dtype).clone() for k, v in state.items()}
    # A tied pair arrives twice (HF's state_dict lists lm_head too); the model's load hooks check the
    # two are equal and tie them again.
    model.load_state_dict(state, strict=True, assign=True)
    model.init_buffers()
    return model


def hf_forward_with_cache(hf_model, input_ids: torch.Tensor, cache=None):
    """One cached forward of a ``transformers`` causal LM: ``(logits, cache to pass to the next call)``.

    transformers 5.x names the KV-cache argument and output field ``cache`` (``past_key_values`` is
    deprecated there, with a warning on every use, and goes in 5.40); earlier versions only know
    ``past_key_values``. The model's own signature says which it takes."""
    import inspect

    name = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"
    kwargs = {} if cache is None else {name: cache}
    out = hf_model(input_ids=input_ids, use_cache=True, **kwargs)
    return out.logits, out[name]
