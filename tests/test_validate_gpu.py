"""scripts/validate_gpu.py (counters.studies.validate): a clean refusal without CUDA, and every code path on CPU with a tiny model.

The script's steps take a ``device`` and a timer, so the CPU runs below exercise exactly the code
an H100 runs (counters vs analytic, per-layer timing, logits vs transformers, JSON, PNGs); only
the CUDA-event timer and the bf16 tolerances need the GPU test at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_ref import LlamaConfig
from llama_ref.hf import permute_qk

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "validate_gpu.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def vg():
    from counters.studies import validate

    return validate


def _tiny_phases(vg):
    return [vg.Phase("prefill", 12, 0), vg.Phase("decode", 1, 12)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")
def test_exits_cleanly_without_cuda():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, cwd=str(ROOT))
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "torch.cuda.is_available() is False" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_end_to_end_on_cpu(vg, tmp_path, capsys):
    rc = vg.main(["--device", "cpu", "--model", "tiny", "--dtype", "fp32", "--prefill-tokens", "12",
                  "--decode-cached", "12", "--train-tokens", "10", "--warmup", "0", "--repeats", "1",
                  "--hardware", "h100-sxm", "--no-measure-peaks", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASSED" in out
    doc = json.loads((tmp_path / "validate_gpu.json").read_text())
    assert doc["ok"] is True and doc["failures"] == []
    assert doc["device"] == "cpu" and doc["dtype"] == "fp32" and doc["model"] == "tiny"
    # 1. counters: every one agrees exactly with the analytic counts, in both phases.
    for phase in ("prefill", "decode"):
        res = doc["counters"][phase]
        for name in ("hooks", "fvcore", "torch"):
            assert res[name]["agree"] is True, res[name]
            assert res[name]["macs"] == res["analytic"]["macs"]
    # 2. timing: one entry per (phase, kernel), every layer run measured.
    assert [(p["phase"], p["attn_kernel"]) for p in doc["phases"]] == [
        ("prefill", "math"), ("prefill", "sdpa"), ("decode", "math"), ("decode", "sdpa")]
    for p in doc["phases"]:
        blocks = [r for r in p["layers"] if r["module"] == "block"]
        assert len(blocks) == 4 and all(r["measured_s"] > 0 for r in blocks)
        assert "pct_peak_flops[h100-sxm]" in blocks[0] and "pct_peak_bw[h100-sxm]" in p["overall"]
        assert p["overall"]["forward_s"] > 0
    # 1b. memory: the CPU allocator's peak within the algebra's bound, per phase and for a training step.
    mem = doc["memory"]
    for r in [*mem["phases"].values(), mem["training"]]:
        assert r["ok"] and 0 <= r["excess_bytes"] <= r["bound_bytes"][1] and r["analytic_bytes"] > 0, r
    # 3. logits vs transformers (fp32: tight).
    for phase in ("prefill", "decode"):
        m = doc["hf_comparison"][phase]
        assert m["ok"] and m["max_rel"] < 1e-4 and m["argmax_agree"] == 1.0
    assert doc["hf_comparison"]["prefill"]["positions"] == 12 and doc["hf_comparison"]["decode"]["positions"] == 1
    # 4. a training step: counts exact per phase, forward/backward timed per layer run, MFU from the step.
    tr = doc["training"]
    assert tr["n_tokens"] == 10 and tr["attn_kernel"] == "sdpa" and not tr["recompute"]
    analytic = tr["counters"]["analytic"]
    assert analytic["macs"] == 3 * analytic["forward_macs"]  # no recompute: backward = 2 x forward
    for name in ("hooks", "torch"):
        assert tr["counters"][name]["agree"] and tr["counters"][name]["macs"] == analytic["macs"]
    assert tr["counters"]["fvcore"]["agree"] and tr["counters"]["fvcore"]["forward_macs"] == analytic["forward_macs"]
    assert [(r["position"], r["module"]) for r in tr["layers"]] == [(0, "block"), (1, "block"), (2, "block"),
                                                                    (3, "block"), (None, "output")]
    assert all(r["forward_s"] > 0 and r["backward_s"] > 0 for r in tr["layers"])
    from counters.estimates import exact_model_flops_per_token

    ov = tr["overall"]
    assert ov["model_flops_per_token"] == exact_model_flops_per_token(LlamaConfig.from_preset("tiny"), 10)
    assert doc["peaks"][0]["peak_flops"] == 67e12  # the fp32 entry: the run computes in fp32
    assert ov["mfu"]["h100-sxm"] == pytest.approx(ov["tokens_per_s"] * ov["model_flops_per_token"] / 67e12)
    assert "hfu" not in ov
    # 5. plots.
    for key in ("roofline_prefill", "roofline_decode", "layers"):
        assert Path(doc["plots"][key]).read_bytes()[:8] == PNG_MAGIC


def test_logit_mismatch_is_a_failure_not_a_crash(vg, tmp_path, monkeypatch):
    real = vg.build_hf_twin

    def broken_twin(model, **kw):
        hf = real(model, **kw)
        # Swap the two norms of layer 0 (the kind of mapping bug the check exists for). New Parameters, not
        # in-place copies: the twin shares storage with our model.
        layer = hf.model.layers[0]
        a, b = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        layer.input_layernorm.weight = torch.nn.Parameter(b.detach().clone(), requires_grad=False)
        layer.post_attention_layernorm.weight = torch.nn.Parameter(a.detach().clone(), requires_grad=False)
        return hf

    monkeypatch.setattr(vg, "build_hf_twin", broken_twin)
    result = vg.run_validation(LlamaConfig.from_preset("tiny"), device="cpu", dtype_name="fp32",
                               phases=[vg.Phase("prefill", 8, 0)], counters=[], kernels=["sdpa"], warmup=0,
                               repeats=1, hardware="h100-sxm", measure_peaks=False, out_dir=tmp_path, log=lambda s: None)
    assert result["ok"] is False
    assert any("logits differ from transformers" in f for f in result["failures"])
    assert json.loads((tmp_path / "validate_gpu.json").read_text())["ok"] is False


def test_main_reports_failure_with_exit_1(vg, monkeypatch, capsys):
    # run_validation's own failure reporting is covered above; here: main turns it into exit status 1.
    seen = {}

    def fake_run(config, **kw):
        seen.update(kw, config=config)
        return {"ok": False, "failures": ["decode: counter torch disagrees with analytic: ..."], "steps": {}}

    monkeypatch.setattr(vg, "run_validation", fake_run)
    rc = vg.main(["--device", "cpu", "--model", "tiny", "--prefill-tokens", "16", "--decode-cached", "8",
                  "--counters", "hooks", "--kernels", "sdpa"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "counter torch disagrees" in err
    assert [(p.name, p.seqlen, p.start_pos) for p in seen["phases"]] == [("prefill", 16, 0), ("decode", 1, 8)]
    assert seen["counters"] == ["hooks"] and seen["kernels"] == ["sdpa"] and seen["dtype_name"] == "bf16"
    assert seen["config"].name == "tiny"


def test_bad_arguments_exit_2(vg, capsys):
    assert vg.main(["--device", "cpu", "--counters", "hooks,abacus"]) == 2
    assert vg.main(["--device", "cpu", "--model", "tiny", "--prefill-tokens", "4096"]) == 2
    err = capsys.readouterr().err
    assert "abacus" in err and "max_seq_len" in err
    assert vg.main(["--device", "cpu", "--model", "tiny", "--prefill-tokens", "8", "--decode-cached", "8",
                    "--train-tokens", "4096"]) == 2
    assert "--train-tokens 4096 exceeds max_seq_len" in capsys.readouterr().err
    for flag in ("--train-tokens", "--batch", "--repeats", "--prefill-tokens"):
        assert vg.main(["--device", "cpu", "--model", "tiny", flag, "0"]) == 2
        assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err


def test_hf_twin_has_our_weights_in_hf_layout(vg, make_model):
    cfg = LlamaConfig.from_preset("tiny")
    ours = make_model(cfg)
    hf = vg.build_hf_twin(ours)
    # Shared storage where the layouts agree, permuted copies for q and k.
    assert hf.model.layers[1].mlp.up_proj.weight.data_ptr() == ours.layers[1].feed_forward.w3.weight.data_ptr()
    assert torch.equal(hf.model.layers[1].self_attn.q_proj.weight, permute_qk(ours.layers[1].attention.wq.weight, 4))
    assert torch.equal(hf.model.layers[1].self_attn.k_proj.weight, permute_qk(ours.layers[1].attention.wk.weight, 2))
    assert hf.config._attn_implementation == "sdpa"
    assert hf.model.rotary_emb.inv_freq.device.type == "cpu"
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(input_ids=tokens).logits, rtol=1e-4, atol=1e-4)


def test_counter_check_and_compare_with_hf_directly(vg, make_model):
    cfg = LlamaConfig.from_preset("tiny")
    model = make_model(cfg, schedule="0,1,1,3")  # a repeated layer: one cache and one row set per run
    res = vg.check_counters(model, vg.Phase("decode", 2, 5), batch=2, names=["hooks", "torch"])
    assert res["hooks"]["agree"] and res["torch"]["agree"]
    assert res["hooks"]["macs"] == res["analytic"]["macs"]
    hf = vg.build_hf_twin(model)
    with pytest.raises(ValueError, match="schedule"):  # transformers runs every layer once
        vg.compare_with_hf(model, hf, vg.Phase("decode", 1, 6), batch=2)
    model.set_schedule(None)
    metrics = vg.compare_with_hf(model, hf, vg.Phase("decode", 1, 6), batch=2)
    assert metrics["ok"] and metrics["positions"] == 2


class Ticks:
    """A timer whose every mark is 1 ms after the last: times count marks, deterministically."""

    def __init__(self):
        self.t = 0.0

    def mark(self):
        self.t += 0.001
        return self.t

    def synchronize(self):
        pass

    @staticmethod
    def seconds(a, b):
        return b - a


def test_timer_abstraction_and_layer_report(vg, make_model):
    cfg = LlamaConfig.from_preset("tiny")
    model = make_model(cfg)
    timing = vg.time_phase(model, vg.Phase("decode", 1, 3), batch=1, attn_kernel="sdpa", warmup=0, repeats=2, timer=Ticks())
    assert model.caches is None  # cache released after timing
    assert timing.median[(0, "block")] == pytest.approx(0.001)
    from counters.studies.hardware import table_hardware

    rep = vg.layer_report(model, vg.Phase("decode", 1, 3), timing, batch=1, peaks=[table_hardware("h100-sxm")])
    blk = next(r for r in rep["layers"] if r["module"] == "block")
    assert blk["measured_s"] == pytest.approx(0.001)
    assert blk["achieved_flops_per_s"] == pytest.approx(blk["flops"] / 0.001)
    assert blk["pct_peak_flops[h100-sxm]"] == pytest.approx(100 * blk["flops"] / 0.001 / 989e12)
    assert rep["overall"]["forward_s"] == timing.total_s


@pytest.mark.parametrize("recompute", [False, True])
def test_training_step_timing_and_report(vg, make_model, recompute):
    from counters.analytic import analyze_training
    from counters.studies.hardware import table_hardware
    from counters.studies.validate_training import TrainStep, step_report, time_step

    cfg = LlamaConfig.from_preset("tiny")
    model = make_model(cfg)
    model.set_schedule("0,1,1,3")  # a repeated layer: its two runs are timed apart
    model.requires_grad_(False)  # as loaded weights are: the check makes them trainable for the step only
    step = TrainStep(6, recompute=recompute)
    tokens = vg.make_tokens(cfg, 2, 6, seed=0, device="cpu")
    timing = time_step(model, step, tokens, attn_kernel="math", warmup=1, repeats=2, timer=Ticks())
    assert not any(p.requires_grad for p in model.parameters()) and model.activation_checkpointing is False
    assert all(p.grad is None for p in model.parameters())
    # Forward marks: start, (block start, end) x 4, output start, end, then the loss; each span is marks apart.
    assert set(timing.forward) == {(0, "block"), (1, "block"), (2, "block"), (3, "block"), (None, "output")}
    assert all(v == pytest.approx(0.001) for v in timing.forward.values())
    assert set(timing.backward) == set(timing.forward)
    assert all(v == pytest.approx(0.001) for v in timing.backward.values())
    rep = step_report(model, step, timing, batch=2, peaks=[table_hardware("h100-sxm")])
    train = analyze_training(cfg, batch=2, seqlen=6, schedule="0,1,1,3", training=step.training)
    by_pos = {r["position"]: r for r in rep["layers"]}
    block1 = [r for r in train.rows if r.position == 1]
    assert by_pos[1]["layer"] == 1 and by_pos[2]["layer"] == 1
    assert by_pos[1]["forward_flops"] == sum(r.forward.total_flops for r in block1)
    assert by_pos[1]["backward_flops"] == sum(r.backward.total_flops + r.recompute.total_flops for r in block1)
    # With checkpointing the layer's backward also runs its forward again (executed work, timed there too).
    assert sum(r.recompute.macs for r in block1) == (sum(r.forward.macs for r in block1) if recompute else 0)
    ov = rep["overall"]
    assert ov["tokens"] == 12 and ov["step_s"] == pytest.approx(timing.totals["step"])
    assert ("hfu" in ov) == recompute
    if recompute:
        assert ov["hfu"]["h100-sxm"] > ov["mfu"]["h100-sxm"]


def test_training_counter_check_catches_a_wrong_backward(vg, make_model, monkeypatch):
    """A counter that misses backward work fails the training check (it is compared per phase)."""
    from counters.studies.validate_training import TrainStep, check_training_counters

    cfg = LlamaConfig.from_preset("tiny")
    model = make_model(cfg)
    tokens = vg.make_tokens(cfg, 1, 5, seed=0, device="cpu")
    good = check_training_counters(model, TrainStep(5), tokens, names=["hooks", "torch"])
    assert good["hooks"]["agree"] and good["torch"]["agree"], good
    # Sabotage: the model's SiLU backward does extra work only torch's dispatch sees.
    real = torch.nn.functional.silu

    class Silu(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return real(x)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            wasted = x @ x.transpose(-1, -2)  # (bsz, seqlen, seqlen): a matmul no backward needs
            return torch.ops.aten.silu_backward(g, x) + 0 * wasted.sum()

    monkeypatch.setattr(torch.nn.functional, "silu", Silu.apply)
    bad = check_training_counters(model, TrainStep(5), tokens, names=["torch"])
    assert not bad["torch"]["agree"] and bad["torch"]["problems"]


def test_memory_check_on_cuda_reads_max_memory_allocated(monkeypatch):
    """The CUDA branch of the memory check: reset the peak, read memory_allocated before, max_memory_allocated
    after (simulated: the counters of a fake CUDA device), and compare with the algebra within the CUDA bound."""
    from counters.studies import validate_memory as vm

    calls = []
    state = {"allocated": 1000, "peak": 1000}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: (calls.append("reset"), state.update(peak=state["allocated"])))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    assert vm.device_peak(lambda: state.update(peak=5096), torch.device("cuda")) == 4096
    assert calls == ["sync", "reset", "sync"]
    ok = vm._verdict("x", 4096, 4096 + vm.CUDA_SLACK_BYTES, torch.device("cuda"))
    bad = vm._verdict("x", 4096, 4095, torch.device("cuda"))
    assert ok["ok"] and not bad["ok"] and ok["source"] == "torch.cuda.max_memory_allocated"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_memory_check_on_a_real_gpu(vg, make_model):
    from counters.studies.validate_memory import memory_validation

    model = make_model(LlamaConfig.from_preset("tiny")).to("cuda")
    result = memory_validation(model, [vg.Phase("prefill", 12, 0), vg.Phase("decode", 1, 12)], batch=2,
                               train=vg.TrainStep(10), log=lambda s: None)
    assert all(r["ok"] for r in [*result["phases"].values(), result["training"]]), result


def test_device_peaks(vg):
    peaks = vg.device_peaks("cpu", "fp32", "a100-80g", measure=True, measure_kwargs={"n": 64, "repeats": 1,
                                                                                     "nbytes": 2**20})
    assert [p.name for p in peaks] == ["a100-80g", "cpu"] and peaks[1].measured
    # No table entry for a CPU: measured even when not asked, there is nothing else to report against.
    assert [p.name for p in vg.device_peaks("cpu", "fp32", "auto", measure=False,
                                            measure_kwargs={"n": 64, "repeats": 1, "nbytes": 2**20})] == ["cpu"]


def test_logits_metrics_and_tolerances(vg):
    ref = torch.randn(3, 5, 50)
    m = vg.logits_metrics(ref + 1e-7, ref)
    assert m["argmax_agree"] == 1.0 and m["min_cosine"] > 0.999999 and m["positions"] == 15
    assert vg.logits_ok(m, torch.float32)[0]
    assert m["top1_in_ref_top5"] == 1.0
    bad = vg.logits_metrics(ref.flip(-1), ref)
    ok, problems = vg.logits_ok(bad, torch.bfloat16)
    assert not ok and len(problems) == 3  # max_rel, cosine, top-1-in-top-5 (bf16 does not gate exact argmax)
    # A near-tie flipped by rounding: argmax differs, but our top-1 is the reference's second -> fine in bf16.
    tie = torch.tensor([[[1.0, 0.999, 0.0, -1.0, -2.0, -3.0]]])
    m = vg.logits_metrics(torch.tensor([[[0.999, 1.0, 0.0, -1.0, -2.0, -3.0]]]), tie)
    assert m["argmax_agree"] == 0.0 and m["top1_in_ref_top5"] == 1.0
    assert vg.logits_ok(m, torch.bfloat16)[0] and not vg.logits_ok(m, torch.float32)[0]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_bf16_on_cuda(vg, tmp_path):
    result = vg.run_validation(LlamaConfig.from_preset("tiny"), device="cuda", dtype_name="bf16",
                               phases=_tiny_phases(vg), warmup=1, repeats=3, out_dir=tmp_path, log=lambda s: None,
                               peak_kwargs={"n": 1024, "nbytes": 2**26, "repeats": 2})
    assert result["ok"], result["failures"]
    assert all(p["overall"]["forward_s"] > 0 for p in result["phases"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_event_timer(vg):
    from counters.studies.timing import CudaEventTimer, make_timer

    t = make_timer("cuda")
    assert isinstance(t, CudaEventTimer)
    a = t.mark()
    torch.randn(1024, 1024, device="cuda") @ torch.randn(1024, 1024, device="cuda")
    b = t.mark()
    t.synchronize()
    assert t.seconds(a, b) > 0
