"""Numerical parity with Hugging Face ``transformers.LlamaForCausalLM`` (the numerics proof).

Random-init HF models (MHA and GQA, non-default rope_theta / rms_norm_eps / widths, an init wide
enough that attention is far from uniform, randomized norm weights) are converted to ours, in memory
(``Llama.from_hf``) and through ``save_pretrained`` + ``Llama.from_pretrained``; in fp32 every logit
must agree within 1e-4, for a full forward and for cached decoding, and greedy generation must
produce HF's tokens. Mutation tests show these checks fail when the conversion is wrong.

The Llama-3 family features run through the same checks: ``llama3`` RoPE scaling in the 2024
file spelling (top-level ``rope_theta`` + ``rope_scaling``) with original_max_position_embeddings=16,
so the 24-token tests and 40-token generations run past it; ``linear`` scaling with tied embeddings
(``save_pretrained`` writes the embedding only); and an explicit ``head_dim`` != hidden / heads.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import llama_ref
from llama_ref import Llama, generate
from llama_ref.hf import permute_qk

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-4

# Two shapes: plain multi-head attention and grouped-query attention, neither with HF defaults.
CONFIGS = {
    "mha": dict(hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=6, vocab_size=300, rope_theta=2500.0, rms_norm_eps=1e-3,
                initializer_range=0.15),
    "gqa": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=3, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=320, rope_theta=500000.0, rms_norm_eps=1e-5,
                initializer_range=0.12),
    # head_dim 32, theta 2500: wavelengths 6.3, 10.2, 16.7, ... against high/low bounds 16/2 = 8 and
    # 16/1 = 16, so the table has all three llama3 regimes (kept, smoothed, divided by factor).
    "llama3": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=300, rope_theta=2500.0, rms_norm_eps=1e-5,
                   initializer_range=0.12,
                   rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 2.0, "original_max_position_embeddings": 16}),
    "linear-tied": dict(hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=6,
                        num_key_value_heads=2, vocab_size=300, rope_theta=2500.0, rms_norm_eps=1e-5,
                        initializer_range=0.15, rope_scaling={"rope_type": "linear", "factor": 3.0},
                        tie_word_embeddings=True),
    # head_dim 24 with 6 heads: q is 144 wide for a 96-wide model (transformers allows it).
    "head-dim": dict(hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=6,
                     num_key_value_heads=3, head_dim=24, vocab_size=300, rope_theta=50000.0, rms_norm_eps=1e-5,
                     initializer_range=0.15),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def hf_model(request):
    from conftest import build_hf_llama

    return build_hf_llama(**CONFIGS[request.param], seed=len(request.param))


def _tokens(bsz, seqlen, vocab, seed=0):
    return torch.randint(0, vocab, (bsz, seqlen), generator=torch.Generator().manual_seed(seed))


def _hf_logits(hf, tokens):
    with torch.no_grad():
        return hf(tokens).logits.float()  # (bsz, seqlen, vocab)


def _cached(model, tokens, prefill):
    bsz, seqlen = tokens.shape
    model.setup_cache(bsz, seqlen)
    with torch.inference_mode():
        outs = [model(tokens[:, :prefill])]
        outs += [model(tokens[:, p : p + 1], start_pos=p) for p in range(prefill, seqlen)]
    model.clear_cache()
    return torch.cat(outs, 1)  # (bsz, seqlen, vocab)


def _max_diff(a, b):
    return (a - b).abs().max().item()


# ---------------------------------------------------------------- the test models are discriminating
def test_attention_is_not_uniform(hf_model):
    tokens = _tokens(2, 24, hf_model.config.vocab_size)
    hf_model.set_attn_implementation("eager")  # only eager returns attention probabilities
    with torch.no_grad():
        attentions = hf_model(tokens, output_attentions=True).attentions
    assert len(attentions) == hf_model.config.num_hidden_layers
    for probs in attentions:  # (bsz, n_heads, seqlen, seqlen)
        last_row = probs[:, :, -1, :]  # the query that sees all 24 keys
        # Uniform attention would give 1/24 everywhere; demand a clearly peaked distribution on average.
        assert last_row.max(-1).values.mean() > 4 / 24
        entropy = -(last_row * last_row.clamp_min(1e-12).log()).sum(-1)
        assert entropy.mean() < 0.9 * torch.log(torch.tensor(24.0))


def test_logits_are_not_trivially_small(hf_model):
    logits = _hf_logits(hf_model, _tokens(2, 16, hf_model.config.vocab_size))
    assert logits.std() > 0.5  # 1e-4 is a tight tolerance against this scale


# ---------------------------------------------------------------- parity, converted in memory
@pytest.mark.parametrize("attn_kernel", ["math", "sdpa"])
def test_full_forward_parity(hf_model, attn_kernel):
    ours = llama_ref.from_hf(hf_model, attn_kernel=attn_kernel)
    hf_rope = hf_model.config.rope_parameters
    assert ours.config.rope_theta == hf_rope["rope_theta"]
    assert ours.config.norm_eps == hf_model.config.rms_norm_eps
    assert ours.config.head_dim == hf_model.config.head_dim
    assert ours.config.tie_word_embeddings == hf_model.config.tie_word_embeddings
    if ours.config.rope_scaling is None:
        assert hf_rope["rope_type"] == "default"
    else:
        assert ours.config.rope_scaling.to_hf() == {k: hf_rope[k] for k in ours.config.rope_scaling.to_hf()}
    tokens = _tokens(2, 24, ours.config.vocab_size, seed=1)
    for attn in ("eager", "sdpa"):
        hf_model.set_attn_implementation(attn)
        assert _max_diff(ours(tokens), _hf_logits(hf_model, tokens)) <= ATOL, attn


@pytest.mark.parametrize("attn_kernel", ["math", "sdpa"])
def test_cached_decoding_parity(hf_model, attn_kernel):
    ours = llama_ref.from_hf(hf_model, attn_kernel=attn_kernel)
    tokens = _tokens(2, 24, ours.config.vocab_size, seed=2)
    expected = _hf_logits(hf_model, tokens)
    for prefill in (1, 10):
        assert _max_diff(_cached(ours, tokens, prefill), expected) <= ATOL, prefill


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_greedy_generation_matches_hf(hf_model, attn):
    hf_model.set_attn_implementation(attn)
    ours = llama_ref.from_hf(hf_model)
    prompts = _tokens(2, 8, ours.config.vocab_size, seed=3)
    with torch.no_grad():
        # eos_token_id=None: nothing may stop HF early; min_new_tokens makes the length explicit.
        hf_out = hf_model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                   max_new_tokens=32, min_new_tokens=32, pad_token_id=0, eos_token_id=None)
    expected = hf_out[:, 8:].tolist()
    assert len(expected[0]) == 32
    assert generate(ours, prompts, max_new_tokens=32) == expected
    assert len(set(expected[0])) > 3  # not a degenerate repetition of one token


# ---------------------------------------------------------------- parity through files
def _rounded_hf(name: str, dtype: torch.dtype):
    """The fixture's HF model rebuilt (same seed) with its weights rounded to ``dtype``, kept in fp32."""
    from conftest import build_hf_llama

    hf = build_hf_llama(**CONFIGS[name], seed=len(name))
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.to(dtype))  # fp32 holding dtype-representable values: later casts are lossless
    return hf


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_pretrained_parity(name, tmp_path, dtype):
    """save_pretrained (safetensors, in ``dtype``) -> llama_ref.load(path, device=, dtype=) -> same logits.
    Compared in fp32, explicitly: "auto" would compute bf16 weights in bf16 on a CPU with AMX."""
    # A separate copy is cast and saved: Module.to(bf16) would also round HF's RoPE inv_freq buffer,
    # and the reference must stay exact.
    _rounded_hf(name, dtype).to(dtype).save_pretrained(tmp_path)
    files = os.listdir(tmp_path)
    assert "config.json" in files and any(f.endswith(".safetensors") for f in files)
    hf = _rounded_hf(name, dtype)
    ours = llama_ref.load(tmp_path, device="cpu", dtype=dtype, compute_dtype=torch.float32)
    assert ours.tok_embeddings.weight.dtype == dtype and ours.compute_dtype == torch.float32
    tokens = _tokens(2, 24, ours.config.vocab_size, seed=4)
    expected = _hf_logits(hf, tokens)
    assert _max_diff(ours(tokens), expected) <= ATOL
    assert _max_diff(_cached(ours, tokens, 9), expected) <= ATOL


