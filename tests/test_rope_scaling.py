"""RoPE scaling (frequency tables bit-identical to transformers, the llama3 regimes by an independent
float64 formula) and the RoPE table that grows on demand (reserve_positions)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import llama_ref.model as model_module
from llama_ref import Llama, LlamaConfig, RopeScaling, precompute_freqs_cis, rope_inv_freq
from llama_ref.shapes import ROPE_EAGER_POSITIONS

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-4


# ---------------------------------------------------------------- frequencies
def _hf_config(head_dim: int, theta: float, scaling: RopeScaling):
    """A minimal object with what transformers' RoPE init functions read."""
    params = {"rope_theta": theta, **scaling.to_hf()}
    return SimpleNamespace(rope_parameters=params, head_dim=head_dim, hidden_size=head_dim, num_attention_heads=1,
                           standardize_rope_params=lambda: None, max_position_embeddings=131072)


CASES = [
    (128, 500000.0, RopeScaling.llama3(factor=8.0)),  # Llama 3.1 / 3.3
    (64, 500000.0, RopeScaling.llama3(factor=32.0)),  # Llama 3.2 1B
    (128, 500000.0, RopeScaling.llama3(factor=32.0)),  # Llama 3.2 3B
    (32, 2500.0, RopeScaling.llama3(factor=4.0, high_freq_factor=2.0, original_max_position_embeddings=16)),
    (16, 10000.0, RopeScaling.linear(4.0)),
    (128, 1e6, RopeScaling.linear(2.5)),
]


@pytest.mark.parametrize("head_dim, theta, scaling", CASES)
def test_inv_freq_bit_identical_to_transformers(head_dim, theta, scaling):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    expected, attention_factor = ROPE_INIT_FUNCTIONS[scaling.rope_type](_hf_config(head_dim, theta, scaling), "cpu")
    assert attention_factor == 1.0  # neither type rescales attention: the complex table stays unit-modulus
    assert torch.equal(rope_inv_freq(head_dim, theta, scaling), expected)


def _llama3_float64(head_dim: int, theta: float, s: RopeScaling) -> torch.Tensor:
    """llama3 scaling written from its definition, per frequency, in float64."""
    out = []
    for k in range(head_dim // 2):
        f = theta ** (-2 * k / head_dim)
        wavelen = 2 * math.pi / f
        if wavelen < s.original_max_position_embeddings / s.high_freq_factor:
            out.append(f)  # high frequency: unchanged
        elif wavelen > s.original_max_position_embeddings / s.low_freq_factor:
            out.append(f / s.factor)  # low frequency: interpolated
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor)
            out.append((1 - smooth) * f / s.factor + smooth * f)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("head_dim, theta, scaling", [c for c in CASES if c[2].rope_type == "llama3"])
def test_llama3_matches_its_definition(head_dim, theta, scaling):
    ours = rope_inv_freq(head_dim, theta, scaling).double()
    expected = _llama3_float64(head_dim, theta, scaling)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)
    plain = rope_inv_freq(head_dim, theta).double()
    ratio = plain / ours
    # All three regimes occur: kept (ratio 1), divided by factor, and strictly in between.
    assert (ratio == 1).any() and torch.isclose(ratio, torch.tensor(scaling.factor, dtype=torch.float64)).any()
    assert ((ratio > 1.001) & (ratio < scaling.factor * 0.999)).any()


def test_linear_is_position_interpolation():
    s = RopeScaling.linear(4.0)
    table = precompute_freqs_cis(16, 40, 10000.0, scaling=s)
    plain = precompute_freqs_cis(16, 160, 10000.0)
    # Position p with factor 4 rotates like position p / 4 without scaling.
    torch.testing.assert_close(table[0:40:4], plain[0:10], atol=1e-6, rtol=0)


def test_meta_llama31_defaults():
    # Meta's apply_scaling: scale_factor 8, low_freq_factor 1, high_freq_factor 4, old_context_len 8192.
    assert RopeScaling.llama3() == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    c = LlamaConfig.from_meta({"dim": 4096, "n_layers": 1, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                               "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5,
                               "rope_theta": 500000.0, "use_scaled_rope": True})
    assert c.rope_scaling == RopeScaling.llama3()


# ---------------------------------------------------------------- the table grows on demand
def test_table_starts_small_and_grows_geometrically(tiny_config):
    c = tiny_config.replace(max_seq_len=20000)
    model = Llama(c)
    assert model.rope_positions == ROPE_EAGER_POSITIONS == model.freqs_cis.shape[0]
    model.reserve_positions(100)  # already covered: nothing happens
    assert model.rope_positions == 4096
    model.reserve_positions(4097)
    assert model.rope_positions == 8192 == model.freqs_cis.shape[0]  # next power of two
    model.reserve_positions(9000)
    assert model.rope_positions == 16384
    model.reserve_positions(16385)
    assert model.rope_positions == 20000  # capped at max_seq_len
    # Bit-identical to the table built in one go.
    full = precompute_freqs_cis(c.head_dim, 20000, c.rope_theta)
    assert torch.equal(model.freqs_cis, full)
    # A small max_seq_len is built whole at once.
    assert Llama(tiny_config).rope_positions == tiny_config.max_seq_len == 128


