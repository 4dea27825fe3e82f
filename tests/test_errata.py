"""Every number in docs/errata.md, recomputed: the published figures, how they arise, and ours."""

from __future__ import annotations

import math
import re
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from counters import estimates as E
from counters import primitives as P
from counters import table as T
from counters.analytic import analyze, macs_polynomial, param_breakdown, param_count
from counters.commands.schedules import measure_polynomial
from counters.hooks import count_hooks
from counters.published import REF000_MACS, REF001_PARAMS
from counters.studies.hardware import table_hardware
from llama_ref import PRESETS, SCHEDULE_NAMES, Llama, resolve_schedule

ERRATA = Path(__file__).resolve().parents[1] / "docs" / "errata.md"
L7 = PRESETS["llama-2-7b"]
L70 = PRESETS["llama-2-70b"]
L3 = PRESETS["llama-3-8b"]
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


# ---------------------------------------------------------------- training FLOPs: the published MFU formulas
TRAIN_SECTION = "## Training FLOPs"
DOC_MODELS = ("llama-2-7b", "llama-2-70b", "llama-3-8b")
DOC_SEQ_LENS = (2048, 4096, 8192)
DOC_ROWS = ("palm", "torchtitan", "nanogpt", "levanter", "megatron", "megatron-pre2025", "flash-attn", "3x-forward",
            "3x-forward-all")
# the MFU example: 3000 tokens/s of Llama-2-7B at N = 2048 on one H100 SXM
MFU_T, MFU_N = 3000, 2048


def _training_section() -> str:
    text = ERRATA.read_text()
    assert text.count(TRAIN_SECTION) == 1
    return text[text.index(TRAIN_SECTION):]


def _pct(err: Fraction) -> str:
    return "exact" if err == 0 else f"{float(err * 100):+.4f}%"


