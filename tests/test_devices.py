"""Devices and dtypes: 70B on the meta device, bf16/fp16 weights with fp32 compute on CPU, dtype
conversions that must not corrupt the RoPE table, and CUDA checks (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

import llama_ref
from llama_ref import Llama, generate

pytestmark = pytest.mark.usefixtures("single_thread")

_skip_without_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def requires_cuda(test):
    """Mark a test ``cuda`` (select with ``-m cuda``) and skip it cleanly without a GPU."""
    return pytest.mark.cuda(_skip_without_cuda(test))


@pytest.fixture
def no_tf32():
    """TF32 matmuls round inputs to 10 mantissa bits (~1e-3): fp32 parity would be meaningless with them.
    Off by default in torch, but an environment may turn them on; restore whatever was set."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _tokens(bsz, seqlen, vocab, seed=0, device="cpu"):
    return torch.randint(0, vocab, (bsz, seqlen), generator=torch.Generator().manual_seed(seed)).to(device)


def _rounded_fp32_copy(model: Llama, dtype: torch.dtype, make_model, config) -> Llama:
    """An fp32 model holding exactly the values of ``model``'s weights rounded to ``dtype``."""
    ref = make_model(config)
    with torch.no_grad():
        for p_ref, p in zip(ref.parameters(), model.parameters()):
            p_ref.copy_(p.to(dtype).float())
    return ref


# ---------------------------------------------------------------- meta device
def test_70b_forward_on_meta():
    model = Llama.from_preset("llama-2-70b", device="meta", dtype=torch.bfloat16)
    assert all(p.is_meta for p in model.parameters())  # no weight memory at all
    assert model.freqs_cis.is_meta
    tokens = torch.zeros(2, 16, dtype=torch.long, device="meta")
    # Meta tensors have no data: any data-dependent Python (.item(), int(t), bool(t)) would raise here.
    logits = model(tokens)
    assert logits.shape == (2, 16, 32000) and logits.dtype == torch.float32 and logits.is_meta
    model.setup_cache(max_batch_size=2, max_seq_len=32)
    assert all(c.cache_k.is_meta for c in model.caches)
    model(tokens)
    step = model(tokens[:, :1], start_pos=16)
    assert step.shape == (2, 1, 32000)
    # Shape checks still apply without data.
    with pytest.raises(ValueError, match="sequence end 33 exceeds the cache's max_seq_len=32"):
        model(tokens[:, :2], start_pos=31)


def test_data_dependent_python_is_impossible_on_meta():
    # The premise of the test above: meta tensors refuse to produce Python values.
    with pytest.raises(Exception):
        int(torch.zeros(1, device="meta"))


def test_meta_to_empty_then_load(tiny_model, tiny_config):
    model = Llama(tiny_config, device="meta")
    model.to_empty(device="cpu")  # the RoPE table is rebuilt for the new device by Llama._apply
    model.load_state_dict(tiny_model.state_dict())
    tokens = _tokens(2, 8, tiny_config.vocab_size)
    torch.testing.assert_close(model(tokens), tiny_model(tokens), atol=0, rtol=0)


# ---------------------------------------------------------------- dtypes on CPU
@pytest.fixture
def cpu_without_native_low_precision(monkeypatch):
    """An AVX2-only CPU (bf16/fp16 matmuls emulated): "auto" upcasts to fp32, whatever this machine has."""
    from llama_ref import compute_dtype

    monkeypatch.setattr(compute_dtype, "cpu_native", lambda dtype: (False, "no AMX-BF16 or AVX512-BF16 (mocked)"))


