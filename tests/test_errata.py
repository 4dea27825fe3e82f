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
from counters.published import REF000_MACS, REF001_PARAMS, REFERENCES
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


def test_errata_cites_every_reference():
    # title (as the document prints it), and the author and URL where they are known
    text = ERRATA.read_text()
    for number, (title, authors, url) in REFERENCES.items():
        line = next((ln for ln in text.splitlines() if ln.startswith(f"* {number}: ")), None)
        assert line is not None and f'"{title}"' in line, number
        author_and_url = [x for x in (authors, url) if x]
        assert all(x in text for x in author_and_url), number
        assert bool(author_and_url) != ("No author or URL" in line), number


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
    assert macs_polynomial(L7, "mid-expansion-with-repeats") == macs_polynomial(L7, "skip-24-26")\
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
    assert true == 68_976_648_192 == Llama(L70, device="meta").param_count()
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
    r = analyze(L70, seqlen=1, start_pos=1024)
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
    r = analyze(L70, seqlen=1, start_pos=1024, act_dtype_bytes=2)
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
    """The section's text, up to the next section of the same level."""
    text = ERRATA.read_text()
    assert text.count(TRAIN_SECTION) == 1
    section = text[text.index(TRAIN_SECTION):]
    end = section.find("\n## ", len(TRAIN_SECTION))
    return section if end < 0 else section[:end]


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
    # tied Llama-3.2-1B and 3B at 2048: torchtitan keeps the shared matrix (since its weight-tying fix) and
    # equals nanoGPT; before the fix it subtracted it: 6 * (all params - the table) + its attention term
    l1, l3b = PRESETS["llama-3.2-1b"], PRESETS["llama-3.2-3b"]
    exact1, exact3 = E.exact_model_flops_per_token(l1, 2048), E.exact_model_flops_per_token(l3b, 2048)

    def before_fix(cfg):
        p = E.param_counts(cfg)
        return 6 * (p["total"] - p["embedding"]) + 6 * cfg.n_layers * cfg.n_heads * 2 * (cfg.dim // cfg.n_heads) * 2048

    assert E.torchtitan_flops_per_token(l1, 2048) == E.nanogpt_flops_per_token(l1, 2048) == 8_220_192_768
    assert (E.torchtitan_flops_per_token(l3b, 2048), before_fix(l1), before_fix(l3b)) == (
        21_390_428_160, 6_644_183_040, 19_026_413_568)
    expected |= {E.param_counts(l1)["embedding"], E.torchtitan_flops_per_token(l1, 2048), exact1,
                 E.torchtitan_flops_per_token(l3b, 2048), exact3, before_fix(l1), before_fix(l3b)}
    expected |= {_pct(E.relative_error(E.torchtitan_flops_per_token(l1, 2048), exact1)),
                 _pct(E.relative_error(before_fix(l1), exact1))}
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


# ====================================================================== "Llama 3.x figures" (docs/errata.md)
# Every number of that section, recomputed from the formulas and found in the section's text.
from llama_ref import LlamaConfig, meta_ffn_hidden_dim  # noqa: E402
from counters.analytic import kv_cache_bytes  # noqa: E402


def _section(title: str) -> str:
    """The text of one ``## title`` section of docs/errata.md (up to the next ``## `` heading)."""
    text = ERRATA.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


L3X = _section("Llama 3.x figures")
P8, P70, P405 = (PRESETS[n] for n in ("llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b"))
P1B, P3B = PRESETS["llama-3.2-1b"], PRESETS["llama-3.2-3b"]
V3 = 128_256  # Llama 3 vocabulary


def _quoted(*numbers: int) -> None:
    for n in numbers:
        assert f"{n:,}" in L3X, n


def _vocab_params(config: LlamaConfig) -> int:
    """Embedding plus output head; a tied head is the embedding, one matrix."""
    parts = param_breakdown(config)
    return parts["tok_embeddings"] + parts.get("output", 0)


def test_l3x_parameter_totals_and_vocabulary_share():
    expected = {"llama-3-8b": (8_030_261_248, 1_050_673_152), "llama-3.1-8b": (8_030_261_248, 1_050_673_152),
                "llama-3.1-70b": (70_553_706_496, 2_101_346_304), "llama-3.3-70b": (70_553_706_496, 2_101_346_304),
                "llama-3.1-405b": (405_853_388_800, 4_202_692_608), "llama-3.2-1b": (1_235_814_400, 262_668_288),
                "llama-3.2-3b": (3_212_749_824, 394_002_432)}
    for name, (total, vocab) in expected.items():
        config = PRESETS[name]
        assert param_count(config) == total == Llama(config, device="meta").param_count(), name
        tied = 1 if config.tie_word_embeddings else 2
        assert _vocab_params(config) == vocab == tied * V3 * config.dim, name
        assert f"{100 * vocab / total:.2f}%" in L3X, name
        _quoted(total, vocab)
    assert param_breakdown(P8)["output"] == V3 * 4096 == 525_336_576
    _quoted(525_336_576)


def test_l3x_8b_against_llama2_7b():
    diff = param_count(P8) - param_count(L7)
    vocab = 2 * (V3 - 32_000) * 4096  # embedding and head rows added
    ffn = 32 * 3 * 4096 * (14_336 - 11_008)
    gqa = 32 * 2 * 4096 * (4096 - 1024)  # k and v shrink from 32 to 8 heads of 128
    assert (diff, vocab, ffn, gqa) == (1_291_845_632, 788_529_152, 1_308_622_848, 805_306_368)
    assert diff == vocab + ffn - gqa
    assert param_count(P8.replace(vocab_size=32_000)) == 7_241_732_096
    _quoted(diff, vocab, ffn, gqa, 7_241_732_096, 96_256)


def test_l3x_70b_differs_from_llama2_70b_by_the_vocabulary_alone():
    per_layer = param_breakdown(P70.replace(n_layers=1))
    per_layer = sum(v for k, v in per_layer.items() if k.startswith("layers."))
    assert per_layer == 855_654_400 and sum(v for k, v in param_breakdown(L70).items() if k.startswith("layers."))\
        == 80 * per_layer
    diff = param_count(P70) - param_count(L70)
    assert diff == 2 * (V3 - 32_000) * 8192 == 1_577_058_304
    assert param_count(L70) < 70_000_000_000 < param_count(P70)
    _quoted(855_654_400, diff)


def test_l3x_405b_total():
    layers = sum(v for k, v in param_breakdown(P405).items() if k.startswith("layers."))
    assert layers == 126 * 3_187_703_808
    assert layers + 4_202_692_608 + 16_384 == param_count(P405) == 405_853_388_800
    _quoted(3_187_703_808, 16_384)


@pytest.mark.parametrize("config, total, twice", [(P1B, 1_235_814_400, 1_498_482_688), (P3B, 3_212_749_824, 3_606_752_256)])
def test_l3x_tied_head_counted_twice(config, total, twice):
    model = Llama(config, device="meta")
    assert model.output.weight is model.tok_embeddings.weight
    assert model.param_count() == sum(p.numel() for p in model.parameters()) == total
    # a state dict lists the shared tensor under both names: summing it counts the head twice
    state = model.state_dict(keep_vars=True)
    assert state["output.weight"] is state["tok_embeddings.weight"]
    assert sum(t.numel() for t in state.values()) == twice == total + V3 * config.dim
    assert param_count(config.replace(tie_word_embeddings=False)) == twice
    _quoted(total, twice)
    if config is P1B:
        assert f"{100 * (twice - total) / total:.1f}%" in L3X


def test_l3x_model_card_figures_are_truncated():
    # "1.23B": 1,235,814,400 truncated to two decimals; rounded it would be 1.24
    assert math.floor(param_count(P1B) / 1e7) / 100 == 1.23 and round(param_count(P1B) / 1e9, 2) == 1.24
    assert math.floor(param_count(P3B) / 1e7) / 100 == round(param_count(P3B) / 1e9, 2) == 3.21
    assert "1.23B" in L3X and "1.24 B" in L3X


def test_l3x_a_misquoted_3b_shape():
    quoted = LlamaConfig(dim=2048, n_layers=26, n_heads=24, n_kv_heads=6, head_dim=128, hidden_dim=8192,
                         vocab_size=V3, tie_word_embeddings=True)
    assert param_count(quoted) == 1_980_344_320
    assert (P3B.dim, P3B.n_layers, P3B.n_heads, P3B.n_kv_heads) == (3072, 28, 24, 8)
    _quoted(1_980_344_320)


def test_l3x_code_llama_vocabulary():
    cl7, cl13, cl34 = (PRESETS[f"code-llama-{s}"] for s in ("7b", "13b", "34b"))
    assert (cl7.vocab_size, cl13.vocab_size, cl34.vocab_size) == (32_016, 32_016, 32_000)
    assert param_count(cl7) == 6_738_546_688 and param_count(L7) == 6_738_415_616
    assert param_count(cl7) - param_count(L7) == 16 * 4096 * 2 == 131_072
    assert param_count(cl13) - param_count(PRESETS["llama-2-13b"]) == 16 * 5120 * 2 == 163_840
    assert param_count(cl13) == 13_016_028_160 and param_count(cl34) == 33_743_970_304 and cl34.n_kv_heads == 8
    _quoted(6_738_546_688, 6_738_415_616, 131_072, 13_016_028_160, 163_840, 33_743_970_304)


def test_l3x_per_token_macs():
    expected = {P8: (7_504_658_432, 262_144), P70: (69_501_714_432, 1_310_720), P405: (403_747_897_344, 4_128_768)}
    for config, (a, b) in expected.items():
        assert macs_polynomial(config) == (a, b)
        # b: QK^T and attention x V for every query head of every layer
        assert b == config.n_layers * 2 * config.n_heads * config.head_dim
        # a: the parameters minus the embedding and the norm weights (the untied head does its MACs)
        norms = param_breakdown(config)["layers.*.attention_norm"] * 2 + config.dim
        assert a == param_count(config) - param_breakdown(config)["tok_embeddings"] - norms
        _quoted(a, b)
    assert macs_polynomial(L70)[1] == 1_310_720
    # the crossover N = a / b where attention costs as much as everything else
    assert 7_504_658_432 == 262_144 * 28_628
    assert f"about {round(69_501_714_432 / 1_310_720):,}" in L3X and f"about {round(403_747_897_344 / 4_128_768):,}" in L3X
    _quoted(28_628, 266_240)
    # tied 3.2-1B: the head reuses the embedding, so only the norms are missing from a
    a1, _ = macs_polynomial(P1B)
    assert a1 == param_count(P1B) - (16 * 2 * 2048 + 2048) == 1_235_746_816
    _quoted(a1)


def test_l3x_405b_decode_at_full_context():
    a, b = macs_polynomial(P405)
    step = analyze(P405, seqlen=1, start_pos=131_071)
    assert step.macs == a + b * 131_072 == 944_913_776_640
    attention = sum(r.macs for r in step.rows if r.module == "attention.core")
    assert attention == b * 131_072 == 541_165_879_296 and round(100 * attention / step.macs) == 57
    _quoted(944_913_776_640, 541_165_879_296)


def test_l3x_kv_cache_at_128k():
    expected = {P8: (131_072, 17_179_869_184, 16), P70: (327_680, 42_949_672_960, 40),
                P405: (516_096, 67_645_734_912, 63)}
    for config, (per_token, total, gib) in expected.items():
        assert kv_cache_bytes(config, batch=1, n_positions=1, kv_dtype_bytes=2) == per_token\
            == 2 * config.n_layers * config.n_kv_heads * config.head_dim * 2
        assert kv_cache_bytes(config, batch=1, n_positions=131_072, kv_dtype_bytes=2) == total == gib * 2**30
        # the same analyze reports for a step at the full context
        assert analyze(config, seqlen=1, start_pos=131_071, act_dtype_bytes=2).kv_cache_bytes == total
        # GQA ignored: k and v as wide as dim
        mha = kv_cache_bytes(config.replace(n_kv_heads=config.n_heads), batch=1, n_positions=131_072, kv_dtype_bytes=2)
        assert mha == total * config.n_rep
        assert f"({gib} GiB)" in L3X and f"({mha // 2**30:,} GiB)" in L3X
        _quoted(per_token, total, mha)
    assert kv_cache_bytes(P8, batch=1, n_positions=131_072, kv_dtype_bytes=2) > 2 * param_count(P8) == 16_060_522_496


def test_l3x_two_times_params_rule():
    table = {  # preset: (2 x params, {N: (dense, causal)})
        P8: (16_060_522_496, {8192: (19_304_284_160, 17_157_062_656), 131_072: (83_728_793_600, 49_369_317_376)}),
        P70: (141_107_412_992, {8192: (160_478_265_344, 149_742_157_824),
                                131_072: (482_600_812_544, 310_803_431_424)}),
        P405: (811_706_777_600, {8192: (875_141_529_600, 841_322_790_912),
                                 131_072: (1_889_827_553_280, 1_348_665_802_752)}),
    }
    for config, (rule, by_n) in table.items():
        a, b = macs_polynomial(config)
        assert rule == 2 * param_count(config)
        _quoted(rule)
        for n, (dense, causal) in by_n.items():
            report = analyze(config, seqlen=n)
            # matrix-product FLOPs per token: 2 x MACs / N, exact (the totals divide by N)
            assert 2 * report.macs == dense * n and dense == 2 * (a + b * n)
            assert 2 * report.macs_causal == causal * n and causal == 2 * a + b * (n + 1)
            assert f"{dense:,} (x{dense / rule:.3f})" in L3X and f"{causal:,} (x{causal / rule:.3f})" in L3X
        # short contexts: the embedding does no arithmetic, so the rule over-counts until N = (P - a) / b
        crossover = (param_count(config) - a) / b
        assert f"{crossover:,.1f}" in L3X and 2 * (a + b * math.floor(crossover)) < rule < 2 * (a + b * math.ceil(crossover))
        assert f"{math.ceil(crossover):,}" in L3X
    assert round(83_728_793_600 / 16_060_522_496, 1) == 5.2 and round(49_369_317_376 / 16_060_522_496, 1) == 3.1


# ---------------------------------------------------------------- reference 003 (family overview table)
# As printed: LLaMA (1) and LLaMA-2 columns (LLaMA-3's shapes are "?").
REF003 = {
    "llama": {"dim": (4096, 5120, 6656, 8192), "heads": (32, 40, 52, 64), "layers": (32, 40, 60, 64),
              "sizes": ("6.7B", "13.0B", "32.5B", "65.2B"), "context": 2048, "global_batch": 1024},
    "llama-2": {"dim": (4096, 5120, 8192, 8192), "heads": (32, 40, 64, 64), "layers": (32, 40, 48, 64),
                "attention": ("MQA", "MQA", "GQA", "GQA"), "context": 4096, "global_batch": 1024},
    "llama-3": {"context": 8192},
}


def _llama1(dim: int, n_layers: int, n_heads: int) -> LlamaConfig:
    # LLaMA (1): Llama-2's code and tokenizer, FFN from Meta's rule with multiple_of=256, 2048 context
    return LlamaConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, vocab_size=32_000,
                       hidden_dim=meta_ffn_hidden_dim(dim, 256), max_seq_len=2048)


