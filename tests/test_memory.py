"""The memory algebra (llama_ref.memory_algebra) against measurements of the real model (counters.memory_measure),
exactly: every category, per layer run, and the peak as each measuring tool observes the program.

Cases: tiny (GQA, 2 kv heads for 4 query heads), MHA, tied embeddings and a Llama-3-shaped tiny (llama3 RoPE
scaling, 8 kv groups, a larger vocabulary); prefill, decode and training steps; both kernels; with and without
recompute; fp32 and bf16; on the CPU and on meta (full-size configs with two layers: every layer is shaped alike).
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from counters import cli
from counters.memory_check import ALLOCATOR_SLACK_BYTES, check, flash_cpu_scratch_bytes, measure_for
from counters.studies.factory import random_model
from llama_ref import Llama, LlamaConfig, PRESETS, RopeScaling
from llama_ref.memory_algebra import MemoryRequest, largest_fitting, memory
from llama_ref.memory_program import run
from llama_ref.shapes import kv_cache_bytes, param_count, weight_bytes

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = PRESETS["tiny"].replace(n_layers=2)
CONFIGS = {
    "gqa": TINY,
    "mha": TINY.replace(n_kv_heads=4, name="tiny-mha"),
    "tied": TINY.replace(tie_word_embeddings=True, name="tiny-tied"),
    "llama3": TINY.replace(n_heads=8, n_kv_heads=1, head_dim=8, vocab_size=512, rope_theta=500000.0, max_seq_len=256,
                           rope_scaling=RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                    high_freq_factor=4.0, original_max_position_embeddings=64),
                           name="tiny-llama3"),
}
# (name, request fields): a prefill, a decode step, a prefill of the last position's logits, training steps
REQUESTS = {
    "prefill": dict(batch=2, seqlen=12),
    "decode": dict(batch=3, seqlen=1, start_pos=9),
    "chunk": dict(batch=1, seqlen=5, start_pos=7, last_only=True),
    "train": dict(batch=2, seqlen=12, train=True, optimizer="adamw"),
    "recompute": dict(batch=2, seqlen=12, train=True, recompute=True, optimizer="sgd", loss="sum"),
}


def _model(config: LlamaConfig, attn_kernel: str, dtype=torch.float32, compute=None, device="cpu") -> Llama:
    if device == "meta":
        return Llama(config, device="meta", dtype=dtype, attn_kernel=attn_kernel, compute_dtype=compute or dtype)
    return random_model(config, dtype=dtype, attn_kernel=attn_kernel, compute_dtype=compute)


def _check(model: Llama, **fields):
    request = MemoryRequest(model.config, weight_dtype=model.tok_embeddings.weight.dtype,
                            compute_dtype=model.compute_dtype, attn_kernel=model.attn_kernel,
                            device_type=model.device.type, **fields)
    return check(request, measure_for(model, request))


@pytest.mark.parametrize("attn_kernel", ["math", "sdpa"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("what", list(REQUESTS))
def test_exact_on_cpu(config, attn_kernel, what):
    c = _check(_model(CONFIGS[config], attn_kernel), **REQUESTS[what])
    assert c.agree, c.mismatches()
    rows = {r.category: r for r in c.rows}
    # the allocator (no dispatch mode) is the only bound: the rest is byte for byte
    excess = rows["peak_allocator"].measured - rows["peak_allocator"].analytic
    assert 0 <= excess <= ALLOCATOR_SLACK_BYTES + flash_cpu_scratch_bytes(c.breakdown.request, torch.get_num_threads())
    assert not rows["peak_allocator"].informational
    assert rows["peak"].measured == rows["peak"].expected and rows["peak_tracker"].measured == rows["peak_tracker"].analytic
    b = c.breakdown
    if b.request.train:
        assert b.saved_activations > 0 and b.gradients == b.weights and len(c.layers) == 2
    assert c.measured.where == (b.where.phase, b.where.scope, b.where.op) or b.peak != b.peak_dispatch


@pytest.mark.parametrize("what", ["prefill", "train", "recompute"])
def test_exact_in_bf16(what):
    """bf16 weights computing in fp32 (a CPU without bf16 matmuls: every Linear casts its weight, and training
    saves the fp32 copies), and bf16 throughout."""
    for compute in (torch.float32, torch.bfloat16):
        c = _check(_model(CONFIGS["gqa"], "math", torch.bfloat16, compute), **REQUESTS[what])
        assert c.agree, (compute, c.mismatches())


@pytest.mark.parametrize("preset", ["llama-2-7b", "llama-3-8b"])
def test_exact_on_meta_full_size(preset):
    """Full-size layers on meta (two of them: all layers are shaped alike), bf16: inference at 4096 tokens with
    each kernel (sdpa on meta is the math fallback), and a training step with AdamW."""
    config = PRESETS[preset].replace(n_layers=2)
    for attn_kernel, fields in (("math", dict(batch=1, seqlen=4096)), ("sdpa", dict(batch=1, seqlen=1, start_pos=4095)),
                           ("sdpa", dict(batch=1, seqlen=256, train=True, optimizer="adamw"))):
        c = _check(_model(config, attn_kernel, torch.bfloat16, device="meta"), **fields)
        assert c.agree, (attn_kernel, fields, c.mismatches())


def test_tensor_parallel_ranks_on_meta():
    from llama_ref.parallel import fake_world, tensor_parallel_llama

    for fields in (REQUESTS["decode"], REQUESTS["train"]):
        for rank in range(2):
            with fake_world(2, rank=rank) as group:
                model = tensor_parallel_llama(CONFIGS["mha"], group=group, device="meta", dtype=torch.float32)
                request = MemoryRequest(model.config, weight_dtype=torch.float32, compute_dtype=model.compute_dtype,
                                        device_type="meta", tp=2, **fields)
                c = check(request, measure_for(model, request, allocator=False))
                assert c.agree, c.mismatches()
                # every rank holds its share: the split weights' 1/2 and the norms whole
                assert c.breakdown.weights == param_count(CONFIGS["mha"], 2) * 4


def test_categories_are_the_shape_algebras():
    """The simulated program's weights, RoPE table and KV cache are the closed forms of llama_ref.shapes."""
    for config in CONFIGS.values():
        b = memory(MemoryRequest(config, batch=3, seqlen=5, start_pos=4))
        assert b.weights + b.rope_table == weight_bytes(config, torch.float32)
        assert b.kv_cache == kv_cache_bytes(config, batch=3, n_positions=9, kv_dtype_bytes=4)
        # inputs: 3 x 5 token ids x 8 bytes; logits: 3 x 5 x vocab fp32
        assert b.inputs == 120 and b.logits == 3 * 5 * config.vocab_size * 4


