"""scripts/bench.py (counters.studies.bench): the quick run's JSON, table and plot; interleaving; the meta-device child."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench():
    from counters.studies import bench

    return bench


@pytest.fixture(scope="module")
def quick_doc(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = bench.main(["--quick", "--device", "cpu", "--no-meta", "--repeats", "1", "--out", str(out)])
    assert rc == 0
    return out, json.loads((out / "bench.json").read_text())


def test_quick_run_writes_json_and_plot(quick_doc):
    out, doc = quick_doc
    assert (out / "bench.png").read_bytes()[:8] == PNG_MAGIC
    assert doc["quick"] is True and doc["goals"] == {"prefill_ratio_max": 1.0, "decode_ratio_min": 1.0,
                                                     "hooks_overhead_max": 1.05}
    m = doc["machine"]
    assert m["torch_threads"] == torch.get_num_threads()
    cpu = doc["devices"]["cpu"]
    pm = cpu["peaks_measured"]
    assert pm["before"]["measured"] and pm["after"]["measured"]
    assert cpu["peak_flops"] == max(pm["before"]["peak_flops"], pm["after"]["peak_flops"])
    assert cpu["mem_bw"] == max(pm["before"]["mem_bw"], pm["after"]["mem_bw"])
    assert cpu["dtype"] == "float32" and cpu["config"]["n_layers"] == 2
    contenders = {"llama_ref_sdpa", "llama_ref_math", "transformers_sdpa"}
    pf = cpu["prefill"]
    assert set(pf["median_s"]) == contenders and all(v > 0 for v in pf["median_s"].values())
    # One round (--repeats 1): the paired median, the ratio of medians and of minima coincide.
    assert pf["ratio"] == pf["ratio_detail"]["paired_median"]
    assert pf["ratio"] == pytest.approx(pf["median_s"]["llama_ref_sdpa"] / pf["median_s"]["transformers_sdpa"])
    assert pf["ratio_detail"]["of_mins"] == pytest.approx(pf["ratio"])
    assert isinstance(pf["met"], bool) and pf["logits_max_rel_diff"] < 1e-4  # same weights, same numbers
    assert pf["verdict"] in ("met", "not met", "within noise") and len(pf["ci95"]) == 2
    assert cpu["decode"]["verdict"] in ("met", "not met", "within noise")
    assert pf["analytic_flops"] > 0 and all(0 < e for e in pf["efficiency_vs_peak"].values())
    dc = cpu["decode"]
    assert dc["same_tokens"] is True  # greedy decoding with the same weights gives the same tokens
    assert dc["timed_steps"] == dc["new_tokens"] == 8
    # Decode is paired step by step: 8 steps x 1 round = 8 pairs.
    assert dc["pairs"] == 8 and len(dc["ratio_detail"]["per_round"]) == 8
    assert dc["ratio"] == dc["ratio_detail"]["paired_median"] > 0
    assert dc["ratio_of_round_medians"] == pytest.approx(
        dc["tokens_per_s"]["llama_ref_sdpa"] / dc["tokens_per_s"]["transformers_sdpa"])
    assert ct_ok(cpu["counting"])
    ct = cpu["counting"]
    assert set(ct["overhead_ratio"]) == {"hooks", "fvcore", "torch"}
    assert all(r > 0 for r in ct["overhead_ratio"].values())
    # Fixed-cost estimate from a same-depth tiny model.
    assert ct["fixed_cost"]["probe_config"]["n_layers"] == cpu["config"]["n_layers"]
    assert set(ct["overhead_estimate"]) == {"hooks", "fvcore", "torch"}
    for k, est in ct["overhead_estimate"].items():
        assert est == pytest.approx(1 + ct["fixed_cost"]["extra_s"][k] / ct["median_s"]["plain"])
    assert isinstance(ct["met_by_estimate"], bool)


def ct_ok(ct):
    return all(ct["overhead_ratio"][k] == ct["overhead_detail"][k]["paired_median"] for k in ct["overhead_ratio"])


def test_paired_ratio(bench):
    samples = {"a": [2.0, 4.0, 10.0], "b": [1.0, 4.0, 2.0]}  # per-round ratios 2, 1, 5
    r = bench.paired_ratio(samples, "a", "b")
    assert r["per_round"] == [2.0, 1.0, 5.0] and r["paired_median"] == 2.0
    assert r["of_medians"] == 4.0 / 2.0 and r["of_mins"] == 2.0 / 1.0


def test_ci_and_verdict(bench):
    lo, hi = bench.bootstrap_median_ci([1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02])
    assert 0.9 <= lo <= 1.0 <= hi <= 1.1
    assert bench.bootstrap_median_ci([1.0, 1.1, 0.9]) == bench.bootstrap_median_ci([1.0, 1.1, 0.9])  # deterministic
    assert bench.verdict(0.9, [0.85, 0.95], 1.0, higher_is_better=False) == "met"
    assert bench.verdict(1.1, [1.05, 1.2], 1.0, higher_is_better=False) == "not met"
    assert bench.verdict(1.01, [0.95, 1.08], 1.0, higher_is_better=False) == "within noise"
    assert bench.verdict(1.1, [1.02, 1.2], 1.0, higher_is_better=True) == "met"
    assert bench.verdict(0.9, [0.8, 0.99], 1.0, higher_is_better=True) == "not met"


def test_report_table(bench, quick_doc):
    _, doc = quick_doc
    text = bench.format_report(doc)
    for needle in ("prefill N=32", "decode 8 tok", "counting overhead", "same greedy tokens", "<= 1.0", ">= 1.0"):
        assert needle in text


def test_interleaved_cycles_through_every_order(bench):
    calls = []
    contenders = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    samples = bench.interleaved(contenders, repeats=6, warmup=1, device=torch.device("cpu"))
    assert calls[:3] == list("abc")  # warm-up
    rounds = ["".join(calls[3 + 3 * r: 6 + 3 * r]) for r in range(6)]
    assert sorted(rounds) == ["abc", "acb", "bac", "bca", "cab", "cba"]  # 6 rounds: each order once
    # So each contender runs right after each other one equally often (a rotation would not).
    follows = {}
    for rnd in rounds:
        for x, y in zip(rnd, rnd[1:]):
            follows[(x, y)] = follows.get((x, y), 0) + 1
    assert set(follows.values()) == {2} and len(follows) == 6
    assert {k: len(v) for k, v in samples.items()} == {"a": 6, "b": 6, "c": 6}


def test_meta_child_counts_a_big_model_without_memory(bench):
    # The same child process the full run uses for llama-2-70b, here on 7B with the fast counter.
    res = bench.bench_meta("llama-2-7b", 64, ["hooks"], timeout=300)
    assert "error" not in res, res
    assert res["params"] == 6_738_415_616
    assert res["counters"]["hooks"]["agree_with_analytic"] is True
    assert res["counters"]["hooks"]["macs"] == res["analytic_macs"]
    assert 0 < res["peak_rss_mb"] < 2000  # shapes only: no 13 GB of weights


def test_meta_child_reports_counters_that_fail(bench, monkeypatch):
    def boom(model, tokens, start_pos=0, **kw):
        raise RuntimeError("cannot run on meta")

    monkeypatch.setitem(bench.COUNTER_FUNCTIONS, "hooks", boom)
    res = bench.meta_count_child("tiny", 4, ["hooks"])
    assert res["counters"]["hooks"]["error"].startswith("RuntimeError: cannot run on meta")
