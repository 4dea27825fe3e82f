"""The model: output contract, KV-cache decoding == full forward, kernels agree, RoPE/GQA/mask properties,
and clear errors for bad input."""

from __future__ import annotations

import math

import pytest
import torch

from llama_ref import Llama, apply_rotary_emb, precompute_freqs_cis, repeat_kv
from llama_ref.attention import KVCache

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-5


def _tokens(bsz: int, seqlen: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (bsz, seqlen), generator=torch.Generator().manual_seed(seed))


def _cached_logits(model: Llama, tokens: torch.Tensor, prefill: int, chunk: int = 1) -> torch.Tensor:
    """Prefill ``prefill`` tokens, then feed the rest ``chunk`` tokens at a time; concatenated logits."""
    bsz, seqlen = tokens.shape
    model.setup_cache(bsz, seqlen)
    outs = [model(tokens[:, :prefill], start_pos=0)]  # (bsz, prefill, vocab)
    for pos in range(prefill, seqlen, chunk):
        outs.append(model(tokens[:, pos : pos + chunk], start_pos=pos))  # (bsz, <=chunk, vocab)
    model.clear_cache()
    return torch.cat(outs, dim=1)  # (bsz, seqlen, vocab)


# ---------------------------------------------------------------- output contract
def test_forward_returns_fp32_logits(tiny_model, tiny_config):
    tokens = _tokens(2, 7, tiny_config.vocab_size)
    logits = tiny_model(tokens)
    assert logits.shape == (2, 7, tiny_config.vocab_size)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    # The logits are not degenerate (otherwise every equality test below would be vacuous).
    assert logits.std() > 0.5
    assert torch.equal(tiny_model(tokens.to(torch.int32)), logits)


def test_causal_and_batch_independent(tiny_model, tiny_config):
    tokens = _tokens(3, 10, tiny_config.vocab_size)
    logits = tiny_model(tokens)
    # Changing a later token must not change earlier positions (causal mask) ...
    changed = tokens.clone()
    changed[:, 6] = (changed[:, 6] + 1) % tiny_config.vocab_size
    logits2 = tiny_model(changed)
    torch.testing.assert_close(logits2[:, :6], logits[:, :6], atol=ATOL, rtol=0)
    assert (logits2[:, 6:] - logits[:, 6:]).abs().max() > 1e-2
    # ... and rows of a batch do not see each other.
    torch.testing.assert_close(tiny_model(tokens[1:2]), logits[1:2], atol=ATOL, rtol=0)


# ---------------------------------------------------------------- cache == full forward
@pytest.mark.parametrize("kernel", ["math", "sdpa"])
@pytest.mark.parametrize("bsz, prefill", [(1, 1), (1, 5), (3, 4), (3, 11)])
def test_cached_decoding_matches_full_forward(tiny_config, make_model, kernel, bsz, prefill):
    model = make_model(tiny_config, attn_kernel=kernel)
    tokens = _tokens(bsz, 12, tiny_config.vocab_size, seed=bsz)
    full = model(tokens)
    cached = _cached_logits(model, tokens, prefill)
    assert cached.shape == full.shape
    torch.testing.assert_close(cached, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kernel", ["math", "sdpa"])
def test_chunked_prefill_matches_full_forward(tiny_config, make_model, kernel):
    # Multi-token steps at start_pos > 0 use the rectangular (seqlen, start_pos + seqlen) mask.
    model = make_model(tiny_config, attn_kernel=kernel)
    tokens = _tokens(2, 13, tiny_config.vocab_size, seed=3)
    torch.testing.assert_close(_cached_logits(model, tokens, prefill=3, chunk=4), model(tokens), atol=ATOL, rtol=0)


def test_cache_larger_than_needed_and_smaller_batch(tiny_model, tiny_config):
    tokens = _tokens(2, 9, tiny_config.vocab_size, seed=4)
    full = tiny_model(tokens)
    tiny_model.setup_cache(max_batch_size=5, max_seq_len=40)
    outs = [tiny_model(tokens[:, :4])]
    outs += [tiny_model(tokens[:, p : p + 1], start_pos=p) for p in range(4, 9)]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=ATOL, rtol=0)


def test_cache_is_one_slot_per_schedule_run_and_fills(tiny_model, tiny_config):
    tiny_model.setup_cache(2, 16)
    assert len(tiny_model.caches) == len(tiny_model.schedule)
    assert len({id(c) for c in tiny_model.caches}) == len(tiny_model.caches)
    tiny_model(_tokens(2, 6, tiny_config.vocab_size))
    for cache in tiny_model.caches:
        assert cache.cache_k[:, :6].abs().sum() > 0 and cache.cache_k[:, 6:].abs().sum() == 0
    # Caches are runtime state: never in a checkpoint.
    assert not any("cache" in k for k in tiny_model.state_dict())


# ---------------------------------------------------------------- kernels
def test_math_and_sdpa_kernels_agree(tiny_config, make_model):
    tokens = _tokens(2, 16, tiny_config.vocab_size, seed=5)
    math_logits = make_model(tiny_config, attn_kernel="math")(tokens)
    sdpa_logits = make_model(tiny_config, attn_kernel="sdpa")(tokens)
    torch.testing.assert_close(sdpa_logits, math_logits, atol=ATOL, rtol=0)


def test_bad_constructor_arguments(tiny_config):
    with pytest.raises(ValueError, match="unknown attention kernel 'flash'"):
        Llama(tiny_config, attn_kernel="flash")
    with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype, got torch.int64"):
        Llama(tiny_config, dtype=torch.int64)
    with pytest.raises(ValueError, match="compute_dtype must be a floating-point torch.dtype, got 'fp32'"):
        Llama(tiny_config, compute_dtype="fp32")
    with pytest.raises(ValueError, match="device='nope' is not a valid torch device"):
        Llama(tiny_config, device="nope")


