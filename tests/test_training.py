"""Training-step counts: forward + loss + backward, per row and per phase, by every counter that can see it."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from counters.analytic import analyze, analyze_training
from counters.cli import EXIT_BAD_INPUT, EXIT_DISAGREE, EXIT_OK, main
from counters.crosscheck import crosscheck
from counters.hooks import count_hooks
from counters.primitives import Count
from counters.result import BACKWARD, FORWARD, KERNEL_RECOMPUTE, RECOMPUTE
from counters.torch_counter import count_torch
from counters.training import Training
import llama_ref
from llama_ref import Llama, LlamaConfig, PRESETS

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = LlamaConfig(name="small", dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=176,
                    max_seq_len=64)
ROOT = Path(__file__).resolve().parents[1]


def _tokens(model, batch, n):
    return torch.zeros((batch, n), dtype=torch.long, device=model.device)


def _report(cfg=SMALL, device="cpu", attn_kernel="math", schedule=None, batch=2, n=5, dtype=None, **training):
    model = Llama(cfg, device=device, attn_kernel=attn_kernel, schedule=schedule, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return crosscheck(model, _tokens(model, batch, n), training=Training(**training))


# ---------------------------------------------------------------- the bar
def test_llama2_7b_n2048_every_counter_reports_three_forwards():
    report = _report(PRESETS["llama-2-7b"], device="meta", batch=1, n=2048, dtype=torch.bfloat16, loss="sum")
    forward = 2048 * 6_607_077_376 + 262_144 * 2048 ** 2
    assert forward == 14_630_806_093_824
    assert report.agree, [str(m) for m in report.mismatches[:5]]
    for name in ("analytic", "hooks", "torch"):
        t = report.totals[name]
        assert t["macs"] == 3 * forward == t["forward_macs"] + t["backward_macs"], name
        assert t["forward_macs"] == forward and t["backward_macs"] == 2 * forward
    # fvcore cannot trace a backward: it measures the forward and says so, and claims nothing else
    fv = report.totals["fvcore"]
    assert fv["forward_macs"] == forward and fv["macs"] is None and fv["backward_macs"] is None
    assert any("fvcore" in n and "forward only" in n for n in report.notes)
    assert report.compared[(BACKWARD, "macs")] == ["analytic", "hooks", "torch"]


@pytest.mark.parametrize("hf_kwargs", [
    dict(),
    dict(num_key_value_heads=4),
    dict(num_hidden_layers=2, tie_word_embeddings=True),
    dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 16}),
], ids=["gqa", "mha", "tied", "llama3-rope"])
@pytest.mark.parametrize("batch, n", [(1, 7), (2, 5)])
def test_total_equals_flop_counter_mode_on_transformers_eager(hf_llama_factory, hf_kwargs, batch, n):
    """For any config and shape: FlopCounterMode on transformers' eager LlamaForCausalLM, forward + backward
    of the same batch, divided by 2 (it counts 2 per MAC), equals every counter's training MACs."""
    from torch.utils.flop_counter import FlopCounterMode

    tie = hf_kwargs.pop("tie_word_embeddings", False)
    rope_scaling = hf_kwargs.pop("rope_scaling", None)
    hf = build_hf(hf_llama_factory, hf_kwargs, tie, rope_scaling)
    tokens = torch.randint(0, hf.config.vocab_size, (batch, n), generator=torch.Generator().manual_seed(0))
    for p in hf.parameters():
        p.requires_grad_(True)
    with FlopCounterMode(display=False) as fcm:
        hf(input_ids=tokens).logits.sum().backward()
    ours = llama_ref.from_hf(hf)
    report = crosscheck(ours, tokens, training=Training(loss="sum"))
    assert report.agree, [str(m) for m in report.mismatches[:5]]
    assert fcm.get_total_flops() == 2 * report.totals["analytic"]["macs"] == 2 * report.totals["torch"]["macs"]