# ---------------------------------------------------------------- the checks can fail
def _mutated(ours: Llama, mutation: str) -> Llama:
    config = ours.config
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    if mutation == "no q/k un-permutation":
        for i in range(config.n_layers):
            state[f"layers.{i}.attention.wq.weight"] = permute_qk(state[f"layers.{i}.attention.wq.weight"], config.n_heads)
            state[f"layers.{i}.attention.wk.weight"] = permute_qk(state[f"layers.{i}.attention.wk.weight"], config.n_kv_heads)
    elif mutation == "default rope_theta":
        config = config.replace(rope_theta=10000.0)
    elif mutation == "default rms_norm_eps":
        config = config.replace(norm_eps=1e-6 if config.norm_eps != 1e-6 else 1e-5)
    elif mutation == "swapped norms":
        for i in range(config.n_layers):
            a, f = f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"
            state[a], state[f] = state[f], state[a]
    model = Llama(config)
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("mutation", ["no q/k un-permutation", "default rope_theta", "default rms_norm_eps",
                                      "swapped norms"])
def test_parity_check_detects_wrong_conversion(hf_model, mutation):
    ours = llama_ref.from_hf(hf_model)
    tokens = _tokens(2, 24, ours.config.vocab_size, seed=5)
    expected = _hf_logits(hf_model, tokens)
    assert _max_diff(ours(tokens), expected) <= ATOL
    # Measured: >= 4 for the structural mutations; eps 1e-5 -> 1e-6 moves the GQA logits by ~7e-3.
    assert _max_diff(_mutated(ours, mutation)(tokens), expected) > 10 * ATOL


