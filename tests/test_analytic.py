"""Closed-form counts: hand-derived single-module cases, presets, schedules, bytes and invariants."""

from __future__ import annotations

import pytest

from counters import table as T
from counters.analytic import (
    AnalyticReport,
    RowCost,
    analyze,
    kv_cache_bytes,
    macs_polynomial,
    param_breakdown,
    param_count,
)
from counters.table import block_row_names, row_order
from llama_ref import PRESETS, SCHEDULE_NAMES, Llama, LlamaConfig, resolve_schedule

# Small GQA config used for hand-derived numbers: head_dim 16, kv_dim 32, n_rep 2.
SMALL = LlamaConfig(name="small", dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=176,
                    max_seq_len=128)
# 32 layers (every schedule preset applies) at a small width.
DEEP = LlamaConfig(name="deep", dim=32, n_layers=32, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=48,
                   max_seq_len=64)
DEEP_MHA = DEEP.replace(name="deep-mha", n_kv_heads=4)


def _row(report: AnalyticReport, pos, module) -> RowCost:
    (row,) = [r for r in report.rows if r.position == pos and r.module == module]
    return row


# ---------------------------------------------------------------- single modules, derived by hand
def test_prefill_rows_by_hand():
    r = analyze(SMALL, seqlen=5)
    # 5*64*64 = 20480 MACs
    assert _row(r, 0, "attention.wq").macs == 20480
    # k and v are GQA-reduced: 5*64*(2*16) = 10240 MACs each
    assert _row(r, 0, "attention.wk").macs == 10240
    assert _row(r, 0, "attention.wv").macs == 10240
    # o: 5*64*64 = 20480
    assert _row(r, 0, "attention.wo").macs == 20480
    # w1, w3: 5*64*176 = 56320; w2: 5*176*64 = 56320
    for m in ("feed_forward.w1", "feed_forward.w3", "feed_forward.w2"):
        assert _row(r, 0, m).macs == 56320
    # QK^T + AV over the dense 5x5 scores of all 4 *query* heads: 2*4*5*5*16 = 3200 MACs
    core = _row(r, 0, "attention.core")
    assert core.macs == 3200
    # 4*5*5 = 100 scores, each scale + mask + softmax(5) = 7 FLOPs -> 700
    assert core.nonmatmul_flops == 700
    # causal-useful: 1+2+3+4+5 = 15 scores of 25 -> 2*4*15*16 = 1920 MACs
    assert core.macs_causal == 1920
    # exact FLOPs: QK^T 20 rows x 5 outputs x (2*16-1) = 3100; AV 20 rows x 16 outputs x (2*5-1) = 2880
    assert core.flops_exact == 3100 + 2880
    # RMSNorm: 5 rows * (4*64 + 2) = 1290 FLOPs
    assert _row(r, 0, "attention_norm").nonmatmul_flops == 1290
    assert _row(r, None, "norm").nonmatmul_flops == 1290
    # RoPE: 5 tokens * (4 + 2) heads * 8 complex pairs * 6 FLOPs = 1440
    assert _row(r, 0, "attention.rope").nonmatmul_flops == 1440
    # SwiGLU gate: 5*176*(4 + 1) = 4400
    assert _row(r, 0, "feed_forward.act").nonmatmul_flops == 4400
    # two residual adds: 2*5*64 = 640
    assert _row(r, 0, "residual").nonmatmul_flops == 640
    # output head: 5*64*256 = 81920 MACs; embedding: a lookup, 0 MACs
    assert _row(r, None, "output").macs == 81920
    assert _row(r, None, "tok_embeddings").macs == 0
    # exact FLOPs of wq: 5*64*(2*64-1) = 40640
    assert _row(r, 0, "attention.wq").flops_exact == 40640


def test_decode_rows_by_hand():
    r = analyze(SMALL, seqlen=1, start_pos=9, batch=3)
    # one new token attends to 9 cached + itself: 2*3*4*1*10*16 = 3840 MACs
    core = _row(r, 0, "attention.core")
    assert core.macs == 3840
    # 3*4*10 = 120 scores * (scale 1 + softmax 5; no mask for a single token) = 720
    assert core.nonmatmul_flops == 720
    # every score is visible to a single new token: causal == dense
    assert core.macs_causal == core.macs
    # 3 rows * 64 * 64 = 12288
    assert _row(r, 0, "attention.wq").macs == 12288


