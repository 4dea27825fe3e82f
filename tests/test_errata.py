"""Every number in docs/errata.md, recomputed: the published figures, how they arise, and ours."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from counters import primitives as P
from counters import table as T
from counters.analytic import analyze, macs_polynomial, param_breakdown, param_count
from counters.commands.schedules import measure_polynomial
from counters.hooks import count_hooks
from counters.published import REF000_MACS, REF001_PARAMS
from llama_ref import PRESETS, SCHEDULE_NAMES, Llama, resolve_schedule

ERRATA = Path(__file__).resolve().parents[1] / "docs" / "errata.md"
L7 = PRESETS["llama-2-7b"]
L70 = PRESETS["llama-2-70b"]
D, H, V = 4096, 11008, 32000  # Llama-2-7B dim, FFN width, vocabulary


def _their_formula_a(runs: int) -> int:
    """Reference 000's TOTAL formula, coefficient of N: emb + runs*(4*2*d^2 + 3*d*h) + 2*d*V."""
    return D + runs * (4 * 2 * D * D + 3 * D * H) + 2 * D * V


# ---------------------------------------------------------------- reference 000
def test_true_7b_coefficients():
    a, b = macs_polynomial(L7)
    assert a == 32 * 4 * D * D + 32 * 3 * D * H + D * V == 6_607_077_376
    assert (32 * 4 * D * D, 32 * 3 * D * H, D * V) == (2_147_483_648, 4_328_521_728, 131_072_000)
    assert b == 262_144
    # in FLOPs
    assert (2 * a, 2 * b) == (13_214_154_752, 524_288)


def test_true_7b_coefficients_measured_with_hooks_on_meta():
    model = Llama(L7, device="meta", dtype=torch.bfloat16)
    assert measure_polynomial(model, 3, 17) == (6_607_077_376, 262_144)


def test_their_formula_and_the_unit_mixup():
    assert _their_formula_a(32) == 8_885_637_120
    # their formula minus ours: attention projections and head counted twice (FLOPs), embedding counted
    assert _their_formula_a(32) - 6_607_077_376 == 2_147_483_648 + 131_072_000 + 4_096 == 2_278_559_744
    # their b: 32 * 2 * 4096 = FLOPs of QK^T alone, which equals the MACs of QK^T + AV
    qk_macs_per_n2 = P.matmul(1, 128, 1).macs * 32  # one query row times one key column, 32 heads
    assert 32 * 2 * 4096 == 32 * 2 * qk_macs_per_n2 == macs_polynomial(L7)[1]
    # and it is not FLOPs of both products, which would be twice that
    assert 2 * macs_polynomial(L7)[1] == 524_288


def test_published_a_cannot_be_reproduced_from_the_terms():
    published = REF000_MACS["baseline"][1]
    assert published - _their_formula_a(32) == -2_910_344
    # every term of the document contains the hidden size 4096, so any integer combination of them is
    # a multiple of 4096; no published a is
    terms = [D, D * D, D * H, D * V]  # embedding / norm, attention projection, MLP matrix, output head
    assert math.gcd(*terms) == 4096
    assert published % 4096 == 1_912
    assert all(a % 4096 != 0 for _, a, _ in REF000_MACS.values())


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_every_published_schedule_line(schedule):
    label, pub_a, pub_b = REF000_MACS[schedule]
    runs = len(resolve_schedule(schedule, 32))
    a, b = macs_polynomial(L7, schedule)
    assert a == runs * 202_375_168 + 131_072_000
    assert pub_b == b == runs * 8_192  # b right in every line
    assert pub_a != a and pub_a != _their_formula_a(runs)  # a wrong, and not even their own formula
    assert 1.34 < pub_a / a < 1.35
    assert f"{a:,}" in ERRATA.read_text() and f"{pub_a:,}" in ERRATA.read_text()


def test_published_a_is_not_affine_in_the_number_of_runs():
    pub = {len(resolve_schedule(s, 32)): a for s, (_, a, _) in REF000_MACS.items()}
    assert pub[32] - pub[31] == 287_649_472
    assert (pub[32] - pub[29]) % 3 != 0 and (pub[32] - pub[22]) % 10 != 0
    offsets = {r: pub[r] - _their_formula_a(r) for r in pub}
    assert offsets == {32: -2_910_344, 29: 12_347_264, 31: -21_075_784, 22: -5_524_928, 27: -3_566_904}


def test_mid_expansion_has_29_runs_and_costs_like_any_29_run_schedule():
    order = resolve_schedule("mid-expansion-with-repeats", 32)
    assert len(order) == 29 and len(set(order)) == 24
    assert macs_polynomial(L7, "mid-expansion-with-repeats") == macs_polynomial(L7, "skip-24-26") \
        == macs_polynomial(L7, "skip-near-end-keep-last-two") == (5_999_951_872, 237_568)
    # a repeated layer is counted per run: measured with hooks on meta
    model = Llama(L7, device="meta", dtype=torch.bfloat16, schedule="mid-expansion-with-repeats")
    assert measure_polynomial(model, 1, 2) == (5_999_951_872, 237_568)


def test_skip_24_26_label():
    assert resolve_schedule("skip-24-26", 32) == resolve_schedule("0-23,27-31", 32)