def doc_table(model: str) -> list[str]:
    """The markdown rows the "Training FLOPs" section prints for one model (test and doc share this format)."""
    cfg = PRESETS[model]
    exact = {n: E.exact_model_flops_per_token(cfg, n) for n in DOC_SEQ_LENS}
    lines = ["| estimate | " + " | ".join(f"N = {n:,}" for n in DOC_SEQ_LENS) + " |",
             "|---|" + "---|" * len(DOC_SEQ_LENS),
             "| **exact** | " + " | ".join(f"**{exact[n]:,}**" for n in DOC_SEQ_LENS) + " |"]
    for name in DOC_ROWS:
        cells = []
        for n in DOC_SEQ_LENS:
            value = E.ESTIMATES[name](cfg, n)
            assert isinstance(value, int), (name, model, n)
            cells.append(f"{value:,} ({_pct(E.relative_error(value, exact[n]))})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


@pytest.mark.parametrize("model", DOC_MODELS)
def test_training_flops_tables(model):
    text = _training_section()
    for line in doc_table(model):
        assert line in text, f"docs/errata.md lacks the line:\n{line}"


def _mfu6(flops_per_token) -> str:
    return f"{float(E.mfu(flops_per_token, MFU_T, table_hardware('h100-sxm').peak_flops)):.6f}"


def _expected_training_numbers() -> set:
    """Every number the section prints (comma-grouped integers as ints, decimals as printed), recomputed."""
    expected: set = set()
    for model in DOC_MODELS:  # the tables: N, every value and every error
        for line in doc_table(model):
            expected.update(int(x.replace(",", "")) for x in re.findall(r"\d{1,3}(?:,\d{3})+", line))
            expected.update(re.findall(r"[+-]\d+\.\d+%", line))
    fwd7 = E.exact_forward_macs(L7, 2048)
    exact7 = E.exact_model_flops_per_token(L7, 2048)
    a, b = macs_polynomial(L7)
    # 3 x 14,630,806,093,824 = 43,892,418,281,472 MACs = 6 x (6,607,077,376 + 262,144 x 2048) x 2048 / 2
    assert (fwd7, 3 * fwd7, exact7) == (14_630_806_093_824, 43_892_418_281_472, 6 * (a + b * 2048))
    expected |= {fwd7, 3 * fwd7, exact7, a, b}
    # FlopCounterMode under whole-layer checkpointing (measured in tests/test_estimates.py): + every layer's
    # forward again; torch's default early stop skips w2's product (32 x 4096 x 11008 x 2048 MACs)
    executed = E.exact_executed_flops_per_token(L7, 2048, recompute=True)
    full = executed * 2048 // 2
    assert (full, full - 32 * 4096 * 11008 * 2048) == (58_254_788_919_296, 55_299_851_419_648)
    expected |= {full, full - 32 * 4096 * 11008 * 2048}
    # Llama-3's vocabulary table: 128,256 x 4096; the 7B norm weights: (2 x 32 + 1) x 4096
    expected |= {128_256, E.param_counts(L3)["embedding"], E.param_counts(L7)["norms"]}
    assert E.param_counts(L3)["embedding"] == 525_336_576 and E.param_counts(L7)["norms"] == 266_240
    # tied Llama-3.2-1B at 2048: torchtitan loses the head's products; nanoGPT is nearly right
    l1 = PRESETS["llama-3.2-1b"]
    exact1 = E.exact_model_flops_per_token(l1, 2048)
    expected |= {E.param_counts(l1)["embedding"], E.torchtitan_flops_per_token(l1, 2048), exact1}
    expected |= {_pct(E.relative_error(E.ESTIMATES[n](l1, 2048), exact1)) for n in ("torchtitan", "nanogpt")}
    # the H100 figures: 1,979 with sparsity in the datasheet, 989.5 = half of it, 989.4 the whitepaper's
    assert "1,979" in table_hardware("h100-sxm").source and "989.4" in table_hardware("h100-sxm").source
    expected |= {1_979, f"{1979 / 2:.1f}", "989.4"}
    # flash-attn's factors (bwd 2.5 f, fwd_bwd 3.5 f) and calflops' default compute_bp_factor 2.0
    assert E.flash_attention_benchmark_flops(1, 2, 1, 1, False, "fwd_bwd") == Fraction(7, 2) * 16
    assert E.flash_attention_benchmark_flops(1, 2, 1, 1, False, "bwd") == Fraction(5, 2) * 16
    expected |= {"3.5", "2.5", "2.0"}
    # the MFU example: exact, torchtitan, nanoGPT, Megatron; HFU with recompute, its extra FLOPs per token
    expected |= {_mfu6(exact7), _mfu6(E.torchtitan_flops_per_token(L7, 2048)),
                 _mfu6(E.nanogpt_flops_per_token(L7, 2048)), _mfu6(E.megatron_flops_per_token(L7, 2048))}
    assert executed - exact7 == 2 * 32 * (202_375_168 + 8_192 * 2048) == 14_025_752_576
    expected |= {executed, executed - exact7, 202_375_168, 8_192, _mfu6(executed)}
    return expected


def test_training_flops_section_prints_only_checked_numbers():
    text = _training_section()
    text = re.sub(r"Llama-\d[\w.-]*", "Llama", text)  # model names are not numbers
    printed = {int(x.replace(",", "")) for x in re.findall(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d])", text)}
    printed |= set(re.findall(r"(?<![\w.])[+-]?\d+\.\d+%?", text))
    expected = _expected_training_numbers()
    assert printed - expected == set(), "numbers printed but not checked"
    # and every number the checks recompute is printed (no stale expectation)
    assert expected - printed == set(), "numbers checked but not printed"


def test_training_flops_mfu_example():
    text = _training_section()
    got = E.mfu(E.exact_model_flops_per_token(L7, MFU_N), MFU_T, 989e12)
    # 3000 x 6 x (6,607,077,376 + 262,144 x 2048) / 989e12, the bar of `llama-ref mfu`
    assert got == Fraction(3000 * 6 * (6_607_077_376 + 262_144 * 2048), 989 * 10 ** 12)
    assert f"**{float(got):.6f}**" in text  # 0.130021
    assert table_hardware("h100-sxm").peak_flops == 989e12 and "989e12" in text
    assert "llama-ref mfu llama-2-7b --train --tokens 2048 --tokens-per-second 3000 --hardware h100-sxm" in text


if __name__ == "__main__":  # print the training-FLOPs tables
    for m in DOC_MODELS:
        print(f"\n#### {m}\n")
        print("\n".join(doc_table(m)))
