"""Hook counter: counts from real tensor shapes, per schedule position, equal to the closed form."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from counters.analytic import analyze
from counters.commands.schedules import measure_polynomial
from counters.hooks import HookCounter, UncountedModuleError, count_hooks
from counters.table import row_order
from llama_ref import PRESETS, SCHEDULE_NAMES, Llama, LlamaConfig

SMALL = LlamaConfig(name="small", dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=176,
                    max_seq_len=128)
SMALL_MHA = SMALL.replace(name="small-mha", n_kv_heads=4)
# Many tiny ops: one intra-op thread avoids fork/join stalls when the 2 cores are shared.
pytestmark = pytest.mark.usefixtures("single_thread")

DEEP = LlamaConfig(name="deep", dim=32, n_layers=32, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=48,
                   max_seq_len=64)


def _tokens(model: Llama, batch: int, n: int) -> torch.Tensor:
    return torch.zeros((batch, n), dtype=torch.long, device=model.device)


def _assert_equal_rows(counted, expected):
    keys = set(counted.rows) | set(expected.rows)
    diffs = {k: (counted.get(k), expected.get(k)) for k in keys if counted.get(k) != expected.get(k)}
    assert not diffs
    assert counted.total == expected.total


def _count_step(model: Llama, batch: int, n: int, cached: int, **kw):
    if cached:
        model.setup_cache(batch, cached + n)
        with torch.no_grad():
            model(_tokens(model, batch, cached), 0)
    try:
        return count_hooks(model, _tokens(model, batch, n), cached, **kw)
    finally:
        model.clear_cache()


# ---------------------------------------------------------------- equality with the closed form
@pytest.mark.parametrize("cfg", [SMALL, SMALL_MHA], ids=["gqa", "mha"])
@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("batch, n, cached", [(1, 7, 0), (2, 5, 0), (1, 1, 9), (3, 4, 6)],
                         ids=["prefill", "prefill-b2", "decode", "chunk-b3"])
def test_hooks_equal_analytic(cfg, device, batch, n, cached):
    model = Llama(cfg, device=device, schedule="0-1x2,3")
    counted = _count_step(model, batch, n, cached)
    expected = analyze(cfg, batch=batch, seqlen=n, start_pos=cached, schedule="0-1x2,3").as_counter_result()
    _assert_equal_rows(counted, expected)
    assert counted.unknown_ops == {}


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_every_schedule_preset_on_meta(schedule):
    model = Llama(DEEP, device="meta", schedule=schedule)
    counted = _count_step(model, 2, 3, 4)
    expected = analyze(DEEP, batch=2, seqlen=3, start_pos=4, schedule=schedule).as_counter_result()
    _assert_equal_rows(counted, expected)
    assert {k for k in counted.rows} <= set(row_order(len(model.schedule)))


def test_sdpa_kernel_counts_like_math():
    for attn_kernel in ("math", "sdpa"):
        model = Llama(SMALL, attn_kernel=attn_kernel)
        for cached in (0, 5):
            counted = _count_step(model, 2, 3, cached)
            _assert_equal_rows(counted, analyze(SMALL, batch=2, seqlen=3, start_pos=cached).as_counter_result())


# ---------------------------------------------------------------- positions
def test_repeated_layer_is_counted_per_run():
    model = Llama(SMALL, device="meta", schedule=[2, 2, 2])
    counted = count_hooks(model, _tokens(model, 1, 4))
    per_run = [counted.position_total(p) for p in range(3)]
    assert per_run[0] == per_run[1] == per_run[2] and per_run[0].macs > 0
    assert counted.position_total(3) == counted.position_total(3).__class__()  # no 4th position


def test_positions_reset_per_forward():
    model = Llama(SMALL, device="meta")
    with HookCounter(model) as hc, torch.no_grad():
        model(_tokens(model, 1, 4))
        model(_tokens(model, 1, 4))
    positions = {k[0] for k in hc.result.rows if k[0] is not None}
    assert positions == {0, 1, 2, 3}  # two forwards accumulate into the same 4 positions
    single = count_hooks(model, _tokens(model, 1, 4))
    assert hc.result.total == single.total * 2


def test_hooks_follow_real_shapes_not_the_config():
    """A model whose config object lies still gets the counts of what actually ran."""
    model = Llama(SMALL, device="meta")
    model.config = SMALL.replace(dim=128, n_heads=8, hidden_dim=999)  # shapes did not change
    counted = count_hooks(model, _tokens(model, 2, 5))
    _assert_equal_rows(counted, analyze(SMALL, batch=2, seqlen=5).as_counter_result())


# ---------------------------------------------------------------- single modules
def test_single_block_modules_from_a_forward():
    model = Llama(SMALL, device="meta")
    counted = count_hooks(model, _tokens(model, 1, 5))
    # w1: 5*64*176 = 56320 MACs
    assert counted.get((0, "feed_forward.w1")).macs == 56320
    # dense 5x5 scores, 4 query heads, head_dim 16, QK^T + AV: 2*4*25*16 = 3200 MACs
    assert counted.get((0, "attention.core")).macs == 3200
    # embedding lookup: 0 MACs, but the row is there (counted, not forgotten)
    assert (None, "tok_embeddings") in counted.rows and counted.get((None, "tok_embeddings")).macs == 0


# ---------------------------------------------------------------- unknown modules, cleanup, cost
class _CustomGate(nn.Module):
    def forward(self, gate, up):
        return torch.sigmoid(gate) * gate * up


def _model_with_custom_gate():
    model = Llama(SMALL, device="meta")
    model.layers[1].feed_forward.act = _CustomGate()
    return model


def test_unknown_module_is_listed_not_silently_zero(caplog):
    model = _model_with_custom_gate()
    with caplog.at_level(logging.WARNING, logger="counters.hooks"):
        counted = count_hooks(model, _tokens(model, 1, 3))
    (name,) = counted.unknown_ops
    assert "_CustomGate" in name and "layers.1.feed_forward.act" in name
    assert counted.unknown_ops[name] == 1
    assert any("NOT counted" in r.message for r in caplog.records)


def test_unknown_module_strict_raises_and_hooks_are_removed():
    model = _model_with_custom_gate()
    with pytest.raises(UncountedModuleError, match="_CustomGate"):
        count_hooks(model, _tokens(model, 1, 3), strict=True)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_hooks_removed_after_counting():
    model = Llama(SMALL, device="meta")
    count_hooks(model, _tokens(model, 1, 3))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def test_hooks_do_no_tensor_work():
    """Hooks cost shape arithmetic only: a hooked forward dispatches exactly the plain forward's ops."""
    model = Llama(SMALL)
    toks = torch.randint(0, SMALL.vocab_size, (2, 6))
    with torch.no_grad():
        with _OpCounter() as plain:
            model(toks)
        with HookCounter(model), _OpCounter() as hooked:
            model(toks)
    assert hooked.n == plain.n > 0


