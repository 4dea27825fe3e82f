"""Crosscheck: one per-row table over the counters, exact equality, mismatches and unknown ops reported."""

from __future__ import annotations

import pytest
import torch

from counters.crosscheck import compare, crosscheck
from counters.primitives import Count
from counters.result import COUNTER_NAMES, SOURCE_FORMULA, SOURCE_SHAPES, CounterResult, outside
from counters.table import row_order
from llama_ref import Llama, LlamaConfig

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = LlamaConfig(name="small", dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=176,
                    max_seq_len=128)
DEEP = LlamaConfig(name="deep", dim=32, n_layers=32, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=48,
                   max_seq_len=64)
ALL = list(COUNTER_NAMES)


def _tokens(model, batch, n):
    return torch.zeros((batch, n), dtype=torch.long, device=model.device)


@pytest.mark.parametrize("cached", [0, 6], ids=["prefill", "decode-chunk"])
@pytest.mark.parametrize("cfg", [SMALL, SMALL.replace(n_kv_heads=4)], ids=["gqa", "mha"])
def test_all_available_counters_agree_on_cpu(cfg, cached):
    model = Llama(cfg, schedule="0,1x2,3")
    report = crosscheck(model, _tokens(model, 2, 3), start_pos=cached)
    assert report.counters == ALL
    assert report.agree, [str(m) for m in report.mismatches]
    assert report.complete
    assert report.params == model.param_count()
    assert [r.key for r in report.rows] == row_order(4)  # runs 0, 1, 1, 3
    macs = {t["macs"] for t in report.totals.values()}
    assert len(macs) == 1
    assert report.compared == {("forward", "macs"): ALL, ("forward", "nonmatmul_flops"): ALL}  # all on everything
    for name, t in report.totals.items():
        assert t["flops"] == 2 * t["macs"]
    assert report.totals["analytic"]["macs"] == report.analytic.macs
    # where each number comes from, and how many independent sources back each row
    assert report.sources()["analytic"] == {"macs": {SOURCE_FORMULA: report.analytic.macs},
                                            "nonmatmul_flops": {SOURCE_FORMULA: report.analytic.nonmatmul_flops}}
    assert set(report.sources()["fvcore"]["macs"]) == {outside("fvcore")}
    assert set(report.sources()["torch"]["macs"]) == {outside("torch")}
    wq = [r for r in report.rows if r.key == (0, "attention.wq")][0]
    assert wq.sources[("forward", "macs")] == [SOURCE_FORMULA, outside("fvcore"), outside("torch"), SOURCE_SHAPES]
    norm = [r for r in report.rows if r.key == (0, "attention_norm")][0]
    assert norm.sources == {("forward", "macs"): [], ("forward", "nonmatmul_flops"): [SOURCE_FORMULA, SOURCE_SHAPES]}


@pytest.mark.parametrize("attn_kernel, schedule, runs", [("math", "mid-expansion-with-repeats", 29), ("sdpa", "0-2,7x2", 5)])
def test_decode_one_token_on_meta_every_counter(attn_kernel, schedule, runs):
    model = Llama(DEEP, device="meta", schedule=schedule, attn_kernel=attn_kernel)
    report = crosscheck(model, _tokens(model, 1, 1), start_pos=40)
    assert report.agree, [str(m) for m in report.mismatches]
    # each run: QK^T + AV over 1 x 41 scores of 4 heads of 8: 2*4*41*8 = 2624 MACs
    core = [r for r in report.rows if r.module == "attention.core"]
    assert len(core) == runs and all(r.macs["analytic"] == 2624 for r in core)


def test_op_counters_named_explicitly():
    model = Llama(SMALL, device="meta")
    report = crosscheck(model, _tokens(model, 1, 4), counters=["hooks", "fvcore", "torch"])
    assert report.counters == ["hooks", "fvcore", "torch"] and report.analytic is None
    assert report.agree


def test_cache_is_restored():
    model = Llama(SMALL, device="meta")
    crosscheck(model, _tokens(model, 1, 2), start_pos=3, counters=["analytic", "hooks"])
    assert model.caches is None
    model.setup_cache(1, 16)
    before = model.caches
    crosscheck(model, _tokens(model, 1, 2), start_pos=3, counters=["analytic", "hooks"])
    assert model.caches is before


