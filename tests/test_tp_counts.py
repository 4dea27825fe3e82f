"""Counting tensor-parallel ranks: per-rank sizes, collectives with their bytes, every rank on meta with a fake
process group (tiny, 7B, 70B), real gloo ranks through ``count --tp``, bad world sizes, sabotage, and the
roofline with a link.

Real ranks cost seconds (process start-up), so there are three spawns: ``count --tp 2`` of a preset, of a
2-shard Meta checkpoint, and the torchrun path (the CLI inside an existing world).
"""

from __future__ import annotations

import json

import pytest
import torch

import _tp_count_workers as W
from _ckpt_helpers import synth
from counters import cli
from counters.analytic import analyze
from counters.collectives import ALL_GATHER, ALL_REDUCE, Collective, collectives_total
from counters.crosscheck import crosscheck
from counters.studies import roofline as rl
from counters.studies.hardware import Hardware, Link, get_link
from counters.table import REPLICATED, SPLIT, Dims, all_rows
from counters.commands.count_tp import count_meta_ranks
from counters.tp import row_tp
from llama_ref.shapes import param_count
from llama_ref import Llama, LlamaConfig
from llama_ref.parallel import ColumnParallelLinear, RowParallelLinear, fake_world, spawn, tensor_parallel_llama
from llama_ref.parallel.collectives import all_reduce_sum

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = LlamaConfig.from_preset("tiny")  # dim 64, 4 heads / 2 kv heads of 16, hidden 176, vocab 256, 4 layers
REPLICATED_ROWS = {"(root)", "attention_norm", "ffn_norm", "residual", "norm"}


def _cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ================================================================ the table knows ranks
def test_dims_are_one_ranks_sizes():
    d = Dims(TINY, 2)
    # heads 4/2, kv heads 2/2, hidden 176/2, vocab 256/2, embedding columns 64/2; the residual stream whole
    assert (d.n_heads, d.n_kv_heads, d.q_dim, d.kv_dim) == (2, 1, 32, 16)
    assert (d.hidden_dim, d.vocab_size, d.embed_dim, d.dim, d.full_vocab_size) == (88, 128, 32, 64, 256)
    one = Dims(TINY)
    assert (one.n_heads, one.hidden_dim, one.vocab_size, one.embed_dim) == (4, 176, 256, 64)
    with pytest.raises(ValueError, match="n_kv_heads=2 .* not divisible by 4"):
        Dims(TINY, 4)


def test_every_row_is_split_or_replicated():
    marks = {r.name: r.tp for r in all_rows()}
    assert {n for n, t in marks.items() if t == REPLICATED} == REPLICATED_ROWS
    assert {n for n, t in marks.items() if t == SPLIT} == set(marks) - REPLICATED_ROWS
    assert all(row_tp(n) == t for n, t in marks.items())


@pytest.mark.parametrize("name, tp", [("tiny", 2), ("llama-2-7b", 2), ("llama-2-7b", 4), ("llama-2-7b", 8),
                                      ("llama-2-70b", 8), ("llama-3-8b", 8), ("llama-3.1-405b", 8)])
def test_closed_form_per_rank_sums_to_the_single_process(name, tp):
    config = LlamaConfig.from_preset(name)
    single = analyze(config, batch=2, seqlen=7, start_pos=5)
    rank = analyze(config, batch=2, seqlen=7, start_pos=5, tp=tp)
    for s, r in zip(single.rows, rank.rows):
        assert s.key == r.key
        if row_tp(s.module) == REPLICATED:  # every rank does all of it
            assert (r.macs, r.nonmatmul_flops) == (s.macs, s.nonmatmul_flops), s.key
        else:  # each rank exactly 1/tp of the row, so the sum over the ranks is the row
            assert (tp * r.macs, tp * r.nonmatmul_flops) == (s.macs, s.nonmatmul_flops), s.key
    assert tp * rank.macs == single.macs  # every MAC is in a split row
    assert tp * rank.kv_cache_bytes == single.kv_cache_bytes


