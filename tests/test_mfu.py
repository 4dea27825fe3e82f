"""``llama-ref mfu``: MFU (and HFU) from the exact FLOPs per token, beside the published estimates."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
import torch

from counters import estimates as E
from counters.analytic import macs_polynomial
from counters.cli import EXIT_BAD_INPUT, EXIT_OK, main
from counters.commands import mfu as mfu_command
from counters.studies import hardware as hwmod
from counters.studies.hardware import Hardware
from llama_ref import PRESETS

L7 = PRESETS["llama-2-7b"]
A7, B7 = 6_607_077_376, 262_144  # Llama-2-7B forward MACs = a*N + b*N^2
BAR = ("llama-2-7b", "--train", "--tokens", "2048", "--tokens-per-second", "3000", "--hardware", "h100-sxm")


def _run(capsys, *argv):
    code = main(["mfu", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _json(capsys, *argv):
    code, out, err = _run(capsys, *argv, "--format", "json")
    assert code == EXIT_OK, err
    return json.loads(out)


# ---------------------------------------------------------------- the bar
def test_the_bar_exactly(capsys):
    doc = _json(capsys, *BAR)
    # 3000 x 6 x (6,607,077,376 + 262,144 x 2048) / 989e12 = 128,591,069,184,000 / 989,000,000,000,000
    expected = Fraction(3000 * 6 * (6_607_077_376 + 262_144 * 2048), 989 * 10 ** 12)
    assert Fraction(doc["mfu_exact"]) == expected
    assert doc["mfu"] == float(expected) and 0.13002 < doc["mfu"] < 0.13003
    assert doc["model_flops_per_token"] == 6 * (6_607_077_376 + 262_144 * 2048) == 42_863_689_728
    assert doc["peak_flops"] == 989 * 10 ** 12 and doc["hardware"]["name"] == "h100-sxm" and doc["dtype"] == "bf16"
    assert doc["model_flops_per_second"] == 3000 * 42_863_689_728
    # the parts: 6 x a (the weights in a product) + 6 x b x N (dense attention)
    parts = doc["model_flops_parts"]
    assert parts == {"factor": 6, "matmul_params": A7, "matmul_flops_per_token": 6 * A7,
                     "attention_macs_per_token_sq": B7, "attention_flops_per_token": 6 * B7 * 2048}
    assert "hfu" not in doc and "executed_flops_per_token" not in doc  # only with --recompute
    assert doc["warnings"] == []


def test_the_bar_table(capsys):
    code, out, err = _run(capsys, *BAR)
    assert code == EXIT_OK and err == ""
    assert "42,863,689,728" in out and "39,642,464,256" in out and "3,221,225,472" in out  # 6a and 6bN
    assert "0.130021" in out and "13.0021%" in out
    for name in E.ESTIMATES:
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    # torchtitan / PaLM: 42,865,287,168 FLOPs/token, MFU 0.130026, +0.0037%; Megatron 0.125136, -3.7575%
    assert "42,865,287,168" in out and "0.130026" in out and "+0.0037%" in out
    assert "0.125136" in out and "-3.7575%" in out
    assert len(out.splitlines()) <= 24  # one screen


# ---------------------------------------------------------------- modes, devices, recompute
def test_inference_is_a_third_of_training(capsys):
    train = _json(capsys, *BAR)
    infer = _json(capsys, "llama-2-7b", "--tokens", "2048", "-T", "3000", "--hardware", "h100-sxm")
    assert infer["mode"] == "inference" and train["mode"] == "train"
    # forward only: 2 x (a + b N) per token
    assert infer["model_flops_per_token"] == 2 * (A7 + B7 * 2048) == train["model_flops_per_token"] // 3
    assert Fraction(train["mfu_exact"]) == 3 * Fraction(infer["mfu_exact"])
    assert infer["model_flops_parts"]["factor"] == 2
    # inference estimates are the forward share: a third of each training formula, flash-attn its fwd mode
    for name, value in infer["estimates"].items():
        assert Fraction(value) == Fraction(E.FORWARD_ESTIMATES[name](L7, 2048)), name
        if name != "flash-attn":
            assert Fraction(value) * 3 == Fraction(train["estimates"][name]), name
    assert "Inference:" in _run(capsys, "llama-2-7b", "-T", "3000", "--hardware", "h100-sxm")[1]


def test_devices_divide(capsys):
    one = _json(capsys, *BAR)
    eight = _json(capsys, *BAR, "--devices", "8")
    # T is the total over K devices: MFU = T x F / (K x peak)
    assert Fraction(eight["mfu_exact"]) == Fraction(one["mfu_exact"]) / 8
    assert eight["devices"] == 8 and eight["peak_flops_total"] == 8 * 989 * 10 ** 12
    for name, d in eight["estimate_details"].items():
        assert Fraction(d["mfu_exact"]) == Fraction(one["estimate_details"][name]["mfu_exact"]) / 8


def test_recompute_gives_hfu(capsys):
    doc = _json(capsys, *BAR, "--recompute")
    # executed = model + one more forward of every decoder-layer run: 32 x (202,375,168 + 8,192 x 2048) MACs/token,
    # x2 FLOPs; = 2 x 58,254,788,919,296 / 2048, the FlopCounterMode figure under full recompute (test_estimates)
    extra = 2 * 32 * (202_375_168 + 8_192 * 2048)
    assert doc["executed_flops_per_token"] == 42_863_689_728 + extra == 2 * 58_254_788_919_296 // 2048
    assert doc["recompute_flops_per_token"] == extra
    assert Fraction(doc["hfu_exact"]) == Fraction(3000 * doc["executed_flops_per_token"], 989 * 10 ** 12)
    assert doc["hfu"] == float(Fraction(doc["hfu_exact"])) > doc["mfu"]
    # MFU does not change with recompute (MFU excludes it by definition)
    assert doc["mfu_exact"] == _json(capsys, *BAR)["mfu_exact"]
    code, out, _ = _run(capsys, *BAR, "--recompute")
    assert code == EXIT_OK and "HFU" in out and f"{doc['executed_flops_per_token']:,}" in out


def test_schedule_counts_its_layer_runs_and_estimates_stay_all_layers(capsys):
    doc = _json(capsys, *BAR, "--schedule", "mid-expansion-with-repeats", "--recompute")
    a, b = macs_polynomial(L7, "mid-expansion-with-repeats")
    assert (a, b) == (5_999_951_872, 237_568)  # 29 runs (docs/errata.md)
    assert doc["model_flops_per_token"] == 6 * (a + b * 2048) and doc["layer_runs"] == 29 and not doc["all_layers"]
    # recompute reruns the 29 layer runs: 29 x (202,375,168 + 8,192 x 2048) MACs per token, x2
    assert doc["recompute_flops_per_token"] == 2 * 29 * (202_375_168 + 8_192 * 2048)
    assert doc["estimates"]["torchtitan"] == E.torchtitan_flops_per_token(L7, 2048)  # all 32 layers
    assert "all 32 layers" in doc["estimates_assume"]


# ---------------------------------------------------------------- the estimates are counters.estimates'
@pytest.mark.parametrize("model, n", [("llama-2-7b", 4096), ("llama-3-8b", 8192), ("llama-3.2-1b", 2048),
                                      ("tiny", 100)])
@pytest.mark.parametrize("train", [True, False])
def test_estimates_and_errors_equal_counters_estimates(capsys, model, n, train):
    cfg = PRESETS[model]
    argv = [model, "--tokens", str(n), "-T", "1234.5", "--hardware", "a100-80g", "--devices", "3"]
    doc = _json(capsys, *argv, *(["--train"] if train else []))
    exact = E.exact_model_flops_per_token(cfg, n, train=train)
    assert doc["model_flops_per_token"] == exact
    table = E.ESTIMATES if train else E.FORWARD_ESTIMATES
    assert list(doc["estimates"]) == list(table) == list(doc["estimate_details"])
    t, peak = Fraction(12345, 10), Fraction(312 * 10 ** 12)
    for name, fn in table.items():
        value = fn(cfg, n)
        got = doc["estimate_details"][name]
        assert doc["estimates"][name] == got["flops_per_token"]
        # an int stays an int; a fraction is "p/q"
        assert got["flops_per_token"] == (value if isinstance(value, int) else str(value)), name
        assert Fraction(got["relative_error_exact"]) == E.relative_error(value, exact), name
        assert got["relative_error"] == float(E.relative_error(value, exact))
        assert Fraction(got["mfu_exact"]) == t * Fraction(value) / (3 * peak) == E.mfu(value, t, peak, 3), name
    assert Fraction(doc["mfu_exact"]) == t * exact / (3 * peak)


def test_json_schema(capsys):
    doc = _json(capsys, *BAR, "--recompute")
    for key, typ in [("model", str), ("config", dict), ("mode", str), ("recompute", bool), ("tokens", int),
                     ("schedule", str), ("layer_runs", int), ("all_layers", bool), ("tokens_per_second", float),
                     ("devices", int), ("hardware", dict), ("dtype", str), ("peak_flops", int),
                     ("model_flops_per_token", int), ("model_flops_parts", dict), ("mfu", float), ("mfu_exact", str),
                     ("hfu", float), ("hfu_exact", str), ("executed_flops_per_token", int), ("estimates", dict),
                     ("estimate_details", dict), ("estimates_assume", str), ("warnings", list),
                     ("conventions", str), ("model_source", dict)]:
        assert isinstance(doc[key], typ), key
    for d in doc["estimate_details"].values():
        assert set(d) == {"flops_per_token", "relative_error", "relative_error_exact", "mfu", "mfu_exact"}
    assert doc["model_source"] == {"spec": "llama-2-7b", "kind": "preset"}


def test_throughput_is_read_as_the_exact_decimal(capsys):
    doc = _json(capsys, *BAR[:-4], "-T", "2500.5", "--hardware", "h100-sxm")
    # 2500.5 = 5001/2 exactly (the float 2500.5 happens to be exact too; 0.1 would not be)
    assert doc["tokens_per_second_exact"] == "5001/2"
    assert Fraction(doc["mfu_exact"]) == Fraction(5001, 2) * 42_863_689_728 / (989 * 10 ** 12)
    doc = _json(capsys, *BAR[:-4], "-T", "0.1", "--hardware", "h100-sxm")
    assert Fraction(doc["mfu_exact"]) == Fraction(1, 10) * 42_863_689_728 / (989 * 10 ** 12)
    assert Fraction(doc["mfu_exact"]) != Fraction(0.1) * 42_863_689_728 / (989 * 10 ** 12)
    doc = _json(capsys, *BAR[:-4], "-T", "2.5e3", "--hardware", "h100-sxm")
    assert doc["tokens_per_second_exact"] == 2500


@pytest.mark.parametrize("dtype, peak", [("bf16", 989 * 10 ** 12), ("fp16", 989 * 10 ** 12),
                                         ("tf32", 494_700 * 10 ** 9), ("fp32", 67 * 10 ** 12)])
def test_the_peak_of_the_compute_dtype(capsys, dtype, peak):
    doc = _json(capsys, *BAR[:-4], "-T", "300", "--hardware", "h100-sxm", "--dtype", dtype)
    assert doc["peak_flops"] == peak and doc["dtype"] == dtype
    # an exact integer peak: no float residue in the ratio
    assert Fraction(doc["mfu_exact"]) == Fraction(300 * 42_863_689_728, peak)


def test_cpu_is_measured(capsys, monkeypatch):
    fake = Hardware(name="cpu", peak_flops=150e9, mem_bw=40e9, dtype="fp32", source="measured (test)", measured=True)
    seen = []
    monkeypatch.setattr(hwmod, "measure_device", lambda device, dtype, **kw: seen.append(dtype) or fake)
    doc = _json(capsys, "tiny", "--train", "-T", "500", "--hardware", "cpu")
    assert seen == ["fp32"] and doc["dtype"] == "fp32" and doc["hardware"]["measured"]
    # tiny at its default N = max_seq_len 128 (shorter than 2048): 6 x (200,704 + 512 x 128) FLOPs per token
    assert doc["tokens"] == 128 and doc["model_flops_per_token"] == 6 * (200_704 + 512 * 128) == 1_597_440
    assert Fraction(doc["mfu_exact"]) == Fraction(500 * 1_597_440, 150 * 10 ** 9)
    # above a *measured* peak is a warning, not a refusal (the measurement may have been low)
    code, out, err = _run(capsys, "tiny", "--train", "-T", "1e9", "--hardware", "cpu", "--format", "json")
    doc = json.loads(out)
    assert code == EXIT_OK and doc["mfu"] > 1 and len(doc["warnings"]) == 1 and "measured peak" in doc["warnings"][0]
    assert err.startswith("llama-ref mfu: warning: MFU") and len(err.strip().splitlines()) == 1


def test_cpu_has_no_tf32_peak(capsys, monkeypatch):
    # a CPU's fp32 matmuls are IEEE fp32: a "tf32 peak" measured there would be the fp32 peak, mislabelled
    monkeypatch.setattr(hwmod, "measure_matmul_peak", lambda *a, **k: pytest.fail("measured a tf32 peak on a CPU"))
    code, out, err = _run(capsys, "tiny", "-T", "100", "--hardware", "cpu", "--dtype", "tf32")
    assert code == EXIT_BAD_INPUT and out == "" and len(err.strip().splitlines()) == 1
    assert "dtype tf32 on cpu" in err and "use fp32" in err


def test_tf32_is_measured_with_tf32_enabled(monkeypatch):
    # on CUDA a "tf32" measurement runs fp32 matmuls with TF32 allowed (else it times plain fp32), then restores
    # the flag; the device itself is not needed to check that (both measurements are replaced)
    seen = []
    monkeypatch.setattr(hwmod, "measure_matmul_peak",
                        lambda device, dtype, **k: seen.append((dtype, torch.backends.cuda.matmul.allow_tf32)) or 1e12)
    monkeypatch.setattr(hwmod, "measure_copy_bandwidth", lambda device, **k: 1e11)
    monkeypatch.setattr(hwmod, "device_name", lambda device: "test device")
    before = torch.backends.cuda.matmul.allow_tf32
    hw = hwmod.measure_device("cuda", "tf32", cache=False)
    assert seen == [(torch.float32, True)] and hw.dtype == "tf32"
    assert torch.backends.cuda.matmul.allow_tf32 == before
    hwmod.measure_device("cuda", "fp32", cache=False)
    assert seen[-1] == (torch.float32, before)


def test_the_real_cpu_measurement_runs(capsys):
    doc = _json(capsys, "tiny", "-T", "100", "--hardware", "cpu")
    assert doc["hardware"]["measured"] and doc["peak_flops"] > 1e6 and 0 < doc["mfu"]


def test_above_the_dense_peak_but_possible_with_causal_kernels_warns(capsys):
    # Llama-3.1-8B at N = 131,072 is 82% attention: a causal kernel at 70% of the peak reports a dense MFU > 1
    cfg = PRESETS["llama-3.1-8b"]
    n = 131_072
    dense = E.exact_model_flops_per_token(cfg, n)
    t = 1.2 * 989e12 / dense  # dense MFU 1.2
    code, out, err = _run(capsys, "llama-3.1-8b", "--train", "-N", str(n), "-T", f"{t:.6f}", "--hardware", "h100-sxm")
    assert code == EXIT_OK and "WARNING: MFU 1.2000 is above 1" in out and "causal" in out


# ---------------------------------------------------------------- models from files and the Hub
def test_config_file_and_directory_work_like_the_preset(capsys, tmp_path):
    from llama_ref.hf import hf_config_dict

    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(L7)))
    preset = _json(capsys, *BAR, "--recompute")
    for spec in (str(tmp_path / "config.json"), str(tmp_path)):
        doc = _json(capsys, spec, *BAR[1:], "--recompute")
        assert doc["model_source"]["kind"] == "hf"
        for key in ("model_flops_per_token", "mfu_exact", "hfu_exact", "estimates", "estimate_details",
                    "model_flops_parts"):
            assert doc[key] == preset[key], key


def test_hub_id_works_like_the_preset(capsys, tmp_path, monkeypatch):
    from _hub_cache import cache_file

    from llama_ref.hf import hf_config_dict

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = json.dumps(hf_config_dict(PRESETS["llama-3.2-1b"])).encode()
    cache_file(tmp_path, "meta-llama/Llama-3.2-1B", "c0ffee" + "0" * 34, "config.json", data, refs=("main",))
    doc = _json(capsys, "meta-llama/Llama-3.2-1B", "--train", "-T", "40000", "--hardware", "h100-sxm")
    preset = _json(capsys, "llama-3.2-1b", "--train", "-T", "40000", "--hardware", "h100-sxm")
    assert doc["model_source"]["kind"] == "hub" and doc["model"] == "meta-llama/Llama-3.2-1B"
    for key in ("model_flops_per_token", "mfu_exact", "estimates", "model_flops_parts"):
        assert doc[key] == preset[key], key
    # tied head: a product on the embedding's matrix, in the exact count: a = 16 layers + 2048 x 128,256
    assert doc["model_flops_parts"]["matmul_params"] == 16 * 60_817_408 + 2048 * 128_256 == 1_235_746_816


# ---------------------------------------------------------------- bad input: exit 2, one line naming the value
@pytest.mark.parametrize("argv, needle", [
    (["-T", "0"], "--tokens-per-second must be a positive finite number, got '0'"),
    (["-T", "-3000"], "--tokens-per-second must be a positive finite number"),
    (["-T", "nan"], "got 'nan'"),
    (["-T", "inf"], "got 'inf'"),
    (["-T", "3e"], "got '3e'"),
    (["-T", "fast"], "got 'fast'"),
    (["-T", "1e999999999"], "got '1e999999999'"),  # never built as a billion-digit integer
    (["-T", "1e999"], "--tokens-per-second must be <= 1e18, got '1e999'"),
    # positive and finite, read exactly: refused for its size, as 1e999 is, not as "not positive finite"
    (["-T", "1e-400"], "--tokens-per-second must be >= 1e-9 (one token in about 32 years), got '1e-400'"),
    (["-T", "1e-10"], "--tokens-per-second must be >= 1e-9"),
    (["-T", "0.0e5"], "--tokens-per-second must be a positive finite number, got '0.0e5'"),
    (["-T", "1e99999999999999999999"], "--tokens-per-second must be <= 1e18"),
    (["-T", "3000", "--devices", "0"], "--devices must be >= 1, got 0"),
    (["-T", "3000", "--tokens", "0"], "--tokens must be >= 1, got 0"),
    (["-T", "3000", "--tokens", "4097"], "--tokens 4097 exceeds the model's max_seq_len 4096"),
    (["-T", "3000", "--recompute"], "--recompute is activation checkpointing"),
    (["-T", "3000", "--schedule", "0-99"], "out of range"),
    (["-T", "3000", "--schedule", "bogus"], "unknown layer schedule"),
    (["-T", "3000", "--vocab-size", "5"], "--vocab-size 5 contradicts preset llama-2-7b"),
    # 100,000 tokens/s of 7B training is 4.3 x an H100's peak even with causal attention: impossible
    (["-T", "1e5", "--train"], "is more than 1 x h100-sxm can do"),
])
def test_bad_input(capsys, argv, needle):
    code, out, err = _run(capsys, "llama-2-7b", "--hardware", "h100-sxm", *argv)
    assert code == EXIT_BAD_INPUT, err
    assert needle in err and len(err.strip().splitlines()) == 1 and out == ""


@pytest.mark.parametrize("argv, needle", [
    (["llama-2-7b", "-T", "1"], "--hardware"),  # required
    (["llama-2-7b", "--hardware", "h100-sxm"], "--tokens-per-second"),  # required
    (["llama-2-7b", "-T", "1", "--hardware", "tpu-v9"], "invalid choice: 'tpu-v9'"),
    (["llama-2-7b", "-T", "1", "--hardware", "h100-sxm", "--dtype", "int8"], "invalid choice: 'int8'"),
    (["llama-2-7b", "-T", "1", "--hardware", "h100-sxm", "--devices", "two"], "invalid int value: 'two'"),
    (["no-such-model", "-T", "1", "--hardware", "h100-sxm"], "unknown model 'no-such-model'"),
])
def test_bad_arguments(capsys, argv, needle):
    code, out, err = _run(capsys, *argv)
    assert code == EXIT_BAD_INPUT and needle in err and out == ""


def test_nothing_is_measured_before_the_input_is_checked(capsys, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("measured before the input was checked")

    monkeypatch.setattr(hwmod, "measure_device", refuse)
    code, _, err = _run(capsys, "tiny", "--hardware", "cpu", "-T", "5", "--tokens", "129")
    assert code == EXIT_BAD_INPUT and "max_seq_len 128" in err


def test_parse_tokens_per_second():
    assert mfu_command.parse_tokens_per_second("3000") == 3000
    assert mfu_command.parse_tokens_per_second(" 1.25e2 ") == Fraction(125)
    assert mfu_command.parse_tokens_per_second(".5") == Fraction(1, 2)
    assert mfu_command.parse_tokens_per_second("1e18") == 10 ** 18
    assert mfu_command.parse_tokens_per_second("1e-9") == Fraction(1, 10 ** 9)
    assert mfu_command.parse_tokens_per_second("0.001e-6") == Fraction(1, 10 ** 9)
