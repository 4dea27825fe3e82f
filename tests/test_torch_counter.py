"""count_torch: every (position, module) row equals the module-level formula, computed by hand
from the config; FlopCounterMode's own total and what it leaves at zero are reported; unknown ops
are never zero."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from counters import table as T
from counters.primitives import ZERO, Count
from counters.ops import UncountedOpError
from counters.torch_counter import count_torch
from llama_ref import PRESETS, Llama, repeat_kv

from _counter_cases import BSZ, CASES, CONFIGS, MODES, SinGate, TINY, expected_rows, make_bf16_meta_model, make_model


# Thousands of tiny ops: one intra-op thread (see conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("preset,mode,attn_kernel,device", CASES, ids=["-".join(c) for c in CASES])
def test_rows_equal_module_formulas(preset, mode, attn_kernel, device):
    config = CONFIGS[preset]
    start_pos, seqlen = MODES[mode]
    model, tokens = make_model(config, attn_kernel, device, start_pos)
    result = count_torch(model, tokens[:, start_pos:start_pos + seqlen], start_pos, strict=True)
    expected = expected_rows(config, len(model.schedule), BSZ, start_pos, seqlen)
    assert list(result.rows) == list(expected)  # every row, in execution order
    for key, count in expected.items():
        assert result.rows[key] == count, key
    assert result.total == sum(expected.values(), ZERO)
    assert result.unknown_ops == {}
    assert result.name == "torch"
    # the repeated layer got two rows, one per run
    assert result.position_total(1) == result.position_total(2) != ZERO


def _plain_flop_counter_mode(model, tokens, start_pos) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as fcm:
        model(tokens, start_pos)
    return fcm.get_total_flops()


@pytest.mark.parametrize("attn_kernel,device", [("math", "cpu"), ("sdpa", "cpu"), ("sdpa", "meta")])
def test_notes_report_flop_counter_mode_alone(attn_kernel, device):
    start_pos, seqlen = 0, 5
    model, tokens = make_model(TINY, attn_kernel, device, start_pos)
    x = tokens[:, :seqlen]
    plain = _plain_flop_counter_mode(model, x, start_pos)  # what FlopCounterMode alone says (2 per MAC)
    result = count_torch(model, x, start_pos, strict=True)
    macs, flops = result.total.macs, result.total.nonmatmul_flops
    assert result.notes[0].startswith(f"FlopCounterMode alone: {plain} FLOPs = {plain // 2} MACs")
    assert f"misses {macs - plain // 2} MACs and {flops} non-matmul FLOPs" in result.notes[0]
    silent = result.notes[1]
    assert silent.startswith("FlopCounterMode left at zero (silently): ")
    for op in ("mean", "mul", "pow", "rsqrt", "silu", "add"):
        assert f" {op} x" in silent or f"; {op} x" in silent
    # 5 runs x bsz 2 x 4 heads x 5 x 5 scores x 16 x 2 matmuls
    attention_macs = 5 * BSZ * 4 * 5 * 5 * 16 * 2
    if (attn_kernel, device) == ("sdpa", "cpu"):
        # the CPU fused kernel: FlopCounterMode has no formula for it and counts 0
        assert plain // 2 == macs - attention_macs
        assert f"_scaled_dot_product_flash_attention_for_cpu x5 ({attention_macs} MACs" in silent
    else:
        # math: bmm; meta sdpa: the math decomposition's bmm - FlopCounterMode counts those MACs
        assert plain // 2 == macs
    if device == "meta" and attn_kernel == "sdpa":
        assert any("math decomposition 5 time(s)" in n for n in result.notes)


def test_baseline_schedule_full_size_shapes_on_meta():
    config = PRESETS["llama-2-70b"].replace(n_layers=2)  # full-size GQA layer shapes, no storage
    model = Llama(config, device="meta", attn_kernel="sdpa")
    n = 64
    tokens = torch.zeros(1, n, dtype=torch.long, device="meta")
    result = count_torch(model, tokens, 0, strict=True)
    assert result.rows == expected_rows(config, config.n_layers, 1, 0, n)


class _BackendCore(nn.Module):
    """AttentionCore calling one CUDA SDPA backend op directly (they have meta kernels), so the
    path "FlopCounterMode's sdpa formula for the MACs + ours for the rest" is tested without a GPU."""

    def __init__(self, n_rep: int, backend: str) -> None:
        super().__init__()
        self.n_rep, self.backend = n_rep, backend
        self.attn_kernel = "sdpa"  # the model builds no mask for a prefill without a cache, as for its own sdpa kernel

    def forward(self, xq, keys, values, mask):
        bsz, seqlen, n_heads, head_dim = xq.shape
        q = xq.transpose(1, 2)
        k = repeat_kv(keys, self.n_rep).transpose(1, 2)
        v = repeat_kv(values, self.n_rep).transpose(1, 2)
        causal = mask is None and seqlen > 1
        bias = None if mask is None else mask.expand(bsz, n_heads, seqlen, mask.shape[-1])
        op = getattr(torch.ops.aten, self.backend)
        if self.backend == "_scaled_dot_product_flash_attention":
            assert bias is None, "flash attention takes no mask"
            out = op(q, k, v, 0.0, causal)[0]
        else:  # efficient / cuDNN: (q, k, v, attn_bias, compute_log_sumexp, dropout_p, is_causal)
            out = op(q, k, v, bias, False, 0.0, causal)[0]
        return out.transpose(1, 2).reshape(bsz, seqlen, n_heads * head_dim)


GPU_BACKENDS = [("_scaled_dot_product_flash_attention", m) for m in ("prefill", "decode")] +\
               [(b, m) for b in ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
                for m in MODES]


@pytest.mark.parametrize("backend,mode", GPU_BACKENDS, ids=[f"{b.split('_')[-2]}-{m}" for b, m in GPU_BACKENDS])
def test_gpu_sdpa_backends_torch_macs_plus_our_rest(backend, mode):
    start_pos, seqlen = MODES[mode]
    model, tokens = make_model(TINY, "sdpa", "meta", start_pos)
    for layer in model.layers:
        layer.attention.core = _BackendCore(TINY.n_rep, backend)
    x = tokens[:, start_pos:start_pos + seqlen]
    plain = _plain_flop_counter_mode(model, x, start_pos)
    result = count_torch(model, x, start_pos, strict=True)
    assert result.rows == expected_rows(TINY, len(model.schedule), BSZ, start_pos, seqlen)
    assert plain == 2 * result.total.macs  # FlopCounterMode knows these kernels' matmuls ...
    core = T.ATTENTION_CORE.count(T.Attn(BSZ, seqlen, start_pos + seqlen, TINY.n_heads, TINY.n_kv_heads, TINY.head_dim,
                                         seqlen > 1))
    # ... but not their scale/mask/softmax: 5 runs of the core's non-matmul FLOPs
    assert f"{backend} x5 ({5 * core.nonmatmul_flops} FLOPs)" in result.notes[1]


@pytest.mark.parametrize("attn_kernel", ["math", "sdpa"])
def test_bf16_weights_and_compute_on_meta(attn_kernel):
    # meta: the compute dtype is the weights' (bf16); the fp32 upcasts of RMSNorm/RoPE/softmax are free casts
    start_pos, seqlen = MODES["cached-chunk"]
    model, tokens = make_bf16_meta_model(attn_kernel)
    result = count_torch(model, tokens[:, start_pos:start_pos + seqlen], start_pos, strict=True)
    assert model.compute_dtype == torch.bfloat16
    assert result.rows == expected_rows(TINY, len(model.schedule), BSZ, start_pos, seqlen)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_unknown_op_strict_raises_and_lenient_lists(device, caplog):
    model, tokens = make_model(TINY, "math", device, 0)
    model.layers[1].feed_forward.act = SinGate()  # layer 1 runs twice in SCHEDULE
    with pytest.raises(UncountedOpError, match="sin x2"):
        count_torch(model, tokens[:, :5], 0, strict=True)
    with caplog.at_level(logging.WARNING):
        result = count_torch(model, tokens[:, :5], 0, strict=False)
    assert result.unknown_ops == {"sin": 2}
    assert "sin x2" in caplog.text
    # the rest is still counted: the gate's multiply (2*5*176 = 1760 FLOPs), but nothing for sin
    for pos in (1, 2):
        assert result.rows[(pos, "feed_forward.act")] == Count(nonmatmul_flops=BSZ * 5 * TINY.hidden_dim)