def test_saved_activations_closed_form():
    """Per layer run, no cache (docs/memory.md), bytes per token. fp32 (weights and activations): 4 x (6*dim +
    4*q_dim + 4*hidden + 2 + n_heads*S) for the math kernel; sdpa (the CPU flash kernel) keeps n_heads fp32
    logsumexp values instead of the n_heads*S probabilities, and its keys and values as given. bf16 throughout:
    the norms and the softmax work in fp32 and keep fp32 copies: 16*dim + 8 + 8*q_dim + 8*hidden + 6*n_heads*S
    (math: the fp32 probabilities and their bf16 copy); sdpa: 4*n_heads for the logsumexp."""
    for config in CONFIGS.values():
        d, q, f, h = config.dim, config.q_dim, config.hidden_dim, config.n_heads
        for B, S in ((2, 12), (1, 33)):
            # the keys and values kept: repeated over the query heads (q_dim each), unless n_kv_heads == 1, where
            # repeat_kv is a view of the kv projections (kv_dim each), which sdpa keeps as given and the math kernel's
            # matmul reshapes without a copy for a batch of 1
            kv = config.kv_dim if config.n_kv_heads == 1 else q
            expected = {(torch.float32, "math"): 4 * (6 * d + 4 * q + 4 * f + 2 + h * S),
                        (torch.float32, "sdpa"): 4 * (6 * d + 2 * q + 2 * kv + 4 * f + 2 + h),
                        (torch.bfloat16, "math"): 16 * d + 8 + 8 * q + 8 * f + 6 * h * S,
                        (torch.bfloat16, "sdpa"): 16 * d + 8 + 4 * q + 4 * kv + 8 * f + 4 * h}
            if config.n_kv_heads == 1 and B == 1:
                expected[torch.float32, "math"] -= 4 * 2 * (q - kv)
                expected[torch.bfloat16, "math"] -= 2 * 2 * (q - kv)
            for (dtype, attn_kernel), per_token in expected.items():
                b = memory(MemoryRequest(config, batch=B, seqlen=S, train=True, optimizer="none", attn_kernel=attn_kernel,
                                         weight_dtype=dtype))
                assert [layer.saved_activation_bytes for layer in b.layers] == [B * S * per_token] * 2,\
                    (config.name, dtype, attn_kernel)


@pytest.mark.parametrize("fields", [dict(batch=2, seqlen=8, train=True, optimizer="adamw"),
                                    dict(batch=2, seqlen=8, train=True, recompute=True, optimizer="none"),
                                    dict(batch=3, seqlen=1, start_pos=6)], ids=["train", "recompute", "decode"])