@pytest.mark.parametrize("hf_kwargs", [dict(), dict(num_hidden_layers=2, tie_word_embeddings=True)], ids=["gqa", "tied"])
def test_forward_equals_flop_counter_mode_on_transformers_eager(hf_llama_factory, hf_kwargs):
    """The forward alone: FlopCounterMode on transformers' eager forward / 2 equals every counter's MACs."""
    from torch.utils.flop_counter import FlopCounterMode

    tie = hf_kwargs.pop("tie_word_embeddings", False)
    hf = build_hf(hf_llama_factory, hf_kwargs, tie, None)
    tokens = torch.randint(0, hf.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as fcm:
        hf(input_ids=tokens)
    report = crosscheck(llama_ref.from_hf(hf), tokens)
    assert report.agree, [str(m) for m in report.mismatches[:5]]
    assert fcm.get_total_flops() == 2 * report.totals["analytic"]["macs"] == 2 * report.totals["fvcore"]["macs"]


def build_hf(factory, kwargs, tie, rope_scaling):
    hf = factory(**kwargs)
    if tie or rope_scaling:
        import transformers

        cfg = hf.config.to_dict()
        cfg.update(tie_word_embeddings=tie)
        if rope_scaling:
            cfg["rope_scaling"] = rope_scaling
        cfg.pop("rope_parameters", None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg, attn_implementation="eager"))
            hf = hf.float().eval()
    return hf


# ---------------------------------------------------------------- every row, every counter
@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("attn_kernel", ["math", "sdpa"])
@pytest.mark.parametrize("loss", ["cross-entropy", "sum"])
def test_every_row_agrees(device, attn_kernel, loss):
    report = _report(device=device, attn_kernel=attn_kernel, schedule="0,1x2,2", loss=loss)
    assert report.agree and report.complete, [str(m) for m in report.mismatches[:5]]
    assert report.phases[:2] == (FORWARD, BACKWARD)
    # every row: backward matrix products are exactly twice the forward's (dX and dW; two per attention product)
    for r in report.rows:
        assert r.get("macs", BACKWARD)["torch"] == 2 * r.get("macs", FORWARD)["torch"], r.key


@pytest.mark.parametrize("cfg", [SMALL.replace(tie_word_embeddings=True), SMALL.replace(head_dim=24),
                                 SMALL.replace(n_kv_heads=4)], ids=["tied", "head_dim", "mha"])
def test_every_row_agrees_on_other_shapes(cfg):
    report = _report(cfg, device="meta", schedule="0,1x3,2,0", dtype=torch.bfloat16)
    assert report.agree and report.complete, [str(m) for m in report.mismatches[:5]]


def test_backward_rows_by_hand():
    """SMALL, batch 2 x 5 tokens: r = 10 rows, d = 64, head_dim 16, 4 query / 2 kv heads, F = 176, V = 256."""
    report = analyze_training(SMALL, batch=2, seqlen=5, schedule="0,1,1")
    rows = {r.key: r for r in report.rows}
    # wq: dW (64 x 10) @ (10 x 64) and dX (10 x 64) @ (64 x 64): 2 * 10*64*64 = 81920 MACs;
    # x is shared with wk and wv, and its gradient from wq is added: 10*64 = 640 FLOPs
    assert rows[(0, "attention.wq")].backward == Count(81920, 640)
    assert rows[(0, "attention.wv")].backward == Count(2 * 10 * 64 * 32, 0)  # no add: its gradient came first
    # RMSNorm: 11*r*d + 2r - d = 7040 + 20 - 64 = 6996, plus the residual stream's add r*d = 640
    assert rows[(0, "attention_norm")].backward == Count(0, 6996 + 640)
    assert rows[(None, "norm")].backward == Count(0, 6996)
    # SwiGLU gate: two multiplies + silu_backward (9) per element: 11 * 10*176 = 19360
    assert rows[(0, "feed_forward.act")].backward == Count(0, 19360)
    # attention: 4 products of 2*4*5*5*16 = 3200 MACs each = 12800; scores S = 2*4*5*5 = 200:
    # softmax backward 4 + scale 1 per score = 1000; GQA: k and v gradients summed over 2 query heads per kv
    # head: 2 * (2*5*4*16 - 2*5*2*16) = 640
    assert rows[(0, "attention.core")].backward == Count(12800, 1000 + 640)
    # RoPE: the same complex multiply as the forward: 10 * 8 * 6 * (4 + 2) = 2880
    assert rows[(0, "attention.rope")].backward == Count(0, 2880)
    # the embedding's backward adds each of the r gradient rows into the table: 10*64
    assert rows[(None, "tok_embeddings")].backward == Count(0, 640)
    # layer 1 runs at positions 1 and 2: its weights' two gradients are added in the earlier run's backward
    assert rows[(1, "attention.wq")].backward == rows[(2, "attention.wq")].backward + Count(0, 64 * 64)
    assert rows[(1, "ffn_norm")].backward == rows[(2, "ffn_norm")].backward + Count(0, 64)
    # cross-entropy: log_softmax 5 per logit + nll 1 per target forward; 4 per logit + 1 per target backward
    assert rows[(None, "(loss)")].forward == Count(0, 5 * 10 * 256 + 10)
    assert rows[(None, "(loss)")].backward == Count(0, 4 * 10 * 256 + 10)


