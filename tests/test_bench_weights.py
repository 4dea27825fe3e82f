"""The real-weights benchmark (scripts/bench_weights.py) on a tiny checkpoint: its children, its ratios, its
report, its plot and its refusals. The timings themselves are never asserted."""

from __future__ import annotations

import json

import pytest
import torch

from counters.studies import bench_weights as B
from llama_ref.loading.synthetic import write_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("bw") / "tiny-hf"
    write_checkpoint("tiny", out, "hf", dtype=torch.bfloat16)
    return out


def test_children_measure_the_same_greedy_tokens(tiny_ckpt):
    ours = B.child_ours(str(tiny_ckpt), device="cpu", tokens=8, new_tokens=4, steady=1, compile=False)
    hf = B.child_hf(str(tiny_ckpt), device="cpu", dtype=ours["compute_dtype"], tokens=8, new_tokens=4, steady=1)
    for side in (ours, hf):
        assert side["load_s"] > 0 and side["first_forward_s"] > 0 and side["eager_tokens_per_s"] > 0
        assert side["peak_rss_mb"] >= side["peak_rss_mb_forward"] > 0
    assert ours["weight_dtype"] == "bfloat16" and ours["compute_dtype_reason"]
    assert ours["tokens"] == hf["tokens"] and len(ours["tokens"]) == 4
    torch.testing.assert_close(torch.tensor(ours["logits_head"]), torch.tensor(hf["logits_head"]), atol=2e-3, rtol=0)


def test_rounds_alternate_and_the_report_holds_every_figure(tiny_ckpt, tmp_path, monkeypatch):
    calls = []

    def in_process(args, timeout):  # the children, without the interpreters (tested above)
        calls.append(args[1])
        kw = dict(device="cpu", tokens=int(args[args.index("--tokens") + 1]), new_tokens=3, steady=1)
        if args[1] == "ours":
            return B.child_ours(args[2], compile=False, **kw)
        return B.child_hf(args[2], dtype=args[args.index("--dtype") + 1], **kw)

    monkeypatch.setattr(B, "_run_child", in_process)
    doc = B.run(str(tiny_ckpt), rounds=3, tokens=6, new_tokens=3, compile=False, count=False, log=lambda m: None)
    assert calls == ["ours", "hf", "hf", "ours", "ours", "hf"]  # A B, B A, A B
    res = doc["results"]
    for key in ("load_first_forward", "steady_forward", "eager_decode"):
        assert len(res[key]["per_round"]) == 3 and res[key]["ci95"][0] <= res[key]["ratio"] <= res[key]["ci95"][1]
    assert set(doc["checks"]) == {"load + first forward", "steady forward", "peak RSS", "eager decode"}
    assert set(doc["checks"].values()) <= {"met", "not met", "within noise"}
    assert doc["compute_dtype"] in ("float32", "bfloat16") and doc["compute_dtype_reason"]
    text = B.format_report(doc)
    assert "load + first 6-token forward" in text and "greedy tokens identical: True" in text
    png = B.plot(doc, tmp_path / "bw.png")
    assert png.exists() and png.stat().st_size > 1000
    json.dumps(doc, default=str)


@pytest.mark.parametrize("argv, needle", [
    (["/no/such/dir"], "is not a checkpoint directory"),
    (["{ckpt}", "--rounds", "0"], "--rounds must be >= 1"),
    (["{ckpt}", "--device", "tpu"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_ckpt, argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_:
        B.main([a.replace("{ckpt}", str(tiny_ckpt)) for a in argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_a_decode_beyond_the_context_is_refused_in_one_line(tiny_ckpt, tmp_path, capsys):
    # tiny: max_seq_len 128; 16 + 120 = 136
    assert B.main([str(tiny_ckpt), "--new-tokens", "120", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--tokens 16 + --new-tokens 120 = 136 exceeds the model's max_seq_len 128" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_fails_cleanly(tiny_ckpt, capsys):
    assert B.main([str(tiny_ckpt), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and len(err.strip().splitlines()) == 1