def test_reserve_positions_is_idempotent_and_refuses_bad_ends(tiny_config):
    model = Llama(tiny_config.replace(max_seq_len=10000))
    table = model.freqs_cis
    for end in (0, 1, 4096):
        model.reserve_positions(end)
        assert model.freqs_cis is table  # no rebuild
    with pytest.raises(ValueError, match="cannot reserve RoPE positions up to 10001: the model's max_seq_len is 10000"):
        model.reserve_positions(10001)
    for bad in (-1, 1.5, "9", True, None):
        with pytest.raises(ValueError, match="end must be a non-negative int"):
            model.reserve_positions(bad)
    assert model.freqs_cis is table


def test_forward_does_no_table_work_when_the_table_is_long_enough(tiny_config, make_model, monkeypatch):
    model = make_model(tiny_config.replace(max_seq_len=6000))
    calls = []
    real = model_module.precompute_freqs_cis
    monkeypatch.setattr(model_module, "precompute_freqs_cis", lambda *a, **k: calls.append(a) or real(*a, **k))
    tokens = torch.randint(0, tiny_config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    model.setup_cache(1, 5000)  # the cache's length is reserved up front (table: 6000 = min(8192, max_seq_len))
    assert model.rope_positions == 6000 and len(calls) == 1
    with torch.inference_mode():
        model(tokens)
        for p in range(8, 12):
            model(tokens[:, :1], start_pos=p)
    assert len(calls) == 1  # forward did no table work
    model.clear_cache()


def test_forward_grows_the_table_and_equals_the_whole_table(tiny_config, make_model):
    """A forward past the table grows it (no cache: a 4100-token prompt), with the same logits as a
    model whose table was reserved whole beforehand."""
    c = tiny_config.replace(max_seq_len=5000, n_layers=1)
    grown, whole = make_model(c), make_model(c)
    whole.reserve_positions(5000)
    assert grown.rope_positions == 4096 and whole.rope_positions == 5000
    tokens = torch.randint(0, c.vocab_size, (1, 4100), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = grown(tokens), whole(tokens)
    assert grown.rope_positions == 5000  # next power of two (8192) capped at max_seq_len
    assert torch.equal(a, b)


def test_huge_max_seq_len_runs_a_short_forward(tiny_config, make_model):
    """Issue 8: max_position_embeddings 2**31 - 1 used to allocate an 8.6 GB table eagerly."""
    c = tiny_config.replace(max_seq_len=2**31 - 1, rope_scaling=RopeScaling.llama3(original_max_position_embeddings=64))
    model = make_model(c)
    assert model.freqs_cis.numel() == ROPE_EAGER_POSITIONS * c.head_dim // 2  # 4096 x 8 entries, 256 KiB
    tokens = torch.randint(0, c.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
    model.setup_cache(2, 12)
    with torch.no_grad():
        steps = torch.cat([model(tokens[:, :5])] + [model(tokens[:, p:p + 1], start_pos=p) for p in range(5, 12)], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)
    assert model.rope_positions == 4096
    on_meta = Llama(c, device="meta")
    assert on_meta.freqs_cis.is_meta and on_meta(torch.zeros(1, 3, dtype=torch.long, device="meta")).shape == (1, 3, 256)


def test_conversions_keep_the_reserved_length_and_complex64(tiny_config, make_model):
    model = make_model(tiny_config.replace(max_seq_len=9000))
    model.reserve_positions(5000)
    model.to(torch.bfloat16)
    assert model.rope_positions == 8192 and model.freqs_cis.shape == (8192, 8) and model.freqs_cis.dtype == torch.complex64
    model.float()
    assert torch.equal(model.freqs_cis, precompute_freqs_cis(16, 8192, tiny_config.rope_theta))
    empty = Llama(tiny_config.replace(max_seq_len=9000), device="meta")
    empty.reserve_positions(6000)
    empty.to_empty(device="cpu")
    assert empty.freqs_cis.device.type == "cpu" and empty.freqs_cis.shape == (8192, 8)


def test_table_built_in_inference_mode_works_with_autograd(tiny_config, make_model):
    model = make_model(tiny_config.replace(max_seq_len=9000))
    with torch.inference_mode():
        model.reserve_positions(5000)  # grown inside inference mode ...
    assert not model.freqs_cis.is_inference()
    tokens = torch.randint(0, tiny_config.vocab_size, (1, 6))
    model(tokens).sum().backward()  # ... and still usable in a forward that records autograd
    assert model.output.weight.grad is not None


# ---------------------------------------------------------------- scaling matters: the checks can fail
def test_dropping_or_changing_the_scaling_changes_the_logits(tiny_config, make_model):
    scaled = tiny_config.replace(rope_scaling=RopeScaling.llama3(factor=8.0, original_max_position_embeddings=16))
    ref = make_model(scaled)
    tokens = torch.randint(0, scaled.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(tokens)
        for wrong in (None, RopeScaling.llama3(factor=4.0, original_max_position_embeddings=16),
                      RopeScaling.linear(8.0)):
            other = make_model(scaled.replace(rope_scaling=wrong))
            assert (other(tokens) - expected).abs().max().item() > 10 * ATOL, wrong