def test_a_tied_embedding_gets_the_heads_gradient_added():
    cfg = SMALL.replace(tie_word_embeddings=True)
    rows = {r.key: r for r in analyze_training(cfg, batch=1, seqlen=4).rows}
    # its backward: the scatter-add of 4 rows of 64, plus the add of the head's gradient of the whole matrix
    assert rows[(None, "tok_embeddings")].backward == Count(0, 4 * 64 + 256 * 64)


# ---------------------------------------------------------------- executed vs model work
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_recompute_runs_every_layer_forward_again(device):
    report = _report(device=device, schedule="0,1x2,2", recompute=True)
    assert report.agree and report.complete, [str(m) for m in report.mismatches[:5]]
    assert RECOMPUTE in report.phases
    forward_layers = sum(r.count.macs for r in analyze(SMALL, batch=2, seqlen=5, schedule="0,1x2,2").rows
                         if r.position is not None)
    for name in ("analytic", "hooks", "torch"):  # measured by the hooks and torch, not assumed
        t = report.totals[name]
        assert t[f"{RECOMPUTE}_macs"] == forward_layers
        assert t["executed_macs"] == t["macs"] + forward_layers
    assert report.compared[(RECOMPUTE, "macs")] == ["analytic", "hooks", "torch"]
    # the model work is the same with and without checkpointing
    plain = _report(device=device, schedule="0,1x2,2")
    assert plain.totals["torch"]["macs"] == report.totals["torch"]["macs"]


def test_the_cpu_sdpa_backward_recomputes_the_scores():
    report = _report(attn_kernel="sdpa")
    assert report.agree
    # torch's backward formula counts 5 products; one is the kernel's QK^T recomputation: 3 runs x 2*4*5*5*16
    assert report.totals["torch"][f"{KERNEL_RECOMPUTE}_macs"] == 3 * 3200
    assert report.totals["torch"]["executed_macs"] == report.totals["torch"]["macs"] + 3 * 3200
    assert report.compared[(KERNEL_RECOMPUTE, "macs")] == ["torch"]  # only torch sees inside the kernel
    assert any("recomputes the scores" in n for n in report.notes)


# ---------------------------------------------------------------- the counters would notice
def test_extra_backward_work_makes_the_counters_disagree(monkeypatch):
    import llama_ref.model

    silu = torch.nn.functional.silu

    class LoudSiLU(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return silu(x)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            s = torch.sigmoid(x)
            return g * s * (1 + x * (1 - s)) * 1.0  # one multiply per element more than silu_backward

    monkeypatch.setattr(llama_ref.model.F, "silu", lambda x, inplace=False: LoudSiLU.apply(x))
    report = _report()
    rows = {(m.key[1], m.phase, m.counter) for m in report.mismatches if m.key[1] != "TOTAL"}
    assert ("feed_forward.act", BACKWARD, "torch") in rows
    # the forward is the same work (fvcore's trace shows the custom Function as an op it cannot count)
    assert {r for r in rows if r[1] == FORWARD} <= {("feed_forward.act", FORWARD, "fvcore")}
    assert report.unknown_ops["fvcore"] == {"prim::PythonOp.LoudSiLU": 3}


def test_counters_need_a_step_without_cache():
    model = Llama(SMALL)
    with pytest.raises(ValueError, match="start_pos must be 0"):
        crosscheck(model, _tokens(model, 1, 2), start_pos=3, training=Training())
    with pytest.raises(ValueError, match="unknown loss"):
        Training(loss="mse")
    with pytest.raises(ValueError, match="start_pos"):
        count_hooks(model, _tokens(model, 1, 2), 3, training=Training())
    with pytest.raises(ValueError, match="start_pos"):
        count_torch(model, _tokens(model, 1, 2), 3, training=Training())


def test_a_training_step_leaves_the_model_as_it_was():
    model = Llama(SMALL)
    model.requires_grad_(False)
    crosscheck(model, _tokens(model, 1, 3), training=Training(recompute=True))
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())
    assert not model.activation_checkpointing