# ---------------------------------------------------------------- reference 001
def test_reference_001_arithmetic_as_printed():
    r = REF001_PARAMS
    assert r["ffn_first_per_layer"] + r["ffn_second_per_layer"] == r["ffn_per_layer"]
    assert r["attention_per_layer"] + r["ffn_per_layer"] == r["block_per_layer"]
    assert r["block_per_layer"] * 80 == r["blocks_total"]
    assert r["embedding"] + r["blocks_total"] == r["grand_total"]
    assert r["grand_total"] + r["rmsnorm_total"] == r["adjusted_total"]
    # the FFN products are mis-multiplied
    assert 8_192 * 57_344 == 469_762_048 != r["ffn_first_per_layer"]
    assert 28_672 * 8_192 == 234_881_024 != r["ffn_second_per_layer"]


def test_reference_001_corrections_reach_the_true_count():
    true = param_count(L70)
    assert true == 68_976_648_192 == Llama(L70, device="meta").num_params()
    parts = param_breakdown(L70)
    assert parts["layers.*.attention.wk"] == 80 * 8192 * 1024
    gqa = 80 * 2 * (8192 * 8192 - 8192 * 1024)
    ffn = 80 * (REF001_PARAMS["ffn_per_layer"] - 3 * 8192 * 28672)
    assert (gqa, ffn) == (9_395_240_960, 125_829_120)
    assert parts["output"] == 262_144_000 and parts["norm"] == 8_192
    assert REF001_PARAMS["adjusted_total"] - gqa - ffn + parts["norm"] + parts["output"] == true
    assert true < 70_000_000_000


# ---------------------------------------------------------------- reference 002 (70B decode, 1024 cached)
def _core_70b_decode():
    r = analyze(L70, n_tokens=1, n_cached=1024)
    (core,) = [x for x in r.rows if x.position == 0 and x.module == "attention.core"]
    return core


def test_reference_002_sdpa():
    core = _core_70b_decode()
    qo, kv, hidden, kv_dims = 1, 1025, 8192, 1024
    theirs_qk = qo * kv * (hidden * 2 - 1)
    theirs_sv = qo * kv_dims * (kv * 2 - 1)
    exact_qk = P.matmul_exact_flops(64 * qo, 128, kv)
    exact_sv = P.matmul_exact_flops(64 * qo, kv, 128)
    assert (theirs_qk, exact_qk) == (16_792_575, 16_728_000)
    assert theirs_qk - exact_qk == qo * kv * (64 - 1)
    assert (theirs_sv, exact_sv) == (2_098_176, 16_785_408)
    assert exact_sv == 8 * theirs_sv  # GQA-reduced: under-counted by n_rep
    assert core.flops_exact == exact_qk + exact_sv
    assert core.macs == 2 * 8_396_800
    # softmax + scale (no mask for one new token) they leave out
    assert core.nonmatmul_flops == 64 * 1025 * 6 == 393_600


def test_reference_002_sdpa_measured_with_hooks():
    model = Llama(L70, device="meta", dtype=torch.bfloat16, schedule=[0])
    model.setup_cache(1, 1025)
    with torch.no_grad():
        model(torch.zeros((1, 1024), dtype=torch.long, device="meta"))
    counted = count_hooks(model, torch.zeros((1, 1), dtype=torch.long, device="meta"), 1024)
    assert counted.get((0, "attention.core")).macs == _core_70b_decode().macs


def test_reference_002_sv_right_for_mha():
    qo, kv = 1, 1025
    assert qo * 4096 * (2 * kv - 1) == P.matmul_exact_flops(32 * qo, kv, 128) == 8_392_704  # 7B: kv dims = hidden


def test_reference_002_actmul():
    assert (4 + 1) * 28672 + 1 == 143_361 and T.GATED_SILU.count(T.Elems(1, 28672)).nonmatmul_flops == 143_360
    assert (4 + 1) * 11008 + 2048 == 57_088
    assert T.GATED_SILU.count(T.Elems(2048, 11008)).nonmatmul_flops == (4 + 1) * 11008 * 2048 == 112_721_920


def test_reference_002_rope_and_rmsnorm_agree_with_ours():
    for cfg in (L7, L70):
        token_dims = cfg.head_dim * (cfg.n_heads + cfg.n_kv_heads)
        assert token_dims * 3 * 7 == T.ROPE.count(T.Rope(1, 7, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)).nonmatmul_flops
        assert (cfg.dim * 4 + 2) * 7 == T.RMSNORM.count(T.Norm(7, cfg.dim)).nonmatmul_flops


def test_reference_002_missing_output_head_and_storage():
    assert P.matmul(1, 4096, 32000).macs == 131_072_000
    assert P.matmul(1, 8192, 32000).macs == 262_144_000
    assert round(131_072_000 / macs_polynomial(L7)[0] * 100, 1) == 2.0
    assert param_breakdown(L7)["output"] * 2 == 262_144_000
    assert param_breakdown(L70)["output"] * 2 == 524_288_000


def test_reference_002_kv_cache_formula_is_right():
    r = analyze(L70, n_tokens=1, n_cached=1024, act_dtype_bytes=2)
    assert r.kv_cache_bytes == 1025 * 1024 * 2 * 2 * 80


def test_errata_quotes_every_corrected_number():
    text = ERRATA.read_text()
    for n in (6_607_077_376, 262_144, 8_885_637_120, 2_910_344, 68_976_648_192, 9_395_240_960, 125_829_120,
              16_728_000, 16_785_408, 2_098_176, 112_721_920, 5_999_951_872, 2_278_559_744):
        assert f"{n:,}" in text, n