def test_the_program_as_it_runs_allocates_what_the_allocator_sees(fields):
    """Without any dispatch mode, the CPU allocator's allocations (torch.profiler), in order and size, are the
    algebra's (those over 8 bytes: the 0-dim double tensors Python numbers become are the allocator's only
    extra; fp32, math kernel)."""
    from counters.memory_measure import _Request, allocator_events, make_tokens

    config = CONFIGS["tied"]
    model = _model(config, "math")
    tokens = make_tokens(model, fields["batch"], fields["seqlen"])
    request = _Request(model, tokens, fields["batch"], fields.get("start_pos", 0), fields.get("train", False),
                       "cross-entropy", fields.get("recompute", False), fields.get("optimizer", "none"), False, True)
    request.prepare()
    measured = [size for size, _op in allocator_events(request.run) if size > 8]
    request.finish()
    program = MemoryRequest(config, device_type="cpu", **fields).program()
    events = run(program, record=True).sim.events
    assert measured == [e[2] for e in events if e[0] == "alloc" and e[4] != "start" and e[2] > 8]


def test_dispatch_mode_changes_the_program():
    """Under a dispatch mode the engine cannot add two gradients for one input in place: more allocations (as the
    program runs, it adds out of place only into views: the sums of the projections' input gradients)."""
    request = MemoryRequest(CONFIGS["gqa"], batch=2, seqlen=8, train=True, optimizer="none")
    real = run(request.program(), record=True).sim.events
    dispatch = run(request.program(), dispatch_mode=True, record=True).sim.events
    adds = lambda events: sum(1 for e in events if e[0] == "alloc" and e[1] == "add.Tensor" and e[4] == "backward")  # noqa: E731
    assert adds(real) == 2 * 2 < adds(dispatch)  # per layer: wq/wk/wv's and w1/w3's input gradients


def test_largest_fitting_is_the_largest():
    # Llama-2-7B's layers, four of them (the search does not depend on the depth)
    config = PRESETS["llama-2-7b"].replace(n_layers=4)
    request = MemoryRequest(config, seqlen=4096, weight_dtype=torch.bfloat16, device_type="cuda", last_only=True)
    memory_bytes = 20 * 2**30
    best, at = largest_fitting(request, "batch", memory_bytes)
    assert at.peak <= memory_bytes < memory(replace(request, batch=best + 1)).peak and at.request.batch == best > 1
    train = MemoryRequest(config, weight_dtype=torch.bfloat16, batch=8, device_type="cuda", train=True,
                          optimizer="none")
    tokens, at = largest_fitting(train, "seqlen", 12 * 2**30)
    assert 0 < tokens < 4096 and at.peak <= 12 * 2**30 < memory(replace(train, seqlen=tokens + 1)).peak
    assert largest_fitting(request, "batch", 1000) == (0, None)  # not even the weights fit
    # the whole context fits: the search stops at max_seq_len - cached
    assert largest_fitting(MemoryRequest(PRESETS["tiny"], start_pos=28), "seqlen", 1 << 40)[0] == 100