def test_prefill_and_decode_are_one_formula():
    """MACs(B, N, C) = B * (a*N + b*N*(C+N)) with (a, b) from macs_polynomial, for any split."""
    for cfg in (SMALL, DEEP, DEEP_MHA):
        a, b = macs_polynomial(cfg)
        for batch, n, c in [(1, 1, 0), (1, 7, 0), (2, 1, 30), (3, 4, 11), (1, 64, 0)]:
            assert analyze(cfg, batch=batch, seqlen=n, start_pos=c).macs == batch * (a * n + b * n * (c + n))


def test_flops_are_twice_macs_and_totals_sum_rows():
    r = analyze(SMALL, batch=2, seqlen=6, start_pos=3, schedule="0-1x2,3")
    assert r.flops == 2 * r.macs
    assert r.macs == sum(x.macs for x in r.rows)
    assert r.nonmatmul_flops == sum(x.nonmatmul_flops for x in r.rows)
    assert r.total.total_flops == r.flops + r.nonmatmul_flops
    runs = r.layer_runs()
    assert [x.module for x in runs] == ["(root)", "tok_embeddings"] + ["block"] * 5 + ["norm", "output"]
    assert [x.layer for x in runs if x.module == "block"] == [0, 0, 1, 1, 3] == list(r.schedule)
    assert sum(x.macs for x in runs) == r.macs
    assert sum(x.bytes for x in runs) == r.bytes
    assert sum(x.macs_causal for x in runs) == r.macs_causal
    assert sum(x.flops_exact for x in runs) == r.flops_exact


def test_rows_follow_result_row_order():
    r = analyze(DEEP, seqlen=3, schedule="skip-15")
    assert [x.key for x in r.rows] == row_order(31)
    assert [x.module for x in r.rows if x.position == 0] == list(block_row_names())
    cr = r.as_counter_result()
    assert cr.name == "analytic"
    assert cr.total.macs == r.macs and cr.total.nonmatmul_flops == r.nonmatmul_flops


# ---------------------------------------------------------------- presets and the 7B figures
@pytest.mark.parametrize("name, expected", [
    ("llama-2-7b", 6_738_415_616),
    ("llama-2-13b", 13_015_864_320),
    ("llama-2-70b", 68_976_648_192),
    ("llama-3-8b", 8_030_261_248),
    ("tiny", 217_664),
])
def test_param_count_presets(name, expected):
    cfg = PRESETS[name]
    assert param_count(cfg) == expected
    assert Llama(cfg, device="meta").param_count() == expected
    assert sum(param_breakdown(cfg).values()) == expected


@pytest.mark.parametrize("cfg", [SMALL, DEEP, DEEP_MHA, SMALL.replace(n_kv_heads=1)])
def test_param_count_equals_meta_model_numel(cfg):
    assert param_count(cfg) == Llama(cfg, device="meta").param_count()


def test_llama2_7b_polynomial():
    a, b = macs_polynomial(PRESETS["llama-2-7b"])
    # 32 * (4*4096^2 + 3*4096*11008) + 4096*32000 = 6,476,005,376 + 131,072,000
    assert a == 6_607_077_376
    # 32 layers * 2 (QK^T and AV) * 4096 (32 heads * 128) = 262,144
    assert b == 262_144


def test_llama2_70b_polynomial_uses_gqa_projections():
    a, b = macs_polynomial(PRESETS["llama-2-70b"])
    # per layer: q, o 8192^2 each; k, v 8192*1024 each; MLP 3*8192*28672; head 8192*32000
    assert a == 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672) + 8192 * 32000 == 68_713_185_280
    # attention products use all 64 query heads: 80 * 2 * 64 * 128
    assert b == 1_310_720


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
@pytest.mark.parametrize("cfg", [DEEP, DEEP_MHA])
def test_every_schedule_preset(cfg, schedule):
    order = resolve_schedule(schedule, 32)
    a, b = macs_polynomial(cfg, schedule)
    per_run_a = 2 * cfg.dim * cfg.dim + 2 * cfg.dim * cfg.kv_dim + 3 * cfg.dim * cfg.hidden_dim
    assert a == len(order) * per_run_a + cfg.dim * cfg.vocab_size
    assert b == len(order) * 2 * cfg.dim
    r = analyze(cfg, seqlen=5, start_pos=2, schedule=schedule)
    assert r.schedule == order
    assert len(r.rows) == 4 + 15 * len(order)
    blocks = [x for x in r.layer_runs() if x.module == "block"]
    assert [x.layer for x in blocks] == list(order)
    assert r.macs == a * 5 + b * 5 * 7


