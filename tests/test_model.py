"""The model: output contract, KV-cache decoding == full forward, kernels agree, RoPE/GQA/mask properties,
and clear errors for bad input."""

from __future__ import annotations

import math

import pytest
import torch

from llama_ref import Llama, LlamaConfig, apply_rotary_emb, precompute_freqs_cis, repeat_kv
from llama_ref import guards, mark_cache_filled
from llama_ref.model import KVCache

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
@pytest.mark.parametrize("attn_kernel", ["math", "sdpa"])
@pytest.mark.parametrize("bsz, prefill", [(1, 1), (1, 5), (3, 4), (3, 11)])
def test_cached_decoding_matches_full_forward(tiny_config, make_model, attn_kernel, bsz, prefill):
    model = make_model(tiny_config, attn_kernel=attn_kernel)
    tokens = _tokens(bsz, 12, tiny_config.vocab_size, seed=bsz)
    full = model(tokens)
    cached = _cached_logits(model, tokens, prefill)
    assert cached.shape == full.shape
    torch.testing.assert_close(cached, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn_kernel", ["math", "sdpa"])
def test_chunked_prefill_matches_full_forward(tiny_config, make_model, attn_kernel):
    # Multi-token steps at start_pos > 0 use the rectangular (seqlen, start_pos + seqlen) mask.
    model = make_model(tiny_config, attn_kernel=attn_kernel)
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
    with pytest.raises(ValueError, match="compute_dtype='int8' is not 'auto' or a dtype"):
        Llama(tiny_config, compute_dtype="int8")
    with pytest.raises(ValueError, match="compute_dtype=torch.int64 is not a floating-point dtype"):
        Llama(tiny_config, compute_dtype=torch.int64)
    assert Llama(tiny_config, compute_dtype="fp32", device="meta", dtype=torch.bfloat16).compute_dtype == torch.float32
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


# ---------------------------------------------------------------- KV cache fill tracking
def test_kv_cache_fill_marks_follow_writes(tiny_config, make_model):
    model = make_model(tiny_config)
    model.setup_cache(4, 16)
    fill = model.caches[0].fill
    tok = lambda bsz, n: _tokens(bsz, n, tiny_config.vocab_size)  # noqa: E731
    assert fill.marks == ((4, 0),) and fill.filled() == 0
    model(tok(4, 6))  # every row holds 0..5
    assert fill.marks == ((4, 6),)
    model(tok(2, 3), 6)  # rows 0-1 now hold 0..8, rows 2-3 still 0..5
    assert fill.marks == ((2, 9), (4, 6))
    assert (fill.filled(1), fill.filled(2), fill.filled(3), fill.filled()) == (9, 9, 6, 6)
    model(tok(1, 1), 9)  # row 0 holds 0..9
    assert fill.marks == ((1, 10), (2, 9), (4, 6))
    # Re-writing earlier positions of every row makes what lies beyond stale: the mark moves back.
    model(tok(4, 1), 2)
    assert fill.marks == ((4, 3),) and all(c.fill.marks == ((4, 3),) for c in model.caches)
    model.reset_cache()
    assert model.cache_filled() == 0 and model.caches[0].cache_k.abs().sum() > 0  # reset does no tensor work


def test_kv_cache_refused_write_changes_nothing(tiny_config, make_model):
    model = make_model(tiny_config)
    model.setup_cache(2, 8)
    model(_tokens(2, 3, tiny_config.vocab_size))
    before = [c.cache_k.clone() for c in model.caches]
    with pytest.raises(ValueError, match="start_pos=5 is beyond the filled part of the KV cache: rows 0-1 hold positions"):
        model(_tokens(2, 1, tiny_config.vocab_size), 5)
    with pytest.raises(ValueError, match="batch size 3 exceeds the cache's max_batch_size=2"):
        model(_tokens(3, 1, tiny_config.vocab_size), 0)
    assert model.caches[0].fill.marks == ((2, 3),)
    assert all(torch.equal(c.cache_k, b) for c, b in zip(model.caches, before))


def test_kv_cache_update_is_a_tensor_program():
    # The cache itself only writes and reads (no bookkeeping): an int start_pos returns the prefix, a tensor
    # start_pos (static shapes, compiled decoding) the whole cache.
    cache = KVCache(max_batch_size=2, max_seq_len=6, n_kv_heads=1, head_dim=2)
    keys, _ = cache.update(0, torch.ones(2, 3, 1, 2), torch.ones(2, 3, 1, 2))
    assert keys.shape == (2, 3, 1, 2)
    keys, values = cache.update(torch.tensor(3), 2 * torch.ones(1, 1, 1, 2), 3 * torch.ones(1, 1, 1, 2))
    assert keys.shape == (1, 6, 1, 2) and torch.equal(keys[0, 3], 2 * torch.ones(1, 2))
    assert torch.equal(values[0, :3], torch.ones(3, 1, 2)) and values[0, 4:].abs().sum() == 0
    assert cache.fill.marks == ((2, 0),)  # the eager guards keep the marks, not the cache


@pytest.mark.parametrize("value, match", [(0, "max_batch_size must be a positive int, got 0"),
                                          (2.0, "max_batch_size must be a positive int, got 2.0")])
def test_kv_cache_bad_arguments(value, match):
    with pytest.raises(ValueError, match=match):
        KVCache(value, 8, 1, 2)
    with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype, got torch.int64"):
        KVCache(1, 8, 1, 2, dtype=torch.int64)


def test_rerunning_a_step_is_allowed_and_identical(tiny_model, tiny_config):
    # The counters count the same decode step several times at the same start_pos.
    tokens = _tokens(2, 8, tiny_config.vocab_size, seed=6)
    full = tiny_model(tokens)
    tiny_model.setup_cache(2, 8)
    tiny_model(tokens[:, :5])
    first = tiny_model(tokens[:, 5:6], start_pos=5)
    again = tiny_model(tokens[:, 5:6], start_pos=5)
    assert torch.equal(first, again) and tiny_model.cache_filled() == 6
    # Re-running the prefill's last two positions as a chunk, then decoding on, still equals the full forward.
    tiny_model(tokens[:, 3:5], start_pos=3)
    assert tiny_model.cache_filled() == 5  # position 5 is stale until written again
    rest = [tiny_model(tokens[:, p : p + 1], start_pos=p) for p in range(5, 8)]
    torch.testing.assert_close(torch.cat(rest, 1), full[:, 5:], atol=ATOL, rtol=0)


def test_smaller_batch_fills_only_its_rows(tiny_model, tiny_config):
    tokens = _tokens(3, 7, tiny_config.vocab_size, seed=7)
    full = tiny_model(tokens)
    tiny_model.setup_cache(3, 16)
    tiny_model(tokens[:, :4])  # all rows: 0..3
    tiny_model(tokens[:1, 4:6], start_pos=4)  # row 0 only: 4..5
    assert (tiny_model.cache_filled(1), tiny_model.cache_filled(3)) == (6, 4)
    with pytest.raises(ValueError, match="start_pos=6 .*rows 0-2 hold positions \\[0, 4\\) only \\(filled up to 4\\)"):
        tiny_model(tokens[:, 6:7], start_pos=6)
    # Rows 1-2 continue from where they are filled; row 0 re-computes position 4 (same tokens, same keys).
    out = tiny_model(tokens[:, 4:7], start_pos=4)
    torch.testing.assert_close(out, full[:, 4:], atol=ATOL, rtol=0)
    assert tiny_model.cache_filled() == 7


def test_cache_filled_and_reset(tiny_model, tiny_config):
    assert tiny_model.cache_filled() is None
    tiny_model.setup_cache(2, 16)
    assert tiny_model.cache_filled() == 0
    tiny_model(_tokens(2, 3, tiny_config.vocab_size))
    assert tiny_model.cache_filled() == 3 and all(c.fill.filled() == 3 for c in tiny_model.caches)
    tiny_model.reset_cache()
    assert tiny_model.cache_filled() == 0
    with pytest.raises(ValueError, match="filled up to 0"):
        tiny_model(_tokens(2, 1, tiny_config.vocab_size), start_pos=3)
    tiny_model.clear_cache()
    assert tiny_model.cache_filled() is None and tiny_model.caches is None


def test_fill_tracking_on_the_meta_device():
    # Python ints only: works without data, and a huge max_batch_size costs nothing (no per-row list).
    model = Llama(LlamaConfig.from_preset("llama-2-70b").replace(n_layers=2), device="meta", dtype=torch.bfloat16,
                  schedule="0,1x2")
    model.setup_cache(max_batch_size=10**9, max_seq_len=64)
    tokens = torch.zeros(2, 8, dtype=torch.long, device="meta")
    model(tokens)
    assert model.caches[0].fill.marks == ((2, 8), (10**9, 0))
    assert model(tokens[:, :1], start_pos=8).shape == (2, 1, 32000)
    with pytest.raises(ValueError, match="start_pos=20 .*filled up to 9"):
        model(tokens[:, :1], start_pos=20)


def _dispatched_ops(fn) -> list[str]:
    from torch.utils._python_dispatch import TorchDispatchMode

    ops: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return ops


def test_fill_tracking_adds_no_tensor_ops(tiny_config, make_model, monkeypatch):
    """The counters require a forward to run exactly the tensor ops it ran before fill tracking:
    the same cached step, with the tracking stubbed out, dispatches the identical op sequence."""
    tokens = _tokens(2, 6, tiny_config.vocab_size)

    def cached_step(model):
        model.setup_cache(2, 8)
        model(tokens[:, :4])
        return _dispatched_ops(lambda: model(tokens[:, 4:6], start_pos=4))

    with_tracking = cached_step(make_model(tiny_config, schedule="0,1x2"))
    monkeypatch.setattr(guards.FillMarks, "check_write", lambda self, *a: None)
    monkeypatch.setattr(guards, "mark_written", lambda *a: None)
    monkeypatch.setattr(guards, "_check_caches", lambda *a: None)
    without = cached_step(make_model(tiny_config, schedule="0,1x2"))
    assert with_tracking == without and len(with_tracking) > 50


def test_fill_marks_stay_ints_under_jit_trace(tiny_model, tiny_config):
    """Under torch.jit.trace (fvcore's counter) tensor sizes are 0-dim tensors; stored as marks they
    would turn every later check into tensor ops (aten.gt/ge/lt) in the counted forwards."""
    tokens = _tokens(1, 5, tiny_config.vocab_size)
    tiny_model.setup_cache(1, 8)
    tiny_model(tokens[:, :3])

    class Step(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, t):
            return self.model(t, 3)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(Step(tiny_model), tokens[:, 3:5], check_trace=False)
    marks = [m for cache in tiny_model.caches for seg in cache.fill.marks for m in seg]
    assert marks and all(type(m) is int for m in marks)
    assert tiny_model.cache_filled() == 5


def test_start_pos_accepts_numpy_ints(tiny_model, tiny_config):
    np = pytest.importorskip("numpy")
    tokens = _tokens(1, 4, tiny_config.vocab_size)
    tiny_model.setup_cache(1, 8)
    tiny_model(tokens[:, :3])
    torch.testing.assert_close(tiny_model(tokens[:, 3:], start_pos=np.int64(3)),
                               tiny_model(tokens[:, 3:], start_pos=3), atol=0, rtol=0)


# ---------------------------------------------------------------- memory and finiteness
@pytest.mark.parametrize("preset", ["tiny", "llama-2-7b", "llama-2-70b", "llama-3-8b"])
def test_parameter_count_matches_the_model(preset):
    from llama_ref.shapes import param_count, weight_bytes

    config = LlamaConfig.from_preset(preset)
    model = Llama(config, device="meta")
    assert param_count(config) == model.param_count()
    # RoPE table: max_seq_len x head_dim/2 complex64 (8 bytes)
    assert weight_bytes(config, torch.bfloat16) == 2 * model.param_count() + model.rope_positions * config.head_dim // 2 * 8


def test_memory_checks_refuse_before_allocating(tiny_config, monkeypatch):
    from llama_ref import memory
    from llama_ref.errors import InsufficientMemoryError

    # tiny in fp32: 217,664 weights * 4 + RoPE 128 * 8 * 8 = 878,848 bytes
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: 878_848)
    model = Llama(tiny_config)  # fits exactly
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: 878_847)
    with pytest.raises(InsufficientMemoryError, match="878,848 bytes.*\\(878,847 bytes"):
        Llama(tiny_config)
    Llama(tiny_config, device="meta")  # nothing allocated, nothing checked
    # A cache of 2 * 2 rows * 16 positions * 2 kv heads * 16 * 4 bytes * 4 runs = 32,768 bytes.
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: 32_768)
    model.setup_cache(2, 16)
    old = model.caches
    # Replacing it: the old cache's 32,768 bytes count as available, so 16,384 free are enough ...
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: 16_384)
    model.setup_cache(2, 16)
    assert model.caches is not old
    # ... but not for a cache of twice the size (65,536 > 16,384 + 32,768); the refusal keeps the old one.
    current = model.caches
    with pytest.raises(InsufficientMemoryError, match="65,536 bytes"):
        model.setup_cache(4, 16)
    assert model.caches is current