# ---------------------------------------------------------------------------- the command
def _cli(capsys, *argv):
    code = cli.main(["memory", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_command_json(capsys):
    code, out, err = _cli(capsys, "tiny", "--tokens", "8", "--batch", "2", "--train", "--recompute", "--format", "json")
    assert code == cli.EXIT_OK, err
    doc = json.loads(out)
    assert doc["schema"] == "llama-ref.memory/1" and doc["agree"] and doc["request"]["recompute"]
    for name in ("weights", "gradients", "optimizer", "kv_cache", "saved_activations", "loss", "peak"):
        row = doc["bytes"][name]
        assert {"analytic", "measured", "source"} <= set(row) and row["agree"], (name, row)
    assert doc["bytes"]["weights"]["analytic"] == 217_664 * 4
    # AdamW: exp_avg and exp_avg_sq in fp32 per parameter, and a 4-byte step per parameter tensor: 39 tensors
    # (the embedding, 9 per layer, the final norm, the head)
    assert doc["bytes"]["optimizer"]["analytic"] == 2 * 217_664 * 4 + 39 * 4
    assert len(doc["layers"]) == 4 and all(r["saved_activation_bytes"]["analytic"] ==
                                           r["saved_activation_bytes"]["measured"] for r in doc["layers"])
    assert doc["peak_where"]["analytic"] == doc["peak_where"]["measured"]


def test_command_table_csv_out_tp(capsys, tmp_path):
    code, out, err = _cli(capsys, "tiny", "--tokens", "1", "--cached", "6", "--kernel", "sdpa")
    assert code == cli.EXIT_OK and "agree: yes" in out and "peak at:" in out, err
    code, out, _ = _cli(capsys, "tiny", "--tokens", "4", "--format", "csv")
    assert code == cli.EXIT_OK and out.startswith("rank,row,analytic_bytes") and ",peak," in out
    path = tmp_path / "m.json"
    code, out, _ = _cli(capsys, "tiny", "--tokens", "4", "--tp", "2", "--format", "json", "--out", str(path))
    doc = json.loads(path.read_text())
    assert code == cli.EXIT_OK and "memory agrees" in out and [r["rank"] for r in doc["ranks"]] == [0, 1]
    assert doc["agree"] and doc["request"]["tp"] == 2


def test_command_on_a_checkpoint_and_a_hub_id(capsys, tmp_path, monkeypatch):
    from _ckpt_helpers import synth
    from _hub_cache import cache_file

    from llama_ref.hf import hf_config_dict

    synth().write_checkpoint("tiny", tmp_path / "ckpt", "hf", shards=2, dtype=torch.float32, seed=0)
    code, out, err = _cli(capsys, str(tmp_path / "ckpt"), "--tokens", "4", "--format", "json")
    doc = json.loads(out)
    assert code == cli.EXIT_OK and doc["agree"] and doc["model_source"]["kind"] == "hf", err
    assert doc["weights"] == "checkpoint weights"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache_file(tmp_path / "hub", "meta-llama/Llama-3.2-1B", "c0ffee" + "0" * 34, "config.json",
               json.dumps(hf_config_dict(PRESETS["llama-3.2-1b"])).encode(), refs=("main",))
    code, out, err = _cli(capsys, "meta-llama/Llama-3.2-1B", "--tokens", "64", "--format", "json")
    doc = json.loads(out)
    assert code == cli.EXIT_OK and doc["agree"] and doc["model_source"]["kind"] == "hub", err
    # tied: the head is the embedding, counted once: 1,235,814,400 bf16 weights
    assert doc["bytes"]["weights"]["analytic"] == 1_235_814_400 * 2


def test_command_max_batch_and_max_tokens(capsys):
    code, out, err = _cli(capsys, "llama-2-7b", "--tokens", "4096", "--logits", "last", "--max-batch", "--hardware",
                          "h100-sxm", "--no-measure", "--format", "json")
    doc = json.loads(out)
    assert code == cli.EXIT_OK, err
    request = MemoryRequest(PRESETS["llama-2-7b"], seqlen=4096, last_only=True, weight_dtype=torch.bfloat16,
                            device_type="cuda")
    assert doc["max_batch"] == largest_fitting(request, "batch", 80 * 2**30)[0] == doc["request"]["batch"]
    assert doc["device_memory_bytes"] == 80 * 2**30 and doc["sizing"]["peak_bytes"] <= 80 * 2**30
    # measured at the size found (on meta)
    code, out, err = _cli(capsys, "tiny", "--max-batch", "--device-memory", "3000000", "--tokens", "32", "--format",
                          "json")
    doc = json.loads(out)
    assert code == cli.EXIT_OK and doc["agree"] and doc["request"]["batch"] == doc["max_batch"] > 1, err
    code, out, err = _cli(capsys, "tiny", "--max-tokens", "--device-memory", "1200000", "--no-measure")
    assert code == cli.EXIT_OK and "max tokens:" in out, err
    code, out, err = _cli(capsys, "tiny", "--max-batch", "--device-memory", "1000")
    assert code == cli.EXIT_OK and "nothing fits" in out, err


def test_sabotage_an_extra_saved_activation_disagrees(capsys, monkeypatch):
    """A layer that keeps one more tensor for backward (its SwiGLU product multiplied by ones: the multiply saves
    the product) makes the measured saved activations exceed the algebra's: exit 1."""
    from counters.commands import memory as memory_command

    real_build = memory_command.build_model

    def sabotaged(*args, **kwargs):
        model, weights = real_build(*args, **kwargs)
        act = model.layers[1].feed_forward.act
        plain = act.forward
        act.forward = lambda gate, up: plain(gate, up) * torch.ones_like(up)
        return model, weights
    monkeypatch.setattr(memory_command, "build_model", sabotaged)
    code, out, err = _cli(capsys, "tiny", "--tokens", "8", "--train", "--optimizer", "none")
    assert code == cli.EXIT_DISAGREE and "agree: NO" in out
    assert "saved_activations" in err and "layer run 1 saved_activation_bytes" in out + err
