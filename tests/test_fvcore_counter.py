"""count_fvcore: every (position, module) row equals the module-level formula, computed by hand
from the config; totals agree with fvcore's own FlopCountAnalysis; unknown ops are never zero."""

from __future__ import annotations

import logging

import pytest
import torch

from counters.primitives import ZERO, Count
from counters.fvcore_counter import _import_fvcore, _StartPosWrapper, count_fvcore
from counters.ops import UncountedOpError
from counters.result import outside
from llama_ref import PRESETS, Llama

from _counter_cases import BSZ, CASES, CONFIGS, MODES, SinGate, TINY, expected_rows, make_bf16_meta_model, make_model

# Thousands of tiny ops: one intra-op thread (see conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("preset,mode,attn_kernel,device", CASES, ids=["-".join(c) for c in CASES])
def test_rows_equal_module_formulas(preset, mode, attn_kernel, device):
    config = CONFIGS[preset]
    start_pos, seqlen = MODES[mode]
    model, tokens = make_model(config, attn_kernel, device, start_pos)
    result = count_fvcore(model, tokens[:, start_pos:start_pos + seqlen], start_pos, strict=True)
    expected = expected_rows(config, len(model.schedule), BSZ, start_pos, seqlen)
    assert list(result.rows) == list(expected)  # every row, in execution order
    for key, count in expected.items():
        assert result.rows[key] == count, key
    assert result.total == sum(expected.values(), ZERO)
    assert result.unknown_ops == {}
    assert result.name == "fvcore"
    # the repeated layer got two rows, one per run
    assert result.position_total(1) == result.position_total(2) != ZERO


def test_macs_equal_plain_fvcore_and_notes():
    """For kernel=math fvcore alone already sees every matrix product (linear + matmul), so its
    plain FlopCountAnalysis total (1 per MAC) is the MAC total; for sdpa it misses QK^T and AV."""
    FlopCountAnalysis = _import_fvcore()[0]

    start_pos, seqlen = 0, 5
    totals = {}
    for attn_kernel in ("math", "sdpa"):
        model, tokens = make_model(TINY, attn_kernel, "meta", start_pos)
        result = count_fvcore(model, tokens[:, :seqlen], start_pos, strict=True)
        plain = FlopCountAnalysis(_StartPosWrapper(model, start_pos), (tokens[:, :seqlen],))
        plain.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        totals[attn_kernel] = (result.total.macs, plain.total())
        own = result.source_totals()[outside("fvcore")].macs  # fvcore's own handles, nothing of ours
        assert f"FlopCountAnalysis.total() = {own} MACs" in result.notes[0]
        assert result.notes[0].endswith("Its unsupported_ops(): none.")
        assert own == plain.total()
    macs, plain_math = totals["math"]
    assert plain_math == macs
    macs_sdpa, plain_sdpa = totals["sdpa"]
    assert macs_sdpa == macs
    # what fvcore alone misses with kernel=sdpa: 2 attention matmuls x 5 runs x bsz 2 x 4 heads x 5 x 5 x 16,
    # taken from torch's SDPA formula instead
    attention = 5 * 2 * BSZ * 4 * 5 * 5 * 16
    assert macs - plain_sdpa == attention
    assert "scaled_dot_product_attention x5: MACs by torch's sdpa_flop_count" in result.notes[0]
    assert result.source_totals()[outside("torch")].macs == attention


@pytest.mark.parametrize("preset", ["llama-2-7b", "llama-2-70b"])
def test_baseline_schedule_full_size_shapes_on_meta(preset):
    # Full-size layer shapes (70b: GQA 64/8 heads) on meta - no storage; 2 layers keep it quick.
    config = PRESETS[preset].replace(n_layers=2)
    model = Llama(config, device="meta", attn_kernel="sdpa")
    n = 64
    tokens = torch.zeros(1, n, dtype=torch.long, device="meta")
    result = count_fvcore(model, tokens, 0, strict=True)
    assert result.rows == expected_rows(config, config.n_layers, 1, 0, n)


@pytest.mark.parametrize("attn_kernel", ["math", "sdpa"])
def test_bf16_weights_and_compute_on_meta(attn_kernel):
    # meta: the compute dtype is the weights' (bf16); the fp32 upcasts of RMSNorm/RoPE/softmax are free casts
    start_pos, seqlen = MODES["cached-chunk"]
    model, tokens = make_bf16_meta_model(attn_kernel)
    result = count_fvcore(model, tokens[:, start_pos:start_pos + seqlen], start_pos, strict=True)
    assert model.compute_dtype == torch.bfloat16
    assert result.rows == expected_rows(TINY, len(model.schedule), BSZ, start_pos, seqlen)


def test_unknown_op_strict_raises_and_lenient_lists(caplog):
    model, tokens = make_model(TINY, "math", "meta", 0)
    model.layers[0].feed_forward.act = SinGate()  # layer 0 runs once in SCHEDULE
    with pytest.raises(UncountedOpError, match="sin x1"):
        count_fvcore(model, tokens[:, :5], 0, strict=True)
    with caplog.at_level(logging.WARNING):
        result = count_fvcore(model, tokens[:, :5], 0, strict=False)
    assert result.unknown_ops == {"sin": 1}
    assert "sin x1" in caplog.text
    # the rest is still counted: the gate's multiply (2*5*176 = 1760 FLOPs), but nothing for sin
    assert result.rows[(0, "feed_forward.act")] == Count(nonmatmul_flops=BSZ * 5 * TINY.hidden_dim)