def test_ref003_llama1_sizes_and_the_65b_layer_count():
    ref = REF003["llama"]
    true_layers = (32, 40, 60, 80)
    counts = [param_count(_llama1(d, L, h)) for d, L, h in zip(ref["dim"], true_layers, ref["heads"])]
    assert counts == [6_738_415_616, 13_015_864_320, 32_528_943_616, 65_285_660_672]
    assert counts[:2] == [param_count(L7), param_count(PRESETS["llama-2-13b"])]  # same shapes as Llama 2
    # the published sizes are the exact counts truncated to one decimal (65.29 -> "65.2B")
    assert [f"{math.floor(c / 1e8) / 10:.1f}B" for c in counts] == list(ref["sizes"])
    # the table's 64 layers for 65B contradict its own 65.2B
    assert ref["layers"][3] == 64 and param_count(_llama1(8192, 64, 64)) == 52_333_387_776
    _quoted(*counts, 52_333_387_776)


def test_ref003_llama2_70b_layers_and_attention():
    ref = REF003["llama-2"]
    assert ref["layers"][3] == 64 and L70.n_layers == 80
    assert param_count(L70.replace(n_layers=64)) == 55_286_177_792
    # 7B and 13B: one kv head per query head (MHA); MQA would have 1 kv head
    for i, name in enumerate(("llama-2-7b", "llama-2-13b")):
        config = PRESETS[name]
        assert ref["attention"][i] == "MQA" and config.n_kv_heads == config.n_heads == ref["heads"][i]
    mqa = [param_count(PRESETS[n].replace(n_kv_heads=1)) for n in ("llama-2-7b", "llama-2-13b")]
    assert mqa == [5_698_228_224, 10_971_141_120]
    # the right cells: dims, heads, 34B's 48 layers with GQA (Code Llama 34B is built on it)
    cl34 = PRESETS["code-llama-34b"]
    assert (cl34.dim, cl34.n_heads, cl34.n_layers, cl34.n_kv_heads < cl34.n_heads) == (8192, 64, 48, True)
    assert [PRESETS[n].dim for n in ("llama-2-7b", "llama-2-13b", "llama-2-70b")] == [4096, 5120, 8192]
    assert REF003["llama-2"]["context"] == L7.max_seq_len and REF003["llama-3"]["context"] == PRESETS["llama-3-8b"].max_seq_len
    _quoted(68_976_648_192, 55_286_177_792, *mqa)


def test_ref003_llama3_unknowns_filled_in():
    l3_8b = PRESETS["llama-3-8b"]
    l3_70b = P70.replace(rope_scaling=None, max_seq_len=8192, name="llama-3-70b")  # 3.1 70B before long context
    assert (l3_8b.dim, l3_8b.n_heads, l3_8b.n_layers, l3_8b.n_kv_heads) == (4096, 32, 32, 8)
    assert (l3_70b.dim, l3_70b.n_heads, l3_70b.n_layers, l3_70b.n_kv_heads) == (8192, 64, 80, 8)
    assert (param_count(l3_8b), param_count(l3_70b)) == (8_030_261_248, 70_553_706_496)
    assert "**4,096 / 32 / 32** (8B) and **8,192 / 64 / 80** (70B)" in L3X


def test_ref003_global_batch():
    # both papers: batches of 4M tokens; in sequences that is 2048 for LLaMA's 2048 context, 1024 for Llama 2's 4096
    four_m = 4 * 2**20
    assert four_m // REF003["llama"]["context"] == 2048 != REF003["llama"]["global_batch"]
    assert four_m // REF003["llama-2"]["context"] == 1024 == REF003["llama-2"]["global_batch"]
    assert round(4_000_000 / 2048, -2) == 2000