# ---------------------------------------------------------------- the big models on meta
def test_llama2_7b_measured_polynomial():
    model = Llama(PRESETS["llama-2-7b"], device="meta", dtype=torch.bfloat16)
    a, b = measure_polynomial(model, 1, 2)
    assert (a, b) == (6_607_077_376, 262_144)


def test_llama2_70b_n4096_on_meta():
    cfg = PRESETS["llama-2-70b"]
    model = Llama(cfg, device="meta", dtype=torch.bfloat16)
    counted = count_hooks(model, _tokens(model, 1, 4096))
    assert counted.total.macs == 68_713_185_280 * 4096 + 1_310_720 * 4096 ** 2 == 303_439_439_462_400
    _assert_equal_rows(counted, analyze(cfg, seqlen=4096).as_counter_result())


def test_subclass_overriding_forward_gets_no_inherited_formula():
    from llama_ref.model import RMSNorm

    class CenteredNorm(RMSNorm):  # does more work than RMSNorm: no formula by inheritance
        def forward(self, x):
            return super().forward(x - x.mean(-1, keepdim=True))

    class SameNorm(RMSNorm):  # a subclass that keeps RMSNorm's forward keeps its formula
        pass

    model = Llama(SMALL, device="meta")
    model.layers[0].ffn_norm = CenteredNorm(SMALL.dim, device="meta")
    model.layers[1].ffn_norm = SameNorm(SMALL.dim, device="meta")
    counted = count_hooks(model, _tokens(model, 1, 3))
    assert list(counted.unknown_ops) == [f"module {__name__}.test_subclass_overriding_forward_gets_no_inherited_formula"
                                         ".<locals>.CenteredNorm (layers.0.ffn_norm)"]
    assert counted.get((1, "ffn_norm")) == analyze(SMALL, seqlen=3).as_counter_result().get((1, "ffn_norm"))
