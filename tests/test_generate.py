"""generate(): greedy == argmax of full recomputation, ragged prompts, eos, seeded sampling, bad input."""

from __future__ import annotations

import pytest
import torch

from llama_ref import generate, sample_top_p

pytestmark = pytest.mark.usefixtures("single_thread")


def _prompts(lengths, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def _greedy_by_recomputation(model, prompt, n):
    """Reference: re-run a full forward (no cache) over the whole sequence for every new token."""
    seq = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([seq]))  # (1, len(seq), vocab)
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt) :]


def test_greedy_equals_argmax_of_full_forward(tiny_model, tiny_config):
    prompts = _prompts([6, 6], tiny_config.vocab_size)
    out = generate(tiny_model, prompts, max_new_tokens=12)
    assert [len(o) for o in out] == [12, 12]
    for prompt, new in zip(prompts, out):
        assert new == _greedy_by_recomputation(tiny_model, prompt, 12)
    assert tiny_model.caches is None  # generate() leaves no cache behind
    assert len(set(map(tuple, out))) == 2  # the two rows are genuinely different


def test_ragged_prompts_match_one_by_one(tiny_model, tiny_config):
    prompts = _prompts([2, 7, 4], tiny_config.vocab_size, seed=1)
    batched = generate(tiny_model, prompts, max_new_tokens=9)
    for prompt, new in zip(prompts, batched):
        assert len(new) == 9
        assert new == generate(tiny_model, [prompt], max_new_tokens=9)[0]
        assert new == _greedy_by_recomputation(tiny_model, prompt, 9)


def test_tensor_prompts(tiny_model, tiny_config):
    prompts = _prompts([5, 5], tiny_config.vocab_size, seed=2)
    assert generate(tiny_model, torch.tensor(prompts), 4) == generate(tiny_model, prompts, 4)


def test_eos_stops_rows_and_is_kept(tiny_model, tiny_config):
    prompts = _prompts([3, 5], tiny_config.vocab_size, seed=3)
    free = generate(tiny_model, prompts, max_new_tokens=10)
    eos = free[0][4]  # row 0 emits this token at step 4 (maybe earlier too)
    out = generate(tiny_model, prompts, max_new_tokens=10, eos_id=eos)
    for row_free, row in zip(free, out):
        cut = row_free.index(eos) + 1 if eos in row_free else len(row_free)
        assert row == row_free[:cut]
    assert len(out[0]) <= 5 and out[0][-1] == eos


def test_eos_stops_the_loop_early(tiny_model, tiny_config):
    prompt = _prompts([4], tiny_config.vocab_size, seed=4)[0]
    first = generate(tiny_model, [prompt], 1)[0][0]
    calls = []
    handle = tiny_model.register_forward_hook(lambda *_: calls.append(torch.is_inference_mode_enabled()))
    try:
        out = generate(tiny_model, [prompt], max_new_tokens=20, eos_id=first)
    finally:
        handle.remove()
    assert out == [[first]]
    assert len(calls) == 1  # one prefill, then stop: no wasted steps
    assert all(calls)  # every forward ran under inference_mode


def test_max_new_tokens_zero(tiny_model):
    assert generate(tiny_model, [[1, 2], [3]], 0) == [[], []]


def test_sampling_is_reproducible_with_a_generator(tiny_model, tiny_config):
    prompts = _prompts([4, 6], tiny_config.vocab_size, seed=5)
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.9)
    a = generate(tiny_model, prompts, generator=torch.Generator().manual_seed(7), **kw)
    b = generate(tiny_model, prompts, generator=torch.Generator().manual_seed(7), **kw)
    c = generate(tiny_model, prompts, generator=torch.Generator().manual_seed(8), **kw)
    assert a == b
    assert a != c
    assert a != generate(tiny_model, prompts, max_new_tokens=16)  # sampling is not greedy here


def test_tiny_top_p_or_temperature_is_greedy(tiny_model, tiny_config):
    prompts = _prompts([4, 6], tiny_config.vocab_size, seed=6)
    greedy = generate(tiny_model, prompts, 10)
    gen = torch.Generator().manual_seed(0)
    assert generate(tiny_model, prompts, 10, temperature=1.0, top_p=1e-6, generator=gen) == greedy
    assert generate(tiny_model, prompts, 10, temperature=1e-4, generator=gen) == greedy