# ---------------------------------------------------------------- the command
def _json(capsys, *argv):
    code = main(list(argv) + ["--format", "json"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


def test_count_train_json(capsys):
    code, doc, err = _json(capsys, "count", "tiny", "--tokens", "6", "--batch", "2", "--train", "--schedule", "0,1x2,3")
    assert code == EXIT_OK, err
    assert doc["task"] == "train" and doc["training"] == {"loss": "cross-entropy", "recompute": False}
    for name in ("analytic", "hooks", "torch"):
        t = doc["totals"][name]
        assert t["macs"] == t["forward_macs"] + t["backward_macs"] == 3 * t["forward_macs"]
        assert t["loss_nonmatmul_flops"] > 0
    assert doc["totals"]["fvcore"]["backward_macs"] is None
    row = next(r for r in doc["layers"] if r["position"] == 1 and r["module"] == "attention.wq")
    assert row["backward_macs"]["hooks"] == 2 * row["forward_macs"]["hooks"]


def test_count_train_table_and_recompute(capsys):
    code = main(["count", "tiny", "--tokens", "4", "--train", "--recompute", "--counters", "analytic,hooks,torch"])
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err
    assert "fwd MACs" in out and "bwd MACs" in out and "executed by torch" in out and "AGREE" in out


@pytest.mark.parametrize("argv, needle", [
    (["--train", "--cached", "3"], "--cached must be 0"),
    (["--recompute"], "add --train"),
    (["--loss", "sum"], "add --train"),
])
def test_count_train_bad_input(capsys, argv, needle):
    code = main(["count", "tiny", "--tokens", "4", *argv])
    _, err = capsys.readouterr()
    assert code == EXIT_BAD_INPUT and needle in err and len(err.strip().splitlines()) == 1


def test_disagreement_in_training_exits_1(capsys, monkeypatch):
    import llama_ref.model

    monkeypatch.setattr(llama_ref.model.F, "silu", lambda x: x * torch.sigmoid(x))  # other ops than silu
    code = main(["count", "tiny", "--tokens", "3", "--train"])
    _, err = capsys.readouterr()
    assert code == EXIT_DISAGREE and "feed_forward.act" in err


@pytest.mark.slow
def test_70b_training_step_on_meta_is_quick_and_small():
    code = ("import resource, json, sys; from counters.cli import main; "
            "rc = main(['count', 'llama-2-70b', '--tokens', '2048', '--train', '--counters', 'analytic,hooks,torch', "
            "'--format', 'json', '--out', sys.argv[1]]); "
            "print(json.dumps({'rc': rc, 'rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))")
    import tempfile
    import time

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code, f"{d}/out.json"], capture_output=True, text=True,
                              cwd=ROOT, timeout=600)
        seconds = time.perf_counter() - t0
        assert proc.returncode == 0, proc.stderr[-2000:]
        stats = json.loads(proc.stdout.strip().splitlines()[-1])
        doc = json.loads(Path(f"{d}/out.json").read_text())
    assert stats["rc"] == EXIT_OK and doc["agree"]
    assert doc["totals"]["torch"]["macs"] == 3 * (68_713_185_280 * 2048 + 1_310_720 * 2048 ** 2)
    assert stats["rss_mib"] < 1.5 * 1024  # shapes only: no 138 GB of weights, no activations
    assert seconds < 300  # typically 10-20 s on 2 shared cores
