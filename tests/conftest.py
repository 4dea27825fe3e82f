"""Shared fixtures: small configs, deterministic random models (ours and Hugging Face's).

Nothing here touches global torch defaults (dtype, device); random weights come from explicit
``torch.Generator`` objects, and Hugging Face's initialiser (which uses the global RNG) runs
inside ``torch.random.fork_rng`` so it cannot leak RNG state into other tests.
"""

from __future__ import annotations

from typing import Callable, Optional

import pytest
import torch

from llama_ref import Llama, LlamaConfig

# 32 layers (so every schedule preset applies) at a width that keeps a forward pass cheap.
# Randomize it with gain <= 1: at gain 1.5 the 32 layers amplify fp32 rounding (different matmul
# shapes in cached vs full passes) to ~1.5e-5 in the logits, at 1.0 it stays below ~4e-6.
DEEP_TINY = LlamaConfig(name="deep-tiny", dim=32, n_layers=32, n_heads=4, n_kv_heads=2, vocab_size=64,
                        hidden_dim=48, max_seq_len=64)


def randomize_(model: Llama, seed: int = 0, gain: float = 1.5) -> Llama:
    """Overwrite every parameter with reproducible random values, in place.

    The defaults of ``nn.Linear``/``nn.Embedding`` would do for most checks, but the norm weights
    start at exactly 1, which would hide a swapped ``attention_norm``/``ffn_norm``; and a wider q/k
    spread makes attention clearly non-uniform, so position mistakes (RoPE, masks, caches) show up.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                values = 1.0 + 0.2 * torch.randn(p.shape, generator=gen)
            elif name == "tok_embeddings.weight":
                values = torch.randn(p.shape, generator=gen)
            else:
                # gain / sqrt(fan_in): outputs of order `gain` whatever the width (weights are (out, in)).
                values = torch.randn(p.shape, generator=gen) * (gain * p.shape[1] ** -0.5)
            p.copy_(values.to(p.dtype))
    return model


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tests with one intra-op thread, restoring the previous count afterwards.

    These tests run thousands of tiny ops; with 2 OpenMP threads each op pays a fork/join, and when
    other processes share the 2 cores the barrier waits make a 32-layer dim-32 forward 10-50x slower.
    Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def tiny_config() -> LlamaConfig:
    """The ``tiny`` preset: dim 64, 4 layers, 4 query heads sharing 2 kv heads."""
    return LlamaConfig.from_preset("tiny")


@pytest.fixture
def deep_tiny_config() -> LlamaConfig:
    return DEEP_TINY


@pytest.fixture
def make_model() -> Callable[..., Llama]:
    """Factory: ``make_model(config, seed=0, gain=1.5, **Llama_kwargs)`` -> a randomized model in eval mode."""

    def _make(config: LlamaConfig, seed: int = 0, gain: float = 1.5, **kwargs) -> Llama:
        return randomize_(Llama(config, **kwargs), seed, gain).eval()

    return _make


@pytest.fixture
def tiny_model(tiny_config, make_model) -> Llama:
    return make_model(tiny_config)


def build_hf_llama(*, hidden_size: int = 64, intermediate_size: int = 176, num_hidden_layers: int = 3,
                   num_attention_heads: int = 4, num_key_value_heads: Optional[int] = 2, vocab_size: int = 256,
                   rope_theta: float = 10000.0, rms_norm_eps: float = 1e-6, initializer_range: float = 0.2,
                   max_position_embeddings: int = 128, attn_implementation: str = "eager", seed: int = 0,
                   randomize_norms: bool = True, rope_scaling: Optional[dict] = None, head_dim: Optional[int] = None,
                   tie_word_embeddings: bool = False):
    """A random-init ``transformers.LlamaForCausalLM`` in fp32, eval mode.

    ``initializer_range`` defaults to 0.2 (HF uses 0.02): with 0.02 at these widths q.k is ~0 and
    attention is nearly uniform, so a wrong RoPE or mask would barely move the logits. Norm weights
    are randomized too, otherwise input/post-attention norm mix-ups would be invisible.
    ``rope_scaling`` (2024 spelling, next to ``rope_theta``), ``head_dim`` and ``tie_word_embeddings``
    are passed to ``transformers.LlamaConfig`` as given.
    """
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads, vocab_size=vocab_size,
        rope_theta=rope_theta, rms_norm_eps=rms_norm_eps, initializer_range=initializer_range,
        max_position_embeddings=max_position_embeddings, attn_implementation=attn_implementation,
        tie_word_embeddings=tie_word_embeddings, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        **({} if rope_scaling is None else {"rope_scaling": dict(rope_scaling)}),
        **({} if head_dim is None else {"head_dim": head_dim}),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(cfg)
        if randomize_norms:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith("norm.weight"):
                        p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model.float().eval()


@pytest.fixture
def hf_llama_factory() -> Callable[..., "object"]:
    """Factory fixture around :func:`build_hf_llama` (keyword arguments as there)."""
    return build_hf_llama