def test_layer_runs_aggregate_rows():
    model = Llama(SMALL, device="meta", schedule="0x2")
    report = crosscheck(model, _tokens(model, 1, 3), counters=["analytic", "hooks"])
    runs = report.layer_runs()
    assert [r.module for r in runs] == ["(root)", "tok_embeddings", "block", "block", "norm", "output"]
    assert sum(r.macs["hooks"] for r in runs) == report.totals["hooks"]["macs"]
    assert runs[2].macs == runs[3].macs


# ---------------------------------------------------------------- mismatches are found and named
def _result(name, rows, source=SOURCE_FORMULA):
    r = CounterResult(name)
    for key, count in rows.items():
        r.add(key, count, source)
    return r


BASE = {(None, "output"): Count(100, 0), (0, "attention.wq"): Count(10, 0), (0, "residual"): Count(0, 7)}


def _results(overrides=None):
    return {"analytic": _result("analytic", BASE), "hooks": _result("hooks", {**BASE, **(overrides or {})},
                                                                    SOURCE_SHAPES)}


def _compare(results, **kw):
    return compare(results, schedule=(0,), config=SMALL, batch=1, seqlen=1, start_pos=0, **kw)


def test_compare_exact_equality():
    assert _compare(_results()).agree


def test_compare_finds_one_mac_difference():
    report = _compare(_results({(0, "attention.wq"): Count(11, 0)}))
    assert not report.agree
    row = [m for m in report.mismatches if m.key == (0, "attention.wq")]
    assert len(row) == 1 and (row[0].expected, row[0].got, row[0].quantity) == (10, 11, "macs")
    assert any(m.key == (None, "TOTAL") for m in report.mismatches)
    assert "attention.wq" in str(row[0]) and "+1" in str(row[0])
    assert not [r for r in report.rows if r.key == (0, "attention.wq")][0].agree


def test_compare_rows_moved_between_modules_is_a_mismatch():
    res = _results()
    res["hooks"] = _result("hooks", {(None, "output"): Count(100, 0), (0, "attention.wk"): Count(10, 0),
                                     (0, "residual"): Count(0, 7)})
    report = _compare(res)
    assert not report.agree
    assert {m.key for m in report.mismatches} == {(0, "attention.wq"), (0, "attention.wk")}  # totals equal


def test_a_counter_that_lost_its_nonmatmul_flops_disagrees():
    """Reporting zero where the others report work is a disagreement, never "not counted"."""
    res = _results()
    res["torch"] = _result("torch", {k: Count(v.macs, 0) for k, v in BASE.items()}, outside("torch"))
    report = _compare(res)
    assert not report.agree
    assert [(m.key, m.quantity, m.counter, m.got) for m in report.mismatches] == [
        ((0, "residual"), "nonmatmul_flops", "torch", 0), ((None, "TOTAL"), "nonmatmul_flops", "torch", 0)]


def test_a_counter_is_compared_only_on_what_it_claims():
    res = _results()
    res["fvcore"] = _result("fvcore", {k: Count(v.macs, 0) for k, v in BASE.items()}, outside("fvcore"))
    res["fvcore"].claims = frozenset({("forward", "macs")})  # a counter can claim less than every quantity
    report = _compare(res)
    assert report.agree
    assert report.compared == {("forward", "macs"): ["analytic", "hooks", "fvcore"],
                               ("forward", "nonmatmul_flops"): ["analytic", "hooks"]}
    assert report.totals["fvcore"]["nonmatmul_flops"] is None
    assert any("fvcore: does not measure nonmatmul_flops (forward)" in n for n in report.notes)


def test_nonmatmul_difference_is_a_mismatch():
    report = _compare(_results({(0, "residual"): Count(0, 8)}))
    assert [m.quantity for m in report.mismatches if m.key == (0, "residual")] == ["nonmatmul_flops"]


def test_unknown_ops_are_reported():
    res = _results()
    res["hooks"].unknown_ops["module x.Y (layers.0.z)"] = 2
    report = _compare(res)
    assert report.agree and not report.complete
    assert report.unknown_ops["hooks"] == {"module x.Y (layers.0.z)": 2}


# ---------------------------------------------------------------- arguments
def test_unknown_counter_name():
    model = Llama(SMALL, device="meta")
    with pytest.raises(ValueError, match="bogus"):
        crosscheck(model, _tokens(model, 1, 2), counters=["analytic", "bogus"])


def test_bad_arguments():
    model = Llama(SMALL, device="meta")
    with pytest.raises(ValueError):
        crosscheck(model, torch.zeros(3, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError):
        crosscheck(model, _tokens(model, 1, 2), start_pos=-1)
