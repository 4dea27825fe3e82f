"""The ``llama-ref`` command, called in-process: output formats, JSON schema, exit codes, bad input."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch
from torch import nn

from counters import cli
from counters.analytic import param_count
from counters.cli import EXIT_BAD_INPUT, EXIT_DISAGREE, EXIT_OK, EXIT_UNCOUNTED, main
from counters.commands import count as count_command
from counters.result import COUNTER_NAMES
from llama_ref import PRESETS, SCHEDULE_NAMES

pytestmark = pytest.mark.usefixtures("single_thread")

ALL = list(COUNTER_NAMES)


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _json(capsys, *argv):
    code, out, err = _run(capsys, *argv, "--format", "json")
    return code, json.loads(out), err


# ---------------------------------------------------------------- the headline command
def test_count_llama2_7b_2048_json(capsys):
    code, doc, err = _json(capsys, "count", "llama-2-7b", "--tokens", "2048")
    assert code == EXIT_OK, err
    assert doc["agree"] is True
    assert doc["device"] == "meta"  # 27 GB of fp32 random weights: counted on meta
    # meta in bf16 (as Llama-2 ships): the weight dtype, and why (the meta device runs no kernels)
    assert doc["compute_dtype"] == "bfloat16" and "meta device" in doc["compute_dtype_reason"]
    assert doc["params"] == 6_738_415_616
    assert doc["counters"] == ALL and set(doc["totals"]) == set(ALL)
    a, b = 6_607_077_376, 262_144
    for name, t in doc["totals"].items():
        assert t["macs"] == a * 2048 + b * 2048 ** 2 == 14_630_806_093_824, name
        assert t["flops"] == 2 * t["macs"]
        assert isinstance(t["nonmatmul_flops"], int)
    # the linear part per token, read off the rows: everything but the attention products
    linear = sum(r["macs"]["analytic"] for r in doc["layers"] if r["module"] != "attention.core")
    assert linear == a * 2048


def test_json_schema(capsys):
    code, doc, _ = _json(capsys, "count", "tiny", "--tokens", "5", "--cached", "3", "--batch", "2",
                         "--schedule", "0,1x2,3")
    assert code == EXIT_OK
    for key, typ in [("schema", str), ("params", int), ("totals", dict), ("layers", list), ("layer_runs", list),
                     ("agree", bool), ("config", dict), ("schedule", str), ("tokens", int), ("cached", int),
                     ("batch", int), ("device", str), ("dtype", str), ("kernel", str), ("conventions", str),
                     ("counters", list), ("mismatches", list), ("unknown_ops", dict), ("analytic", dict)]:
        assert isinstance(doc[key], typ), key
    assert (doc["tokens"], doc["cached"], doc["batch"], doc["schedule"]) == (5, 3, 2, "0,1x2,3")
    assert doc["schedule_layers"] == [0, 1, 1, 3]
    assert doc["params"] == param_count(PRESETS["tiny"])
    assert "MAC" in doc["conventions"] and "FLOPs = 2 x MACs" in doc["conventions"]
    assert len(doc["layers"]) == 4 + 15 * 4
    for row in doc["layers"]:
        assert set(row) >= {"position", "layer", "module", "macs", "nonmatmul_flops", "agree"}
        assert set(row["macs"]) == set(doc["counters"])
        assert all(isinstance(v, int) for v in row["macs"].values())
    for name in doc["counters"]:
        assert sum(r["macs"][name] for r in doc["layers"]) == doc["totals"][name]["macs"]
        assert sum(r["nonmatmul_flops"][name] for r in doc["layers"]) == doc["totals"][name]["nonmatmul_flops"]
    runs = [r for r in doc["layer_runs"] if r["module"] == "block"]
    assert [r["layer"] for r in runs] == [0, 1, 1, 3]
    assert doc["analytic"]["macs"] == doc["totals"]["analytic"]["macs"]
    assert doc["analytic"]["flops_exact"] < doc["analytic"]["flops"]
    assert doc["analytic"]["macs_causal"] < doc["analytic"]["macs"]


def test_table_is_one_line_per_layer_run(capsys):
    code, out, _ = _run(capsys, "count", "llama-2-7b", "--tokens", "16", "--counters", "analytic,hooks",
                        "--schedule", "skip-15")
    assert code == EXIT_OK
    assert sum(1 for line in out.splitlines() if " block " in line) == 31
    assert "AGREE" in out and "MACs" in out and "non-matmul FLOPs" in out and "Counted:" in out
    assert "6,738,415,616" in out  # params
    _, detail, _ = _run(capsys, "count", "llama-2-7b", "--tokens", "16", "--counters", "analytic,hooks",
                        "--schedule", "skip-15", "--detail")
    assert sum(1 for line in detail.splitlines() if "attention.wq" in line) == 31


def test_csv(capsys):
    code, out, _ = _run(capsys, "count", "tiny", "--tokens", "4", "--counters", "analytic,hooks", "--format", "csv")
    assert code == EXIT_OK
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["position", "layer", "module", "macs_analytic", "macs_hooks",
                             "nonmatmul_flops_analytic", "nonmatmul_flops_hooks", "agree"]
    assert len(rows) == 4 + 15 * 4
    assert all(r["macs_analytic"] == r["macs_hooks"] and r["agree"] == "1" for r in rows)


def test_out_file(capsys, tmp_path):
    path = tmp_path / "count.json"
    code, out, _ = _run(capsys, "count", "tiny", "--tokens", "4", "--format", "json", "--out", str(path))
    assert code == EXIT_OK
    assert json.loads(path.read_text())["agree"] is True
    assert "counters agree" in out


@pytest.mark.parametrize("attn_kernel", ["math", "sdpa"])
def test_decode_70b_on_meta(capsys, attn_kernel):
    code, doc, err = _json(capsys, "count", "llama-2-70b", "--tokens", "1", "--cached", "4095",
                           "--counters", "analytic,hooks", "--kernel", attn_kernel)
    assert code == EXIT_OK, err
    a, b = 68_713_185_280, 1_310_720
    assert doc["totals"]["hooks"]["macs"] == a + b * 4096  # one token attending to 4096 positions


def test_device_choice(capsys):
    _, doc, _ = _json(capsys, "count", "tiny", "--tokens", "3", "--counters", "analytic,hooks")
    assert doc["device"] == "cpu" and doc["weights"] == "random weights"
    _, doc, _ = _json(capsys, "count", "tiny", "--tokens", "3", "--counters", "analytic,hooks", "--device", "meta")
    assert doc["device"] == "meta" and doc["agree"]


# ---------------------------------------------------------------- checkpoints and config files
def _write_checkpoint(tmp_path, fmt):
    from llama_ref.loading.synthetic import write_checkpoint

    out = tmp_path / fmt
    write_checkpoint("tiny", out, format=fmt, shards=1)
    return out


@pytest.mark.parametrize("fmt", ["hf", "meta"])
def test_checkpoint_directory_is_loaded(capsys, tmp_path, fmt):
    ckpt = _write_checkpoint(tmp_path, fmt)
    code, doc, err = _json(capsys, "count", str(ckpt), "--tokens", "4", "--cached", "2")
    assert code == EXIT_OK, err
    assert doc["weights"] == "checkpoint weights" and doc["device"] == "cpu" and doc["agree"]
    assert doc["params"] == param_count(PRESETS["tiny"])
    loaded = doc
    # forced to meta: the files are checked, nothing is loaded
    code, doc, _ = _json(capsys, "count", str(ckpt), "--tokens", "4", "--cached", "2", "--device", "meta")
    assert code == EXIT_OK and doc["device"] == "meta" and doc["weights"].startswith("checkpoint not loaded")
    on_meta = doc
    # the same config with random weights
    code, random_init, _ = _json(capsys, "count", "tiny", "--tokens", "4", "--cached", "2", "--device", "cpu")
    assert code == EXIT_OK and random_init["agree"]
    # weights change no count: loaded == meta == random init, counter by counter and row by row
    assert loaded["totals"] == on_meta["totals"] == random_init["totals"]
    assert loaded["layers"] == on_meta["layers"] == random_init["layers"]


def test_config_file_alone_means_random_init(capsys, tmp_path):
    ckpt = _write_checkpoint(tmp_path, "hf")
    code, doc, _ = _json(capsys, "count", str(ckpt / "config.json"), "--tokens", "4", "--counters", "analytic,hooks")
    assert code == EXIT_OK and doc["weights"] == "random weights"


def test_meta_params_without_checkpoint_needs_vocab_size(capsys, tmp_path):
    ckpt = _write_checkpoint(tmp_path, "meta")
    params = ckpt / "params.json"
    code, _, err = _run(capsys, "count", str(params), "--tokens", "4")
    assert code == EXIT_BAD_INPUT and "--vocab-size" in err and "Traceback" not in err
    code, doc, _ = _json(capsys, "count", str(params), "--tokens", "4", "--vocab-size", "256",
                         "--counters", "analytic,hooks")
    assert code == EXIT_OK and doc["params"] == param_count(PRESETS["tiny"])


# ---------------------------------------------------------------- Hugging Face hub ids
def test_hub_id_offline_from_a_cache_holding_only_the_config(capsys, tmp_path, monkeypatch):
    from _hub_cache import cache_file

    from llama_ref.hf import hf_config_dict

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "c0ffee" + "0" * 34
    data = json.dumps(hf_config_dict(PRESETS["llama-3.2-1b"])).encode()
    cache_file(tmp_path, "meta-llama/Llama-3.2-1B", commit, "config.json", data, refs=("main",))
    code, doc, err = _json(capsys, "count", "meta-llama/Llama-3.2-1B", "--tokens", "16", "--counters", "analytic,hooks")
    assert code == EXIT_OK, err
    assert doc["model"] == "meta-llama/Llama-3.2-1B" and doc["model_source"]["kind"] == "hub"
    assert doc["params"] == 1_235_814_400  # tied: the head is the embedding, counted once
    assert doc["config"]["rope_scaling"]["factor"] == 32.0 and doc["agree"]
    code, doc, _ = _json(capsys, "params", "meta-llama/Llama-3.2-1B", "--revision", commit)
    assert code == EXIT_OK and doc["params"] == doc["meta_model_numel"] == 1_235_814_400
    code, _, err = _run(capsys, "count", "meta-llama/Llama-3.2-3B")
    assert code == EXIT_BAD_INPUT and "not in the local cache" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- exit codes and bad input
@pytest.mark.parametrize("argv, needle", [
    (["count", "no-such-model"], "unknown model 'no-such-model'"),
    (["count", "/no/such/dir/"], "no such file or directory"),
    (["count", "tiny", "--schedule", "0-99"], "out of range"),
    (["count", "tiny", "--schedule", "bogus"], "unknown layer schedule"),
    (["count", "tiny", "--schedule", "skip-15"], "32-layer"),
    (["count", "tiny", "--counters", "analytic,bogus"], "bad --counters"),
    (["count", "tiny", "--tokens", "0"], "--tokens must be >= 1"),
    (["count", "tiny", "--cached", "-1"], "--cached must be >= 0"),
    (["count", "tiny", "--tokens", "100", "--cached", "100"], "exceeds the model's max_seq_len"),
    (["count", "tiny", "--device", "cuda:7"], "--device"),
    (["count", "tiny", "--device", "tpu"], "bad --device"),
    (["count", "llama-2-70b", "--device", "cpu"], "use --device meta"),
    (["schedules", "no-such-model"], "unknown model"),
    (["params", "no-such-model"], "unknown model"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, needle):
    code, out, err = _run(capsys, *argv)
    assert code == EXIT_BAD_INPUT
    assert needle in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_usage_errors_exit_2(capsys):
    assert main(["count"]) == EXIT_BAD_INPUT
    assert main(["count", "tiny", "--format", "xml"]) == EXIT_BAD_INPUT
    assert main([]) == EXIT_BAD_INPUT
    assert main(["--help"]) == EXIT_OK
    capsys.readouterr()


def test_empty_directory(capsys, tmp_path):
    code, _, err = _run(capsys, "count", str(tmp_path))
    assert code == EXIT_BAD_INPUT and "neither config.json" in err


def _sabotage(monkeypatch, change):
    real_build = count_command.build_model

    def build(*args, **kwargs):
        model, weights = real_build(*args, **kwargs)
        change(model)
        return model, weights

    monkeypatch.setattr(count_command, "build_model", build)


def test_disagreement_exits_1(capsys, monkeypatch):
    # The model's SwiGLU gate loses its SiLU: the op-level counters see the work that really runs.
    import llama_ref.model

    monkeypatch.setattr(llama_ref.model.F, "silu", lambda x: x)
    code, out, err = _run(capsys, "count", "tiny", "--tokens", "3")
    assert code == EXIT_DISAGREE
    assert "counters disagree" in err and "feed_forward.act" in err and "Traceback" not in err
    assert "DISAGREE" in out and "MISMATCH" in out


class _CustomGate(nn.Module):
    def forward(self, gate, up):
        return torch.sigmoid(gate) * gate * up


def test_strict_uncounted_module_exits_3(capsys, monkeypatch):
    _sabotage(monkeypatch, lambda model: setattr(model.layers[0].feed_forward, "act", _CustomGate()))
    code, _, err = _run(capsys, "count", "tiny", "--tokens", "3", "--counters", "analytic,hooks", "--strict")
    assert code == EXIT_UNCOUNTED and "_CustomGate" in err and "Traceback" not in err
    # without --strict: counted with a listed warning, and the counters then disagree on that row
    code, doc, _ = _json(capsys, "count", "tiny", "--tokens", "3", "--counters", "analytic,hooks")
    assert any("_CustomGate" in op for op in doc["unknown_ops"]["hooks"])
    assert code == EXIT_DISAGREE and doc["agree"] is False


# ---------------------------------------------------------------- schedules, params, subcommand wiring
def test_schedules_measure(capsys):
    code, out, err = _run(capsys, "schedules", "--measure")
    assert code == EXIT_OK, err
    for name in SCHEDULE_NAMES:
        assert name in out
    assert "6,607,077,376" in out and "8,882,726,776" in out and "1.3444" in out
    assert out.count("confirmed") == len(SCHEDULE_NAMES)


def test_schedules_json(capsys):
    code, doc, _ = _json(capsys, "schedules", "llama-2-7b")
    assert code == EXIT_OK and doc["unit"] == "macs"
    rows = {r["schedule"]: r for r in doc["rows"]}
    assert (rows["baseline"]["a_macs_per_token"], rows["baseline"]["b_macs_per_token_sq"]) == (6_607_077_376, 262_144)
    assert rows["mid-expansion-with-repeats"]["runs"] == 29
    assert rows["two-thirds"]["published_a"] == 6_185_271_872


def test_schedules_other_model_has_no_published_figures(capsys):
    code, doc, _ = _json(capsys, "schedules", "llama-2-70b")
    assert code == EXIT_OK
    rows = {r["schedule"]: r for r in doc["rows"]}
    assert rows["baseline"]["a_macs_per_token"] == 68_713_185_280 and "published_a" not in rows["baseline"]
    assert "error" in rows["skip-15"]  # 32-layer presets do not apply to 80 layers


def test_params(capsys):
    code, out, _ = _run(capsys, "params", "llama-2-70b")
    assert code == EXIT_OK and "68,976,648,192" in out and "equal" in out
    code, doc, _ = _json(capsys, "params", "llama-2-7b")
    assert doc["params"] == doc["meta_model_numel"] == 6_738_415_616 and doc["agree"]
    assert sum(doc["breakdown"].values()) == doc["params"]


def test_every_subcommand_is_registered():
    assert set(cli.SUBCOMMANDS) == {"count", "schedules", "params", "roofline", "mfu", "memory"}
    parser = cli.build_parser()
    assert parser.parse_args(["roofline", "tiny"]).command == "roofline"


def test_the_compute_dtype_and_its_reason_are_logged_with_v(capsys, caplog, monkeypatch):
    from llama_ref import compute_dtype

    # A bf16 checkpoint on a CPU without native bf16 (mocked): fp32, and why, in -v logs and in the JSON.
    monkeypatch.setattr(compute_dtype, "cpu_native", lambda dtype: (False, "no AMX-BF16 (mocked)"))
    with caplog.at_level("INFO"):
        code, doc, err = _json(capsys, "-v", "count", "tiny", "--tokens", "4", "--dtype", "bf16", "--device", "cpu")
    assert code == EXIT_OK, err
    assert doc["compute_dtype"] == "float32" and "no AMX-BF16 (mocked)" in doc["compute_dtype_reason"]
    assert any("computes in torch.float32" in r.getMessage() and "mocked" in r.getMessage() for r in caplog.records)