# ---------------------------------------------------------------- RoPE and GQA building blocks
def test_rope_is_meta_interleaved_rotation():
    """Channels (2j, 2j+1) rotate by angle pos * theta^(-2j/head_dim): checked against explicit cos/sin."""
    head_dim, seqlen, theta = 8, 5, 500.0
    gen = torch.Generator().manual_seed(0)
    xq = torch.randn(2, seqlen, 3, head_dim, generator=gen)
    xk = torch.randn(2, seqlen, 1, head_dim, generator=gen)
    rq, rk = apply_rotary_emb(xq, xk, precompute_freqs_cis(head_dim, seqlen, theta))
    pos = torch.arange(seqlen, dtype=torch.float64)[None, :, None, None]  # (1, seqlen, 1, 1)
    j = torch.arange(head_dim // 2, dtype=torch.float64)
    angle = pos * theta ** (-2 * j / head_dim)  # (1, seqlen, 1, head_dim // 2)
    x0, x1 = xq[..., 0::2].double(), xq[..., 1::2].double()
    expected = torch.stack([x0 * angle.cos() - x1 * angle.sin(), x0 * angle.sin() + x1 * angle.cos()], -1)
    torch.testing.assert_close(rq.double(), expected.flatten(3), atol=1e-5, rtol=0)
    assert rk.shape == xk.shape and rq.dtype == xq.dtype


def test_rope_scores_depend_only_on_relative_position():
    head_dim = 16
    freqs = precompute_freqs_cis(head_dim, 40)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 1, head_dim, generator=gen)
    k = torch.randn(1, 1, 1, head_dim, generator=gen)

    def score(m, n):
        rq, _ = apply_rotary_emb(q, q, freqs[m : m + 1])
        rk, _ = apply_rotary_emb(k, k, freqs[n : n + 1])
        return float((rq * rk).sum())

    assert math.isclose(score(3, 1), score(30, 28), abs_tol=1e-4)
    assert not math.isclose(score(3, 1), score(3, 2), abs_tol=1e-2)


def test_repeat_kv_matches_repeat_interleave():
    x = torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(repeat_kv(x, 4), torch.repeat_interleave(x, repeats=4, dim=2))
    assert repeat_kv(x, 1) is x


def test_kv_cache_update_returns_prefix():
    cache = KVCache(max_batch_size=3, max_seq_len=8, n_kv_heads=2, head_dim=4)
    k1, v1 = torch.ones(2, 3, 2, 4), 2 * torch.ones(2, 3, 2, 4)
    keys, values = cache.update(0, k1, v1)
    assert keys.shape == (2, 3, 2, 4) and torch.equal(values, v1)
    keys, values = cache.update(3, 3 * torch.ones(2, 1, 2, 4), 4 * torch.ones(2, 1, 2, 4))
    assert keys.shape == (2, 4, 2, 4) and torch.equal(keys[:, :3], k1) and torch.equal(keys[:, 3], 3 * torch.ones(2, 2, 4))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "tokens, match",
    [
        (torch.tensor([[1, 2, 256]]), "token id 256 is outside the vocabulary \\[0, 256\\)"),
        (torch.tensor([[1, -3, 2]]), "token id -3 is outside the vocabulary"),
        (torch.zeros(0, 4, dtype=torch.long), "empty input: tokens has shape \\(0, 4\\)"),
        (torch.zeros(2, 0, dtype=torch.long), "empty input: tokens has shape \\(2, 0\\)"),
        (torch.tensor([1, 2, 3]), "shape \\(bsz, seqlen\\), got shape \\(3,\\)"),
        (torch.tensor([[1.0, 2.0]]), "integer ids .*got torch.float32"),
        ([[1, 2]], "LongTensor .*got list"),
        (torch.zeros(1, 129, dtype=torch.long), "sequence end 129 .*exceeds max_seq_len=128"),
        (torch.zeros(1, 3, dtype=torch.long, device="meta"), "tokens are on device meta but the model is on cpu"),
    ],
)
def test_bad_tokens(tiny_model, tokens, match):
    with pytest.raises(ValueError, match=match):
        tiny_model(tokens)


def test_bad_start_pos_and_cache_limits(tiny_model):
    t = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="start_pos=2 needs a KV cache"):
        tiny_model(t, start_pos=2)
    with pytest.raises(ValueError, match="start_pos must be a non-negative int, got -1"):
        tiny_model(t, start_pos=-1)
    with pytest.raises(ValueError, match="start_pos must be a non-negative int, got 1.0"):
        tiny_model(t, start_pos=1.0)
    tiny_model.setup_cache(max_batch_size=2, max_seq_len=10)
    with pytest.raises(ValueError, match="batch size 3 exceeds the cache's max_batch_size=2"):
        tiny_model(torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="sequence end 11 exceeds the cache's max_seq_len=10"):
        tiny_model(t, start_pos=8)
    with pytest.raises(ValueError, match="sequence end 129 .*exceeds max_seq_len=128"):
        tiny_model(t, start_pos=126)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_batch_size": 0}, "max_batch_size must be a positive int, got 0"),
        ({"max_batch_size": 2.0}, "max_batch_size must be a positive int, got 2.0"),
        ({"max_batch_size": 1, "max_seq_len": -4}, "max_seq_len must be a positive int, got -4"),
        ({"max_batch_size": 1, "max_seq_len": 129}, "cache max_seq_len=129 exceeds the model's max_seq_len=128"),
    ],
)
def test_bad_setup_cache(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_model.setup_cache(**kwargs)