def test_sample_top_p_distribution():
    probs = torch.tensor([[0.1, 0.5, 0.2, 0.2]]).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    # Nucleus for p=0.6: token 1 (0.5) then one of the 0.2s (mass before it, 0.5, is below 0.6).
    samples = sample_top_p(probs.clone(), 0.6, generator=gen)
    counts = torch.bincount(samples, minlength=4)
    assert counts[0] == 0
    assert counts[2] + counts[3] > 0 and min(counts[2], counts[3]) == 0  # only one 0.2 token (sort order) survives
    assert abs(counts[1].item() / 4000 - 0.5 / 0.7) < 0.03
    # p=1 keeps the whole distribution.
    counts = torch.bincount(sample_top_p(probs.clone(), 1.0, generator=gen), minlength=4).float() / 4000
    torch.testing.assert_close(counts, probs[0], atol=0.03, rtol=0)


@pytest.mark.parametrize(
    "prompts, kwargs, match",
    [
        ([], {}, "empty prompt"),
        ([[1, 2], []], {}, "empty prompt"),
        ([[1, 256]], {}, "token id 256 is outside the vocabulary \\[0, 256\\)"),
        ([[1, -1]], {}, "token id -1 is outside the vocabulary"),
        ([[1, 2.5]], {}, "token ids must be ints, got 2.5"),
        ([[1] * 100], {"max_new_tokens": 29}, "longest prompt \\(100\\) \\+ max_new_tokens \\(29\\) = 129 exceeds max_seq_len=128"),
        ([[1]], {"max_new_tokens": -1}, "max_new_tokens must be a non-negative int, got -1"),
        ([[1]], {"temperature": -0.5}, "temperature must be a finite number >= 0, got -0.5"),
        ([[1]], {"temperature": float("nan")}, "temperature must be a finite number >= 0, got nan"),
        ([[1]], {"top_p": 0.0}, "top_p must be in \\(0, 1\\], got 0.0"),
        ([[1]], {"top_p": 1.5}, "top_p must be in \\(0, 1\\], got 1.5"),
        ([[1]], {"eos_id": 300}, "eos_id 300 is not a token id"),
        (torch.tensor([1, 2, 3]), {}, "prompt tensor must have shape \\(bsz, seqlen\\), got \\(3,\\)"),
        ([1, 2, 3], {}, "list of token-id lists, got \\[1, 2, 3\\]"),
    ],
)
def test_bad_generate_input(tiny_model, prompts, kwargs, match):
    kwargs.setdefault("max_new_tokens", 4)
    with pytest.raises(ValueError, match=match):
        generate(tiny_model, prompts, **kwargs)
    assert tiny_model.caches is None


# ---------------------------------------------------------------- robustness
def test_prompts_as_1d_tensors_and_numpy_ints(tiny_model, tiny_config):
    np = pytest.importorskip("numpy")
    prompts = _prompts([3, 5], tiny_config.vocab_size, seed=7)
    want = generate(tiny_model, prompts, 4)
    assert generate(tiny_model, [torch.tensor(p) for p in prompts], 4) == want
    assert generate(tiny_model, [np.array(p, dtype=np.int64) for p in prompts], np.int64(4)) == want


def test_tiny_temperature_is_greedy_not_nan(tiny_model, tiny_config):
    # logits / 1e-30 overflows to inf and softmax(inf - inf) is NaN; shifting by the max first keeps
    # every value <= 0, so a vanishing temperature becomes argmax.
    prompts = _prompts([4, 6], tiny_config.vocab_size, seed=8)
    gen = torch.Generator().manual_seed(0)
    assert generate(tiny_model, prompts, 8, temperature=1e-30, generator=gen) == generate(tiny_model, prompts, 8)


def test_nan_weights_are_refused_not_sampled(tiny_model):
    from llama_ref.errors import NonFiniteError

    with torch.no_grad():
        tiny_model.tok_embeddings.weight[5] = float("nan")  # only prompts containing token 5 are affected
    assert len(generate(tiny_model, [[1, 2, 3]], 3)[0]) == 3
    with pytest.raises(NonFiniteError, match="step 0 \\(predicting position 3\\) in batch row\\(s\\) 1:"):
        generate(tiny_model, [[1, 2, 3], [4, 5, 6]], 3)
    assert tiny_model.caches is None  # the cache is released on the error path too
    with pytest.raises(NonFiniteError, match="tok_embeddings.weight \\(64 NaN and 0 inf"):  # one row of dim 64
        tiny_model.check_finite()