def test_params_per_rank_match_a_meta_rank():
    config = LlamaConfig.from_preset("llama-2-70b")
    with fake_world(8, rank=5):
        model = tensor_parallel_llama(config, device="meta")
        assert model.param_count() == param_count(config, 8)


# ================================================================ collectives and their bytes
def test_collective_bytes():
    ar = Collective(ALL_REDUCE, 8, 2, 4)  # 8 elements of 2 bytes over 4 ranks
    assert ar.payload_bytes == 16
    assert ar.ring_bytes == 24  # 2(N-1)/N x payload = 6/4 x 16
    ag = Collective(ALL_GATHER, 8, 2, 4)
    assert ag.ring_bytes == 12  # (N-1)/N x output payload = 3/4 x 16
    assert Collective(ALL_REDUCE, 10, 2, 4).ring_bytes == 36  # chunks of ceil(10/4) = 3 elements: 2*3 steps x 3 x 2
    assert Collective(ALL_REDUCE, 10, 4, 1).ring_bytes == 0  # one rank sends nothing
    assert collectives_total([{ar: 2}, {ag: 1}]) == {"calls": 3, "payload_bytes": 48, "ring_bytes": 60}
    with pytest.raises(ValueError, match="unknown collective"):
        Collective("broadcast", 1, 1, 1)


def test_closed_form_collectives_of_one_rank():
    r = analyze(TINY, batch=2, seqlen=5, tp=2, weight_dtype_bytes=2, act_dtype_bytes=4)
    rows = 2 * 5
    emb = Collective(ALL_GATHER, rows * 64, 2, 2)  # gathered embeddings (10, 64) in the weight dtype
    red = Collective(ALL_REDUCE, rows * 64, 4, 2)  # wo / w2 partial sums (10, 64) in the activation dtype
    logits = Collective(ALL_GATHER, rows * 256, 4, 2)  # gathered logits (10, 256)
    want = {(None, "tok_embeddings"): {emb: 1}, (None, "output"): {logits: 1}}
    for pos in range(4):
        want[(pos, "attention.wo")] = {red: 1}
        want[(pos, "feed_forward.w2")] = {red: 1}
    assert r.collectives == want
    # ring bytes: 1/2 x 1280 + 8 x (2 x 1/2 x 2560) + 1/2 x 10240 = 640 + 20480 + 5120
    assert collectives_total(r.collectives.values())["ring_bytes"] == 26240
    assert analyze(TINY, seqlen=5).collectives == {}  # one process communicates nothing


# ================================================================ every rank on meta, fake process group
def test_tiny_all_ranks_every_counter():
    rep = count_meta_ranks(TINY, 2, batch=2, seqlen=5, start_pos=3)
    assert rep.agree, rep.mismatches[:5]
    assert rep.identical and rep.complete
    single = analyze(TINY, batch=2, seqlen=5, start_pos=3, weight_dtype_bytes=2, act_dtype_bytes=2)
    for name, t in rep.totals().items():
        assert t["macs"] == single.macs, name
    for r in rep.ranks:
        for name in rep.counters:
            assert 2 * r.totals[name]["macs"] == single.macs
            # each rank ran 2 all-reduces per layer run and 2 all-gathers, seen alike by every counter
            calls = sum(sum(v.values()) for v in r.results[name].collectives["forward"].values())
            assert calls == 2 * 4 + 2, name
    norms = sum(x.nonmatmul_flops for x in single.rows if x.module in REPLICATED_ROWS)
    assert rep.replicated()["all_ranks_nonmatmul_flops"] == 2 * norms


def test_7b_layout_every_counter_at_tp4():
    config = LlamaConfig.from_preset("llama-2-7b")
    rep = count_meta_ranks(config, 4, seqlen=3, schedule="0-1")  # two layers of 7B's shape, every counter
    assert rep.agree and rep.identical, rep.mismatches[:5]
    single = analyze(config, seqlen=3, schedule="0-1")
    assert all(4 * r.totals["fvcore"]["macs"] == single.macs for r in rep.ranks)