def test_check_finite(tiny_model):
    from llama_ref.errors import NonFiniteError

    tiny_model.check_finite()
    Llama(LlamaConfig.from_preset("llama-2-70b"), device="meta").check_finite()  # nothing to check
    with torch.no_grad():
        tiny_model.output.weight[0, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
        tiny_model.norm.weight[1] = float("nan")
    with pytest.raises(NonFiniteError, match="2 weight tensor\\(s\\).*norm.weight \\(1 NaN and 0 inf.*"
                                             "output.weight \\(1 NaN and 2 inf"):
        tiny_model.check_finite()


def test_available_memory_and_devices():
    from llama_ref.devices import resolve_device
    from llama_ref.memory import available_memory_bytes

    cpu = available_memory_bytes("cpu")
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    assert isinstance(cpu, int) and 0 < cpu <= total
    assert available_memory_bytes("meta") is None  # nothing to check there
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(torch.device("meta")).type == "meta"


def test_mark_cache_filled_is_explicit_and_checked(tiny_model, tiny_config):
    # For timing/counting a decode step after C positions without computing them (values meaningless).
    with pytest.raises(ValueError, match="needs a KV cache"):
        mark_cache_filled(tiny_model, 4)
    tiny_model.setup_cache(2, 16)
    mark_cache_filled(tiny_model, 10, bsz=1)
    assert (tiny_model.cache_filled(1), tiny_model.cache_filled(2)) == (10, 0)
    assert tiny_model(_tokens(1, 1, tiny_config.vocab_size), start_pos=10).shape == (1, 1, tiny_config.vocab_size)
    with pytest.raises(ValueError, match="n_positions must be an int in \\[0, 16\\]"):
        mark_cache_filled(tiny_model, 17)
    with pytest.raises(ValueError, match="bsz must be an int in \\[1, 2\\]"):
        mark_cache_filled(tiny_model, 3, bsz=3)


def test_cuda_index_beyond_the_device_count(monkeypatch):
    # Simulated: one visible GPU (this machine has none); the index check runs before any CUDA call.
    from llama_ref.devices import resolve_device
    from llama_ref.errors import DeviceUnavailableError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(DeviceUnavailableError, match="'cuda:7' requested but this machine has 1 CUDA device\\(s\\) "
                                                     "\\(valid: cuda:0\\)"):
        resolve_device("cuda:7")


def test_available_memory_on_cuda_is_free_device_memory(monkeypatch):
    from llama_ref.memory import available_memory_bytes

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (123_456_789, 10**10))
    assert available_memory_bytes("cuda:0") == 123_456_789