# ---------------------------------------------------------------- scripts/compare_hf.py
def _load_compare_script():
    from llama_ref.checks import compare_hf

    return compare_hf


def test_compare_hf_script_on_tiny(tmp_path, capsys):
    compare_hf = _load_compare_script()
    out = tmp_path / "parity.json"
    assert compare_hf.main(["tiny", "--batch", "2", "--seqlen", "24", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["passed"] and report["layers"] == 4 and report["atol"] == pytest.approx(1e-4)
    for name in ("full", "cached"):
        assert report[name]["max_abs_diff"] <= 1e-4
        assert report[name]["argmax_agreement"] == 1.0
    assert "PASS" in capsys.readouterr().out


def test_compare_hf_script_via_disk_bf16_and_checkpoint_dir(tmp_path):
    compare_hf = _load_compare_script()
    out = tmp_path / "bf16.json"
    assert compare_hf.main(["tiny", "--dtype", "bf16", "--via-disk", "--layers", "2", "--seqlen", "16",
                            "--json", str(out)]) == 0
    assert json.loads(out.read_text())["ours_from"] == "save_pretrained + llama_ref.load"
    # A checkpoint directory, truncated to one layer on both sides.
    from conftest import build_hf_llama

    build_hf_llama(**CONFIGS["gqa"]).save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "ckpt.json"
    assert compare_hf.main([str(tmp_path / "ckpt"), "--layers", "1", "--seqlen", "12", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["source"] == "checkpoint" and report["layers"] == 1 and report["full"]["max_abs_diff"] <= 1e-4


def test_compare_hf_script_fails_and_refuses(tmp_path):
    compare_hf = _load_compare_script()
    # An impossible tolerance makes it exit non-zero ...
    assert compare_hf.main(["tiny", "--seqlen", "8", "--atol", "1e-12"]) == 1
    # ... and bad requests are refused with status 2 before anything big is built.
    assert compare_hf.main(["no-such-model"]) == 2
    assert compare_hf.main(["llama-2-70b"]) == 2  # ~500 GiB: not on this machine
    assert compare_hf.main(["tiny", "--layers", "9"]) == 2
    assert compare_hf.main(["tiny", "--seqlen", "1000"]) == 2
    with pytest.raises(SystemExit):
        compare_hf.main(["tiny", "--batch", "0"])


# ---------------------------------------------------------------- transformers' KV-cache argument
def test_hf_forward_with_cache_takes_the_current_argument(caplog):
    # prefill + one cached step equals the full forward, through the argument this transformers names (cache in
    # 5.x; past_key_values, which 5.x deprecates with a warning on every use, before)
    import logging

    from conftest import build_hf_llama
    from llama_ref.hf import hf_forward_with_cache

    hf = build_hf_llama(**CONFIGS["gqa"])
    tokens = torch.randint(0, CONFIGS["gqa"]["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger="transformers"), torch.inference_mode():
        full = hf(input_ids=tokens, use_cache=False).logits
        _, cache = hf_forward_with_cache(hf, tokens[:, :8])
        last, cache = hf_forward_with_cache(hf, tokens[:, 8:], cache)
    assert cache is not None and _max_diff(last, full[:, 8:]) <= 1e-5
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]
