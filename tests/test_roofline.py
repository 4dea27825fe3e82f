"""``llama-ref roofline``: the roofline formulas, the table, the plots, timing and the subcommand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from counters.analytic import analyze
from counters.cli import main
from counters.studies import factory, plots
from counters.studies import timing as timers
from counters.studies import roofline as rl
from counters.studies import roofline_command as cmd
from counters.table import timed_block_paths
from counters.commands.common import BadInput
from counters.studies.hardware import Hardware, table_hardware
from llama_ref import LlamaConfig

H100 = table_hardware("h100-sxm")  # 989e12 FLOP/s, 3.35e12 B/s, ridge 295.2 FLOP/B
# A made-up device for fast CLI runs (no measurement): ridge 10 FLOP/B.
FAKE_CPU = Hardware(name="cpu", peak_flops=1e11, mem_bw=1e10, dtype="fp32", source="test", measured=True)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(module, position=None):
    rep = analyze(LlamaConfig.from_preset("llama-2-7b"), seqlen=1)
    return next(r for r in rep.rows if r.module == module and r.position == position)


# ------------------------------------------------------------------ formulas, on hand-derived examples
def test_decode_projection_on_h100_by_hand():
    # One token through wq of Llama-2-7B (4096 x 4096, bf16):
    #   FLOPs = 2 * 1 * 4096 * 4096                         = 33,554,432
    #   bytes = weight 4096*4096*2 + x in 4096*2 + q out 4096*2 = 33,554,432 + 16,384 = 33,570,816
    #   t_compute = 33,554,432 / 989e12 = 3.393e-8 s
    #   t_memory  = 33,570,816 / 3.35e12  = 1.0021e-5 s   -> memory bound, ~295x slower than compute
    row = rl.roofline_row(_row("attention.wq", 0), H100)
    assert row.flops == 33_554_432 and row.bytes == 33_570_816
    assert row.t_compute_s == pytest.approx(33_554_432 / 989e12)
    assert row.t_memory_s == pytest.approx(33_570_816 / 3.35e12)
    assert row.predicted_s == pytest.approx(1.00211e-5, rel=1e-5)
    assert row.bound == "memory"
    assert row.intensity == pytest.approx(33_554_432 / 33_570_816)


def test_prefill_projection_on_h100_by_hand():
    # N = 2048 tokens through the same wq: FLOPs = 2 * 2048 * 4096^2 = 68,719,476,736;
    # bytes = 4096^2*2 (weight) + 2 * 2048*4096*2 (in + out) = 33,554,432 + 33,554,432 = 67,108,864;
    # intensity = 1024 FLOP/B > ridge 989/3.35 = 295.2 -> compute bound, t = 68.72e9 / 989e12 = 69.48 us.
    rep = analyze(LlamaConfig.from_preset("llama-2-7b"), seqlen=2048)
    row = rl.roofline_row(next(r for r in rep.rows if r.module == "attention.wq"), H100)
    assert row.flops == 68_719_476_736 and row.bytes == 67_108_864
    assert row.intensity == pytest.approx(1024.0)
    assert row.bound == "compute"
    assert row.predicted_s == pytest.approx(68_719_476_736 / 989e12)
    assert row.predicted_s == pytest.approx(69.484e-6, rel=1e-4)


def test_bound_and_attainable():
    # ridge = 1e11 / 1e10 = 10 FLOP/B
    assert rl.bound(1e9, 1e6, 1e11, 1e10) == "compute"
    assert rl.bound(1e6, 1e9, 1e11, 1e10) == "memory"
    assert rl.bound(100, 10, 1e11, 1e10) == "compute"  # exactly at the ridge: both roofs equal -> compute
    assert rl.bound(99, 10, 1e11, 1e10) == "memory"
    assert rl.bound(0, 0, 1e11, 1e10) == "none"
    assert rl.attainable_flops(1.0, 1e11, 1e10) == 1e10
    assert rl.attainable_flops(100.0, 1e11, 1e10) == 1e11


def test_table_summary_and_measured_values():
    rep = analyze(LlamaConfig.from_preset("tiny"), seqlen=8, start_pos=4)
    runs = rep.layer_runs()
    measured = {(0, "block"): 2e-3, (None, "output"): 1e-3}
    table = rl.roofline_table(runs, FAKE_CPU, measured)
    assert [r.key for r in table] == [(r.position, r.module) for r in runs]
    assert sum(r.flops for r in table) == rep.total.total_flops
    assert sum(r.bytes for r in table) == rep.total.bytes
    blk = table[2]
    assert blk.module == "block" and blk.measured_s == 2e-3
    assert blk.achieved_flops_per_s == pytest.approx(blk.flops / 2e-3)
    assert table[3].measured_s is None and table[3].achieved_flops_per_s is None
    s = rl.summarize(table, batch=1, seqlen=8)
    assert s["predicted_s"] == pytest.approx(sum(r.predicted_s for r in table))
    assert s["measured_rows"] == 2 and s["measured_s"] == pytest.approx(3e-3)
    assert s["compute_bound_rows"] + s["memory_bound_rows"] + sum(r.bound == "none" for r in table) == len(table)
    text = rl.format_table(table, FAKE_CPU, s)
    assert "measured" in text and "block" in text and "total:" in text
    json.dumps([r.to_dict() for r in table])  # JSON-able (inf intensities become null)


# ------------------------------------------------------------------ plots
def test_plots_are_written(tmp_path):
    cfg = LlamaConfig.from_preset("tiny")
    rep = analyze(cfg, seqlen=16)
    table = rl.roofline_table(rep.layer_runs(), FAKE_CPU, {(1, "block"): 1e-3})
    detail = rl.roofline_table([r for r in rep.rows if r.position == 0], FAKE_CPU)
    p = plots.plot_roofline(table, FAKE_CPU, tmp_path / "r.png", title="t", detail=detail)
    assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 10_000
    p2, curves = plots.plot_macs_vs_context(cfg, tmp_path / "m.png", schedules=["baseline", "0,1"], contexts=[1, 8, 64])
    assert p2.read_bytes()[:8] == PNG_MAGIC
    assert curves["baseline"] == [analyze(cfg, seqlen=1, start_pos=L - 1).macs for L in (1, 8, 64)]
    assert curves["0,1"][0] < curves["baseline"][0]


def test_macs_per_token_curves_for_schedules():
    cfg = LlamaConfig.from_preset("llama-2-7b")
    names = plots.default_schedules(cfg)
    assert names[0] == "baseline" and len(names) == 7
    assert plots.default_schedules(LlamaConfig.from_preset("tiny"), "0-2") == ["baseline", "0-2"]
    ctx = plots.default_contexts(4096, n=5)
    assert ctx[0] == 1 and ctx[-1] == 4096 and ctx == sorted(ctx)
    curves = plots.macs_per_token_curves(cfg, names, ctx)
    for ys in curves.values():
        assert all(b > a for a, b in zip(ys, ys[1:]))  # attention grows with context
    # Same number of layer runs (29) -> the same MACs per token, whatever layers they are.
    assert curves["skip-24-26"] == curves["mid-expansion-with-repeats"] == curves["skip-near-end-keep-last-two"]
    assert curves["two-thirds"][0] < curves["baseline"][0]


def test_importing_roofline_leaves_matplotlib_alone():
    # Importing the module must not even import matplotlib (the backend is chosen inside the plot functions).
    code = ("import sys; import counters.studies.roofline, counters.studies.plots, counters.cli; "
            "assert not [m for m in sys.modules if m.startswith('matplotlib')]; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ------------------------------------------------------------------ timing
class CountingTimer:
    """Deterministic timer: every mark is the next integer, so a module's 'seconds' is the number of marks taken
    while it ran (plus one)."""

    def __init__(self):
        self.t = 0

    def mark(self):
        self.t += 1
        return float(self.t)

    def synchronize(self):
        pass

    @staticmethod
    def seconds(a, b):
        return b - a


def test_layer_timer_positions_with_repeated_layers(make_model):
    cfg = LlamaConfig.from_preset("tiny")
    model = make_model(cfg, schedule="0,1,1,3")
    tokens = torch.randint(0, cfg.vocab_size, (1, 5))
    timing = timers.time_forward(model, tokens, timer=CountingTimer(), warmup=1, repeats=2)
    keys = set(timing.median)
    assert {(p, "block") for p in range(4)} <= keys
    assert {(None, m) for m in ("tok_embeddings", "norm", "output", "(total)", "(root)")} <= keys
    # Marks: total start, emb start/end, 4 x block start/end, norm start/end, output start/end, total end:
    # 16 marks, so the total spans 15 ticks and each module 1.
    assert timing.median[(None, "(total)")] == 15
    assert all(timing.median[(p, "block")] == 1 for p in range(4))
    inside = sum(v for (p, m), v in timing.median.items() if m in ("tok_embeddings", "norm", "output", "block"))
    assert timing.median[(None, "(root)")] == 15 - inside
    # Hooks are gone afterwards.
    assert not model._forward_hooks and not model.layers[1]._forward_pre_hooks


def test_layer_timer_module_level(make_model):
    cfg = LlamaConfig.from_preset("tiny")
    model = make_model(cfg, schedule="0,2")
    tokens = torch.randint(0, cfg.vocab_size, (1, 3))
    timing = timers.time_forward(model, tokens, warmup=0, repeats=1, level="module")
    for pos in (0, 1):
        for m in timed_block_paths():
            assert timing.median[(pos, m)] >= 0
        assert timing.median[(pos, "block")] >= timing.median[(pos, "attention.wq")]
    with pytest.raises(ValueError):
        timers.LayerTimer(model, CountingTimer(), level="op")
    assert isinstance(timers.make_timer("cpu"), timers.WallClockTimer)


def test_random_model_is_on_device_and_frozen():
    cfg = LlamaConfig.from_preset("tiny")
    m = factory.random_model(cfg, seed=3)
    assert not any(p.requires_grad for p in m.parameters())
    assert torch.isfinite(m(torch.zeros(1, 2, dtype=torch.long))).all()
    w = m.layers[0].attention_norm.weight
    assert not torch.all(w == 1)  # norms randomized: a swapped norm would show
    assert torch.equal(factory.random_model(cfg, seed=3).layers[0].attention.wq.weight, m.layers[0].attention.wq.weight)


# ------------------------------------------------------------------ the subcommand
def _run(*argv) -> int:
    return main(["roofline", *argv])


def test_run_prediction_only_7b_decode(tmp_path, capsys):
    rc = _run("llama-2-7b", "--tokens", "1", "--cached", "2047", "--out", str(tmp_path))
    assert rc == 0
    out = capsys.readouterr().out
    assert "memory" in out and "h100-sxm" in out and "predicted" in out
    doc = json.loads((tmp_path / "roofline.json").read_text())
    assert doc["hardware"]["name"] == "h100-sxm" and doc["dtype"] == "bf16"
    assert doc["n_tokens"] == 1 and doc["n_cached"] == 2047
    assert len(doc["layers"]) == 2 + 32 + 2
    blocks = [r for r in doc["layers"] if r["module"] == "block"]
    assert len(blocks) == 32 and all(r["bound"] == "memory" for r in blocks)
    for key in ("position", "layer", "module", "flops", "bytes", "intensity", "bound", "predicted_s", "measured_s"):
        assert key in blocks[0]
    assert doc["total"]["predicted_s"] == pytest.approx(sum(r["predicted_s"] for r in doc["layers"]))
    assert doc["measurement"] is None
    for name in ("roofline.png", "macs_vs_context.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert set(doc["macs_per_token_vs_context"]["schedules"]) == set(plots.default_schedules(LlamaConfig.from_preset("llama-2-7b")))


def test_run_prefill_is_compute_bound_and_cpu_uses_fp32(tmp_path, monkeypatch):
    monkeypatch.setattr(cmd, "get_hardware", lambda name, dtype=None, **kw: FAKE_CPU if name == "cpu" else table_hardware(name, dtype or "bf16"))
    assert _run("llama-2-7b", "--tokens", "2048", "--no-plot", "--out", str(tmp_path)) == 0
    doc = json.loads((tmp_path / "roofline.json").read_text())
    assert all(r["bound"] == "compute" for r in doc["layers"] if r["module"] in ("block", "output"))
    assert _run("llama-2-7b", "--hardware", "cpu", "--tokens", "4", "--no-plot", "--out", str(tmp_path)) == 0
    doc = json.loads((tmp_path / "roofline.json").read_text())
    assert doc["dtype"] == "fp32" and doc["hardware"]["name"] == "cpu"
    out = next(r for r in doc["layers"] if r["module"] == "output")
    assert out["weight_bytes"] == 4096 * 32000 * 4  # fp32 weights: 4 bytes each


def test_run_measure_on_cpu_tiny(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cmd, "get_hardware", lambda name, dtype=None, **kw: FAKE_CPU)
    rc = _run("tiny", "--hardware", "cpu", "--tokens", "8", "--cached", "4", "--measure", "--warmup", "0",
                      "--repeats", "1", "--out", str(tmp_path))
    assert rc == 0
    doc = json.loads((tmp_path / "roofline.json").read_text())
    blocks = [r for r in doc["layers"] if r["module"] == "block"]
    assert len(blocks) == 4 and all(r["measured_s"] > 0 and r["achieved_flops_per_s"] > 0 for r in blocks)
    assert doc["measurement"]["device"] == "cpu" and doc["total"]["measured_rows"] >= 6
    assert "achieved" in capsys.readouterr().out
    assert (tmp_path / "roofline.png").stat().st_size > 10_000
    # Module level: every timed leaf module gets a measurement.
    assert _run("tiny", "--hardware", "cpu", "--tokens", "4", "--measure", "--level", "module",
                        "--warmup", "0", "--repeats", "1", "--no-plot", "--out", str(tmp_path)) == 0
    doc = json.loads((tmp_path / "roofline.json").read_text())
    wq = [r for r in doc["layers"] if r["module"] == "attention.wq"]
    assert len(wq) == 4 and all(r["measured_s"] > 0 for r in wq)


def test_measure_refuses_a_model_that_does_not_fit(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cmd, "get_hardware", lambda name, dtype=None, **kw: FAKE_CPU)
    monkeypatch.setattr(factory, "available_memory_bytes", lambda device: 8 * 2**30)
    rc = _run("llama-2-7b", "--hardware", "cpu", "--tokens", "4", "--measure", "--out", str(tmp_path))
    assert rc == 2
    err = capsys.readouterr().err
    assert "--layers" in err and "GiB" in err
    # The estimate itself: 7B fp32 weights alone are 6.74e9 * 4 bytes.
    need = factory.estimate_forward_memory(LlamaConfig.from_preset("llama-2-7b"), batch=1, seqlen=1, start_pos=0,
                                      n_runs=32, dtype_bytes=4)
    assert need > 6.7e9 * 4


def test_layers_option_truncates_the_model(tmp_path):
    assert _run("llama-2-7b", "--layers", "2", "--tokens", "4", "--no-plot", "--out", str(tmp_path)) == 0
    doc = json.loads((tmp_path / "roofline.json").read_text())
    assert doc["model"]["n_layers"] == 2 and sum(r["module"] == "block" for r in doc["layers"]) == 2
    assert _run("llama-2-7b", "--layers", "40", "--out", str(tmp_path)) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")
def test_measure_gpu_entry_without_cuda_is_refused(tmp_path, capsys):
    assert _run("tiny", "--hardware", "h100-sxm", "--tokens", "4", "--measure", "--out", str(tmp_path)) == 2
    assert "CUDA" in capsys.readouterr().err


def test_timings_file_is_plotted_beside_prediction(tmp_path):
    timings = {"phases": [
        {"n_tokens": 8, "n_cached": 0, "attn_kernel": "math",
         "layers": [{"position": 0, "module": "block", "measured_s": 0.5}, {"position": None, "module": "output",
                                                                             "measured_s": 0.25}]},
        {"n_tokens": 1, "n_cached": 8, "layers": [{"position": 0, "module": "block", "measured_s": 9.0}]},
    ]}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(timings))
    assert cmd.load_timings(path, seqlen=1, start_pos=8) == {(0, "block"): 9.0}
    with pytest.raises(BadInput, match="no timings for N=3"):
        cmd.load_timings(path, seqlen=3, start_pos=0)
    assert _run("tiny", "--tokens", "8", "--timings", str(path), "--out", str(tmp_path)) == 0
    doc = json.loads((tmp_path / "roofline.json").read_text())
    by_key = {(r["position"], r["module"]): r for r in doc["layers"]}
    assert by_key[(0, "block")]["measured_s"] == 0.5 and by_key[(None, "output")]["measured_s"] == 0.25
    assert by_key[(1, "block")]["measured_s"] is None


def test_bad_inputs_exit_2(tmp_path, capsys):
    assert _run("no-such-model", "--out", str(tmp_path)) == 2
    assert "unknown model" in capsys.readouterr().err
    assert _run("tiny", "--tokens", "0", "--out", str(tmp_path)) == 2
    assert _run("tiny", "--schedule", "0-9", "--out", str(tmp_path)) == 2


def test_reads_an_hf_config(tmp_path):
    from llama_ref.hf import hf_config_dict

    cfg = LlamaConfig.from_preset("tiny")
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(cfg)))
    assert _run(str(tmp_path), "--tokens", "4", "--no-plot", "--out", str(tmp_path / "o")) == 0
    doc = json.loads((tmp_path / "o" / "roofline.json").read_text())
    assert [doc["model"][k] for k in ("dim", "n_layers", "n_kv_heads", "vocab_size")] == [64, 4, 2, 256]