@pytest.fixture
def cpu_with_native_low_precision(monkeypatch):
    """A CPU with AMX (bf16 and fp16 matmuls native through oneDNN), whatever this machine has."""
    from llama_ref import compute_dtype

    monkeypatch.setattr(compute_dtype, "cpu_native", lambda dtype: (True, "this CPU has AMX (mocked)"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_weights_compute_in_fp32_on_a_cpu_without_native_matmuls(
        tiny_config, make_model, dtype, cpu_without_native_low_precision):
    fp32_model = make_model(tiny_config)
    model = make_model(tiny_config, dtype=dtype)
    assert model.tok_embeddings.weight.dtype == dtype and model.compute_dtype == torch.float32
    if dtype != torch.float32:
        assert "mocked" in model.compute_dtype_reason and "upcast" in model.compute_dtype_reason
    ref = _rounded_fp32_copy(model, dtype, make_model, tiny_config)
    tokens = _tokens(2, 10, tiny_config.vocab_size)
    logits = model(tokens)
    assert logits.dtype == torch.float32
    # Same rounded weights, same fp32 arithmetic: the same logits.
    torch.testing.assert_close(logits, ref(tokens), atol=1e-5, rtol=0)
    if dtype != torch.float32:
        # ... and the rounding is visible but small against the unrounded model.
        diff = (logits - fp32_model(tokens)).abs().max()
        assert 0 < diff < 0.5
    # The KV cache follows the compute dtype, and cached decoding still matches.
    model.setup_cache(2, 10)
    assert model.caches[0].cache_k.dtype == torch.float32
    steps = [model(tokens[:, :5])] + [model(tokens[:, p : p + 1], start_pos=p) for p in range(5, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_compute_natively_on_a_cpu_that_has_it(tiny_config, make_model, dtype,
                                                                   cpu_with_native_low_precision):
    model = make_model(tiny_config, dtype=dtype)
    assert model.compute_dtype == dtype and "mocked" in model.compute_dtype_reason
    tokens = _tokens(2, 10, tiny_config.vocab_size)
    logits = model(tokens)
    assert logits.dtype == torch.float32  # logits are always returned in fp32
    explicit = make_model(tiny_config, dtype=dtype, compute_dtype=dtype)  # what "auto" picked, asked for
    explicit.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits, explicit(tokens), atol=0, rtol=0)
    model.setup_cache(2, 10)
    assert model.caches[0].cache_k.dtype == dtype  # the cache follows the compute dtype
    upcast = make_model(tiny_config, dtype=dtype, compute_dtype=torch.float32)  # an explicit dtype wins
    assert upcast.compute_dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_module_to_dtype_keeps_rope_table(tiny_config, make_model, dtype, cpu_without_native_low_precision):
    """``model.to(dtype)`` used to cast the complex64 RoPE table to a real tensor (imaginary parts
    dropped), silently rotating every position wrongly. It must stay complex64."""
    model = make_model(tiny_config)
    ref = _rounded_fp32_copy(model, dtype, make_model, tiny_config)
    model.to(dtype)
    assert model.freqs_cis.dtype == torch.complex64
    assert model.tok_embeddings.weight.dtype == dtype
    tokens = _tokens(2, 10, tiny_config.vocab_size)
    torch.testing.assert_close(model(tokens), ref(tokens), atol=1e-5, rtol=0)
    model.half().float()
    assert model.freqs_cis.dtype == torch.complex64


def test_explicit_compute_dtype(tiny_config, make_model):
    model = make_model(tiny_config, dtype=torch.bfloat16, compute_dtype=torch.bfloat16)
    assert model.compute_dtype == torch.bfloat16
    tokens = _tokens(1, 6, tiny_config.vocab_size)
    logits = model(tokens)
    assert logits.dtype == torch.float32  # logits are always returned in fp32
    ref = _rounded_fp32_copy(model, torch.bfloat16, make_model, tiny_config)
    assert (logits - ref(tokens)).abs().max() < 0.5  # bf16 arithmetic: close, not equal


# ---------------------------------------------------------------- CUDA (skipped on this machine)
@requires_cuda
@pytest.mark.parametrize("attn_kernel", ["math", "sdpa"])
def test_cuda_fp32_matches_cpu(tiny_config, make_model, attn_kernel, no_tf32):
    cpu = make_model(tiny_config, attn_kernel=attn_kernel)
    tokens = _tokens(2, 12, tiny_config.vocab_size)
    expected = cpu(tokens)
    gpu = make_model(tiny_config, attn_kernel=attn_kernel).to("cuda")
    assert gpu.freqs_cis.device.type == "cuda" and gpu.freqs_cis.dtype == torch.complex64
    with torch.no_grad():
        logits = gpu(tokens.cuda())
    torch.testing.assert_close(logits.cpu(), expected, atol=1e-4, rtol=0)
    gpu.setup_cache(2, 12)
    steps = [gpu(tokens[:, :5].cuda())] + [gpu(tokens[:, p : p + 1].cuda(), start_pos=p) for p in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1).cpu(), expected, atol=1e-4, rtol=0)


@requires_cuda
def test_cuda_bf16_computes_in_bf16(tiny_config, make_model):
    model = make_model(tiny_config, dtype=torch.bfloat16).to("cuda")
    assert model.compute_dtype == torch.bfloat16
    tokens = _tokens(2, 12, tiny_config.vocab_size, device="cuda")
    logits = model(tokens)
    assert logits.dtype == torch.float32 and logits.device.type == "cuda"
    ref = make_model(tiny_config)
    assert (logits.cpu() - ref(tokens.cpu())).abs().max() < 0.5
    out = generate(model, tokens[:, :4], 4)
    assert len(out) == 2 and all(len(o) == 4 for o in out)


@requires_cuda
def test_cuda_hf_parity(hf_llama_factory, no_tf32):
    hf = hf_llama_factory(rope_theta=2500.0, rms_norm_eps=1e-5).to("cuda")
    ours = llama_ref.from_hf(hf)
    assert ours.device.type == "cuda"
    tokens = _tokens(2, 16, 256, device="cuda")
    with torch.no_grad():
        expected = hf(tokens).logits.float()
        logits = ours(tokens)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


@requires_cuda
def test_cuda_tokens_device_mismatch_is_a_value_error(tiny_model):
    with pytest.raises(ValueError, match="tokens are on device cuda.* but the model is on cpu"):
        tiny_model(torch.zeros(1, 2, dtype=torch.long, device="cuda"))