def test_70b_tp8_every_rank_in_seconds():
    config = LlamaConfig.from_preset("llama-2-70b")
    n = 4
    rep = count_meta_ranks(config, 8, seqlen=n, counters=["analytic", "hooks"])
    assert rep.agree and rep.identical and len(rep.ranks) == 8
    single = analyze(config, seqlen=n)
    assert rep.totals()["hooks"]["macs"] == single.macs
    assert all(8 * r.totals["hooks"]["macs"] == single.macs for r in rep.ranks)
    # bf16 on meta: gathers of (4, 8192) and (4, 32000), 160 all-reduces of (4, 8192), 2 bytes each
    t = rep.collectives_total()
    assert t["calls"] == 162
    assert t["payload_bytes"] == 2 * (n * 8192 + 160 * n * 8192 + n * 32000)
    assert t["ring_bytes"] == 2 * (7 * n * 8192 // 8 + 160 * 2 * 7 * n * 8192 // 8 + 7 * n * 32000 // 8)


def test_crosscheck_refuses_what_it_cannot_count_for_a_rank():
    from counters.generation import Generation
    from counters.crosscheck import crosscheck_generation
    from counters.training import Training

    with fake_world(2):
        model = tensor_parallel_llama(TINY, device="meta")
        toks = torch.zeros(1, 3, dtype=torch.long, device="meta")
        with pytest.raises(ValueError, match="training step of a tensor-parallel rank"):
            crosscheck(model, toks, training=Training())
        with pytest.raises(ValueError, match="generation task of a tensor-parallel rank"):
            crosscheck_generation(model, batch=1, generation=Generation(2, 2))


def test_strict_errors_survive_the_trip_from_a_rank():
    import pickle

    from counters.ops import UncountedOpError

    e = UncountedOpError("torch", {"cumsum": 2}, {"cumsum": ["no formula"]})
    back = pickle.loads(pickle.dumps(e))  # what spawn and torchrun's gather do with a rank's error
    assert type(back) is UncountedOpError and str(back) == str(e) and back.unknown_ops == {"cumsum": 2}


# ================================================================ sabotage
def test_a_parallel_layer_doing_extra_work_is_caught(monkeypatch):
    original = RowParallelLinear.forward

    def extra_matmul(self, x):
        y = original(self, x)
        return y + (y @ torch.ones(y.shape[-1], y.shape[-1], device=y.device, dtype=y.dtype)) * 0

    monkeypatch.setattr(RowParallelLinear, "forward", extra_matmul)
    rep = count_meta_ranks(TINY, 2, seqlen=3)
    assert not rep.agree
    bad = {(m.counter, m.key[1], m.quantity) for _, m in rep.mismatches}
    # hooks count the kind's product only (its forward was replaced in place); the op counters see the extra
    # product and its add in wo and w2 of every layer run, on every rank and summed over the ranks
    assert ("torch", "attention.wo", "macs") in bad and ("fvcore", "feed_forward.w2", "macs") in bad
    assert any(q.startswith("macs summed over 2 ranks") for _, _, q in bad)


def test_an_extra_collective_is_caught(monkeypatch):
    original = ColumnParallelLinear.forward

    def chatty(self, x):
        y = original(self, x)
        return y if self.gather_output else all_reduce_sum(y, self.group)

    monkeypatch.setattr(ColumnParallelLinear, "forward", chatty)
    rep = count_meta_ranks(TINY, 2, seqlen=3, counters=["analytic", "torch"])
    extra = [m for _, m in rep.mismatches if m.key[1] == "attention.wq" and m.quantity.startswith("collective")]
    assert extra and extra[0].expected == 0 and extra[0].got == 1


def test_an_uncovered_parallel_layer_is_listed_not_dropped():
    class Doubling(RowParallelLinear):
        def forward(self, x):
            return super().forward(x) * 2

    with fake_world(2):
        model = tensor_parallel_llama(TINY, device="meta")
        old = model.layers[0].attention.wo
        model.layers[0].attention.wo = Doubling(TINY.q_dim, TINY.dim, model.tp_group, device="meta")
        del old
        rep = crosscheck(model, torch.zeros(1, 3, dtype=torch.long, device="meta"), counters=["analytic", "hooks"])
    assert any(k.endswith("Doubling (layers.0.attention.wo)") for k in rep.unknown_ops["hooks"])
    assert not rep.agree


# ================================================================ real ranks: count --tp on 2 gloo processes
def test_count_tp2_tiny_preset_on_two_gloo_ranks(capsys, tmp_path):
    code, out, err = _cli(capsys, "count", "tiny", "--tp", 2, "--tokens", 6, "--batch", 2, "--format", "json")
    assert code == 0, err
    doc = json.loads(out)
    single = crosscheck(Llama(TINY), torch.zeros(2, 6, dtype=torch.long))  # fp32 on the CPU, as the ranks
    assert doc["schema"] == "llama-ref.count/3" and doc["tp"] == 2 and doc["agree"]
    assert "spawned gloo" in doc["mode"] and doc["weights"] == "random weights"
    for name in ("analytic", "hooks", "fvcore", "torch"):
        # summed over the ranks: the single-process count; each rank exactly half the MACs
        assert doc["totals"][name]["macs"] == single.totals[name]["macs"]
        assert [r["totals"][name]["macs"] for r in doc["ranks"]] == [single.totals[name]["macs"] // 2] * 2
    norms = sum(row.nonmatmul_flops for row in single.analytic.rows if row.module in REPLICATED_ROWS)
    assert doc["totals"]["torch"]["nonmatmul_flops"] == single.totals["torch"]["nonmatmul_flops"] + norms
    assert doc["collectives_total"]["calls"] == 10
    assert {(c["module"], c["op"], c["payload_bytes"]) for c in doc["collectives"]} >= {
        ("tok_embeddings", "all_gather", 2 * 6 * 64 * 4), ("attention.wo", "all_reduce", 2 * 6 * 64 * 4),
        ("output", "all_gather", 2 * 6 * 256 * 4)}  # fp32 weights and activations


def test_count_tp2_of_a_two_shard_meta_checkpoint(capsys, tmp_path):
    synth().write_checkpoint(TINY, tmp_path / "ckpt", "meta", 2, dtype=torch.bfloat16)
    out_file = tmp_path / "count.csv"
    code, out, err = _cli(capsys, "count", tmp_path / "ckpt", "--tp", 2, "--tokens", 4, "--format", "csv",
                          "--out", out_file)
    assert code == 0, err
    assert "2 ranks, counters agree" in out
    lines = out_file.read_text().splitlines()
    assert lines[0].startswith("rank,position,layer,module,tp,macs_analytic")
    by_rank = {}
    for line in lines[1:]:
        cells = line.split(",")
        by_rank.setdefault(cells[0], 0)
        by_rank[cells[0]] += int(cells[5])  # macs_analytic
    single = analyze(TINY, seqlen=4)
    assert by_rank == {"0": single.macs // 2, "1": single.macs // 2}
    # On meta each rank's files are checked (not loaded) in this process; the counts are the same.
    code, out, err = _cli(capsys, "count", tmp_path / "ckpt", "--tp", 2, "--tokens", 4, "--device", "meta",
                          "--format", "json")
    doc = json.loads(out)
    assert code == 0 and doc["agree"] and doc["weights"] == "checkpoint checked per rank, not loaded (meta)"
    assert [r["totals"]["torch"]["macs"] for r in doc["ranks"]] == [single.macs // 2] * 2


@pytest.mark.parametrize("stored, flag, label", [(torch.float32, [], "float32"), (torch.bfloat16, [], "bfloat16"),
                                                 (torch.float32, ["--dtype", "fp16"], "float16")])
def test_count_tp_on_meta_labels_the_dtype_the_ranks_were_built_in(capsys, tmp_path, stored, flag, label):
    # without --dtype a checkpoint's ranks are built in its own dtype (not bf16); the label says which
    synth().write_checkpoint(TINY, tmp_path / "ckpt", "meta", 2, dtype=stored)
    argv = ["count", tmp_path / "ckpt", "--tp", 2, "--tokens", 3, "--device", "meta", "--counters", "analytic,hooks"]
    code, out, err = _cli(capsys, *argv, *flag, "--format", "json")
    assert code == 0, err
    assert json.loads(out)["dtype"] == label
    code, out, err = _cli(capsys, *argv, *flag)
    assert code == 0, err
    assert f"(checkpoint checked per rank, not loaded (meta), {label})" in out.splitlines()[0]


def test_under_torchrun_rank_0_reports_and_the_others_are_silent():
    argv = ["count", "tiny", "--tp", "2", "--tokens", "3", "--device", "cpu", "--counters", "analytic,hooks,torch"]
    results = spawn(W.cli_as_torchrun, 2, [argv, ["count", "tiny", "--tp", "1", "--device", "cpu"]], threads=1)
    (code0, out0, err0), (wrong0, _, werr0) = results[0]
    (code1, out1, err1), (wrong1, wout1, werr1) = results[1]
    assert (code0, code1) == (0, 0), err0 + err1
    assert "the torchrun world (gloo, 2 ranks)" in out0 and "AGREE" in out0
    assert out1 == "" and err1 == ""
    assert (wrong0, wrong1) == (2, 2) and "torchrun started 2 rank(s)" in werr0
    assert wout1 == "" and werr1 == ""  # the same status, silently


# ================================================================ bad input
@pytest.mark.parametrize("argv, message", [
    (["--tp", "0"], "--tp must be >= 1, got 0"),
    (["--tp", "-2"], "--tp must be >= 1"),
    (["--tp", "3"], "cannot split tiny across 3 tensor-parallel ranks"),
    (["--tp", "4"], "n_kv_heads=2 .* not divisible by 4"),
    (["--tp", "8"], "more ranks than attention heads"),
    (["--tp", "2", "--train"], "--train with --tp"),
    (["--tp", "2", "--prompt", "3", "--generate", "2"], "--prompt/--generate with --tp"),
    (["--tp", "2", "--device", "cuda"], "no CUDA device"),
])
def test_bad_tp_input_exits_2_with_one_line(capsys, argv, message):
    import re

    code, out, err = _cli(capsys, "count", "tiny", *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err


def test_more_cpu_ranks_than_cpus_is_refused(capsys, monkeypatch, tmp_path):
    from counters.commands import count_tp

    cfg = tmp_path / "mha" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({"hidden_size": 64, "intermediate_size": 176, "num_attention_heads": 4,
                               "num_key_value_heads": 4, "num_hidden_layers": 1, "vocab_size": 256,
                               "max_position_embeddings": 64, "model_type": "llama"}))
    monkeypatch.setattr(count_tp.os, "cpu_count", lambda: 2)
    code, _, err = _cli(capsys, "count", cfg, "--tp", 4, "--tokens", 4, "--device", "cpu")
    assert code == 2 and "spawns 4 processes but this machine has 2 CPU(s)" in err
    code, out, err = _cli(capsys, "count", cfg, "--tp", 4, "--tokens", 4, "--counters", "analytic,hooks",
                          "--format", "json")
    doc = json.loads(out)  # the device was not asked for: 4 ranks on 2 CPUs are counted on meta instead
    assert code == 0 and doc["device"] == "meta" and "more than this machine's 2 CPU(s)" in doc["device_reason"]
    assert doc["agree"] and doc["ranks_identical"] and len(doc["ranks"]) == 4


# ================================================================ roofline with a link
class _Row:
    def __init__(self, macs, nbytes, position=0, module="attention.wo"):
        self.position, self.layer, self.module = position, position, module
        self.macs, self.nonmatmul_flops = macs, 0
        self.weight_bytes, self.act_bytes, self.kv_read_bytes, self.kv_write_bytes = nbytes, 0, 0, 0


def test_roofline_row_adds_the_collectives_time():
    hw = Hardware("toy", peak_flops=100.0, mem_bw=100.0, dtype="bf16", source="test")
    link = Link("toy", bandwidth=1000.0, source="test", latency=0.5)
    c = Collective(ALL_REDUCE, 1000, 2, 4)  # ring: 2 x 3 x 250 x 2 = 3000 bytes per call
    r = rl.roofline_row(_Row(500, 300), hw, collectives={c: 2}, link=link)
    # compute 2 x 500 / 100 = 10 s, memory 300 / 100 = 3 s; comm 6000 / 1000 + 2 x 0.5 = 7 s
    assert (r.t_compute_s, r.t_memory_s, r.comm_bytes, r.t_comm_s) == (10.0, 3.0, 6000, 7.0)
    assert (r.predicted_s, r.bound) == (17.0, "compute")
    slow = rl.roofline_row(_Row(500, 300), hw, collectives={c: 2}, link=Link("slow", 500.0, "test"))
    assert (slow.t_comm_s, slow.bound, slow.predicted_s) == (12.0, "comm", 22.0)  # 6000 / 500 > 10
    s = rl.summarize([r], link=link)
    assert (s["work_s"], s["comm_s"], s["communication_bound"]) == (10.0, 7.0, False)
    assert s["break_even_latency_s"] == 2.0  # (10 - 6000 / 1000) / 2 collectives
    with pytest.raises(ValueError, match="give the link"):
        rl.roofline_row(_Row(500, 300), hw, collectives={c: 1})


def test_link_presets_and_numbers():
    assert get_link("nvlink4").bandwidth == 450e9 and get_link("ib-hdr").bandwidth == 25e9
    assert get_link("12.5", 2e-6) == Link("12.5 GB/s", 12.5e9, get_link("12.5").source, 2e-6)
    for bad in ("fast", "0", "-3", "inf"):
        with pytest.raises(ValueError, match="link bandwidth"):
            get_link(bad)


def test_roofline_tp_shows_when_70b_becomes_communication_bound(capsys, tmp_path):
    def run(*extra):
        code, out, err = _cli(capsys, "roofline", "llama-2-70b", "--tp", 8, "--no-plot", "--out", tmp_path, *extra)
        assert code == 0, err
        return json.loads((tmp_path / "roofline.json").read_text()), out

    decode, out = run("--tokens", 1, "--cached", 2048, "--link-bandwidth", "nvlink4")
    assert decode["tp"] == 8 and decode["link"]["name"] == "nvlink4"
    # 160 all-reduces of (1, 8192) bf16 and the two gathers, ring bytes per rank
    assert decode["total"]["comm_ring_bytes"] == 160 * 2 * 7 * 8192 * 2 // 8 + 7 * 8192 * 2 // 8 + 7 * 32000 * 2 // 8
    assert not decode["total"]["communication_bound"] and "break_even_latency_s" in decode["total"]
    slow, _ = run("--tokens", 1, "--cached", 2048, "--link-bandwidth", "nvlink4", "--link-latency-us",
                  decode["total"]["break_even_latency_s"] * 1e6 * 1.01)
    assert slow["total"]["communication_bound"]  # just above the break-even latency
    prefill, out = run("--tokens", 2048, "--link-bandwidth", "ib-hdr")
    assert prefill["total"]["communication_bound"] and "COMMUNICATION-BOUND" in out


@pytest.mark.parametrize("argv, message", [
    (["--tp", "2"], "give the link"),
    (["--link-bandwidth", "nvlink4"], "add --tp N"),
    (["--tp", "2", "--link-bandwidth", "nope"], "link bandwidth 'nope'"),
    (["--tp", "3", "--link-bandwidth", "10"], "cannot split llama-2-7b across 3"),
    (["--tp", "2", "--link-bandwidth", "10", "--measure", "--hardware", "cpu"], "--measure and --timings"),
])
def test_roofline_bad_tp_input(capsys, tmp_path, argv, message):
    code, _, err = _cli(capsys, "roofline", "llama-2-7b", "--no-plot", "--out", tmp_path, *argv)
    assert code == 2 and message in err, err