def test_repeated_layer_reads_its_weights_again_and_skipped_layers_none():
    one = analyze(SMALL, seqlen=4, schedule=[0])
    twice = analyze(SMALL, seqlen=4, schedule=[0, 0])
    block_w = sum(x.weight_bytes for x in one.rows if x.position == 0)
    assert sum(x.weight_bytes for x in twice.rows if x.position == 1) == block_w
    assert twice.total.weight_bytes - one.total.weight_bytes == block_w
    # per-layer weights: 4 attention + 3 MLP matrices + 2 norms, 2 bytes each
    assert block_w == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 176 + 2 * 64)


def test_weight_bytes_of_a_full_forward_equal_the_parameters():
    """Every parameter is read once, except the embedding table, of which only the gathered rows are."""
    for wb in (1, 2, 4):
        cfg = SMALL
        r = analyze(cfg, batch=2, seqlen=3, weight_dtype_bytes=wb)
        table = cfg.vocab_size * cfg.dim
        assert r.total.weight_bytes == (param_count(cfg) - table + 2 * 3 * cfg.dim) * wb


def test_kv_bytes():
    r = analyze(SMALL, batch=2, seqlen=3, start_pos=5, act_dtype_bytes=4, kv_dtype_bytes=1)
    core = _row(r, 1, "attention.core")
    # keys + values of 5 + 3 positions: 2 * 2 * 8 * 32 * 1 byte
    assert core.kv_read_bytes == 1024
    # the new 3 positions written: 2 * 2 * 3 * 32
    assert _row(r, 1, "attention").kv_write_bytes == 384
    assert r.total.kv_read_bytes == 4 * 1024
    # cache holding 8 positions for 4 runs
    assert r.kv_cache_bytes == 4 * 1024 == kv_cache_bytes(SMALL, batch=2, n_positions=8, kv_dtype_bytes=1)
    # KV dtype defaults to the activation dtype
    assert analyze(SMALL, seqlen=1, act_dtype_bytes=4).kv_dtype_bytes == 4


def test_intensity_and_rowcost_contract():
    r = analyze(SMALL, seqlen=8)
    wq = _row(r, 0, "attention.wq")
    assert wq.flops == 2 * wq.macs
    assert wq.bytes == wq.weight_bytes + wq.act_bytes
    assert wq.intensity == wq.total_flops / wq.bytes
    assert _row(r, None, "(root)").intensity == 0.0
    with pytest.raises(ValueError):
        RowCost(0, 0, "x", macs=5, nonmatmul_flops=0)  # a matmul row must say its exact FLOPs


def test_7b_decode_intensity_is_memory_bound_and_prefill_compute_bound():
    decode = analyze(PRESETS["llama-2-7b"], seqlen=1, start_pos=1023)
    prefill = analyze(PRESETS["llama-2-7b"], seqlen=2048)
    assert decode.total.intensity < 2
    assert prefill.total.intensity > 500


@pytest.mark.parametrize("kwargs", [
    dict(seqlen=0), dict(seqlen=1, start_pos=-1), dict(seqlen=1, batch=0), dict(seqlen=2.0),
    dict(seqlen=1, schedule="0-99"), dict(seqlen=1, schedule="nonsense"), dict(seqlen=True),
])
def test_bad_inputs(kwargs):
    with pytest.raises(ValueError):
        analyze(SMALL, **kwargs)


def test_the_table_is_the_source():
    """analytic adds nothing of its own: each row is its table kind evaluated on sizes from the config."""
    r = analyze(SMALL, batch=2, seqlen=3, start_pos=4)
    assert _row(r, 0, "attention.core").count == T.ATTENTION_CORE.count(T.Attn(2, 3, 7, 4, 2, 16, True))
    assert _row(r, 0, "feed_forward.act").count == T.GATED_SILU.count(T.Elems(6, 176))
    assert _row(r, 0, "attention.rope").count == T.ROPE.count(T.Rope(2, 3, 4, 2, 16))
    assert _row(r, 0, "residual").count == T.RESIDUAL.count(T.Elems(6, 64))
    shape = T.RunShape(2, 3, 4)
    for row in T.BLOCK_ROWS:
        assert _row(r, 1, row.name).count == row.kind.count(row.sizes(SMALL, shape)), row.name


def test_70b_analytic_is_instant():
    import time

    t = time.perf_counter()
    r = analyze(PRESETS["llama-2-70b"], seqlen=4096)
    assert time.perf_counter() - t < 1.0
    assert r.macs == 68_713_185_280 * 4096 + 1_310_720 * 4096 ** 2
