"""counters.estimates: every published training-FLOP formula and the exact count it is judged against
(the numbers docs/errata.md prints are checked in tests/test_errata.py)."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from counters import estimates as E
from counters.analytic import analyze, macs_polynomial, param_count
from llama_ref import PRESETS, Llama, LlamaConfig

L7, L70, L3 = PRESETS["llama-2-7b"], PRESETS["llama-2-70b"], PRESETS["llama-3-8b"]
SMALL = [  # (dim, n_layers, n_heads, n_kv_heads, vocab, hidden): MHA, GQA n_rep 2, GQA n_rep 3
    (64, 2, 4, 4, 128, 176),
    (64, 2, 4, 2, 128, 176),
    (96, 3, 6, 2, 100, 256),
]


# ---------------------------------------------------------------- the exact count
def test_the_bar_llama_2_7b_at_2048():
    # forward MACs = 2048 * 6,607,077,376 + 262,144 * 2048^2 = 13,531,294,466,048 + 1,099,511,627,776
    fwd = 2048 * 6_607_077_376 + 262_144 * 2048 ** 2
    assert fwd == 14_630_806_093_824 == E.exact_forward_macs(L7, 2048)
    assert E.exact_train_macs(L7, 2048) == 3 * 14_630_806_093_824 == 43_892_418_281_472
    # per token: 2 * 3 * (6,607,077,376 + 262,144 * 2048) = 6 * 7,143,948,288
    assert E.exact_model_flops_per_token(L7, 2048) == 6 * (6_607_077_376 + 262_144 * 2048) == 42_863_689_728


def test_the_mfu_bar():
    # 3000 tokens/s * 6 * (6,607,077,376 + 262,144 * 2048) FLOPs/token / 989e12 FLOP/s, exactly
    got = E.mfu(E.exact_model_flops_per_token(L7, 2048), 3000, 989e12)
    assert got == Fraction(3000 * 6 * (6_607_077_376 + 262_144 * 2048), 989 * 10 ** 12)
    assert 0.1300 < got < 0.1301  # 128,591,069,184,000 / 989e12 = 0.13002...
    # devices divide the peak: the same job on 4 devices
    assert E.mfu(E.exact_model_flops_per_token(L7, 2048), 3000, 989e12, devices=4) == got / 4


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("n", [1, 7, 2048])
def test_exact_forward_equals_the_analytic_polynomial(name, n):
    a, b = macs_polynomial(PRESETS[name])
    assert E.exact_forward_macs(PRESETS[name], n) == a * n + b * n * n
    assert E.exact_forward_macs(PRESETS[name], n, batch=3) == 3 * (a * n + b * n * n)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_counts_match_the_model(name):
    p = E.param_counts(PRESETS[name])
    assert p["total"] == param_count(PRESETS[name])
    assert p["total"] == p["embedding"] + p["layers_matmul"] + p["norms"] + p["output"]
    # a tied head is a matrix product on the embedding's matrix: in "matmul", not in "non_embedding"
    tied_head = p["embedding"] if PRESETS[name].tie_word_embeddings else 0
    assert p["output"] == (0 if tied_head else p["embedding"])
    assert p["non_embedding"] == p["matmul"] + p["norms"] - tied_head
    # N of torchtitan and PaLM: a tied table is the head's matrix, so it stays; an untied one is dropped
    assert p["weights_in_a_product"] == p["matmul"] + p["norms"]
    assert p["weights_in_a_product"] == (p["total"] if tied_head else p["total"] - p["embedding"])
    # matmul params = the coefficient a of the forward polynomial (one MAC per weight per token)
    assert p["matmul"] == macs_polynomial(PRESETS[name])[0]


def test_param_counts_7b_by_hand():
    # 32 * (4 * 4096^2 + 3 * 4096 * 11008) = 6,476,005,376; norms (2 * 32 + 1) * 4096 = 266,240
    p = E.param_counts(L7)
    assert p["layers_matmul"] == 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008) == 6_476_005_376
    assert p["norms"] == 65 * 4096 == 266_240
    assert p["total"] == 6_738_415_616


def _hf_train_flops(shape, n, bsz, loss="sum", attn="eager"):
    from conftest import build_hf_llama

    d, layers, h, kv, v, f = shape
    model = build_hf_llama(hidden_size=d, num_hidden_layers=layers, num_attention_heads=h, num_key_value_heads=kv,
                           vocab_size=v, intermediate_size=f, attn_implementation=attn).train()
    assert all(p.requires_grad for p in model.parameters())
    tokens = torch.randint(0, v, (bsz, n), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with counter:
        logits = model(tokens).logits
        if loss == "sum":
            out = logits.sum()
        else:
            out = torch.nn.functional.cross_entropy(logits.reshape(-1, v), tokens.reshape(-1))
        out.backward()
    return counter.get_total_flops(), {str(k): c for k, c in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("shape", SMALL)
@pytest.mark.parametrize("n, bsz", [(7, 1), (16, 2)])
@pytest.mark.parametrize("loss", ["sum", "ce"])
def test_flopcountermode_on_transformers_eager_is_exactly_three_forwards(shape, n, bsz, loss):
    pytest.importorskip("transformers")
    d, layers, h, kv, v, f = shape
    cfg = LlamaConfig(dim=d, n_layers=layers, n_heads=h, n_kv_heads=kv, vocab_size=v, hidden_dim=f)
    total, per_op = _hf_train_flops(shape, n, bsz, loss)
    # FlopCounterMode counts 2 per MAC; only mm (projections, head) and bmm (QK^T, A.V) have formulas
    assert total == 2 * E.exact_train_macs(cfg, n, bsz)
    assert set(per_op) == {"aten.mm", "aten.bmm"}
    # the attention products: 3 x (2 products x bsz * n_heads * n^2 * head_dim) MACs, x2 FLOPs
    assert per_op["aten.bmm"] == 2 * 3 * layers * 2 * bsz * h * n * n * (d // h)


def test_flopcountermode_misses_cpu_sdpa_forward_and_backward():
    pytest.importorskip("transformers")
    shape, n = SMALL[1], 16
    d, layers, h, kv, v, f = shape
    cfg = LlamaConfig(dim=d, n_layers=layers, n_heads=h, n_kv_heads=kv, vocab_size=v, hidden_dim=f)
    total, per_op = _hf_train_flops(shape, n, 1, attn="sdpa")
    # on CPU the fused _scaled_dot_product_flash_attention_for_cpu(_backward) ops have no torch formula:
    # the whole attention (3 x 2 x layers * h * n^2 * hd MACs) is missing, nothing else
    attention_macs = 3 * layers * 2 * h * n * n * (d // h)
    assert set(per_op) == {"aten.mm"}
    assert total == 2 * (E.exact_train_macs(cfg, n) - attention_macs)


@pytest.mark.parametrize("attn_kernel", ["math", "sdpa"])
def test_flopcountermode_on_llama_ref_7b_meta_is_the_bar(attn_kernel):
    # meta device: the sdpa kernel runs SDPA's math decomposition (bmm), so both kernels are counted
    model = Llama(L7, device="meta", attn_kernel=attn_kernel, compute_dtype=torch.float32)
    tokens = torch.zeros((1, 2048), dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        loss = model(tokens).sum()
        assert counter.get_total_flops() == 2 * 14_630_806_093_824
        loss.backward()
    assert counter.get_total_flops() == 2 * 3 * 14_630_806_093_824


@pytest.mark.parametrize("early_stop, macs", [
    # full recompute: + every block's forward again = 43,892,418,281,472 + 32 * (202,375,168 * 2048 + 8,192 * 2048^2)
    (False, 43_892_418_281_472 + 32 * (202_375_168 * 2048 + 8_192 * 2048 ** 2)),
    # early stop (torch's default) skips w2's product: - 32 * 4096 * 11008 * 2048
    (True, 43_892_418_281_472 + 32 * (202_375_168 * 2048 + 8_192 * 2048 ** 2) - 32 * 4096 * 11008 * 2048),
])
def test_activation_checkpointing_is_counted_as_recompute(early_stop, macs):
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    model = Llama(L7, device="meta", compute_dtype=torch.float32)
    for layer in model.layers:
        layer.forward = lambda *a, _f=layer.forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)
    tokens = torch.zeros((1, 2048), dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        with set_checkpoint_early_stop(early_stop):
            loss = model(tokens).sum()
        loss.backward()
    assert counter.get_total_flops() == 2 * macs
    assert macs == (55_299_851_419_648 if early_stop else 58_254_788_919_296)


def test_executed_flops_with_recompute_are_the_flopcountermode_figure():
    # 2 x 58,254,788,919,296 MACs / 2048 tokens (full recompute, measured above)
    assert E.exact_executed_flops_per_token(L7, 2048, recompute=True) == 2 * 58_254_788_919_296 // 2048
    assert E.exact_executed_flops_per_token(L7, 2048, recompute=False) == E.exact_model_flops_per_token(L7, 2048)


def test_executed_flops_with_recompute_and_a_schedule_measured():
    # every layer *run* is recomputed: a repeated layer twice. FlopCounterMode on the meta device, whole-layer
    # checkpointing without early stop, 29 runs of mid-expansion-with-repeats, N = 256
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    n, schedule = 256, "mid-expansion-with-repeats"
    model = Llama(L7, device="meta", compute_dtype=torch.float32, schedule=schedule)
    for layer in model.layers:
        layer.forward = lambda *a, _f=layer.forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)
    counter = FlopCounterMode(display=False)
    with counter:
        with set_checkpoint_early_stop(False):
            loss = model(torch.zeros((1, n), dtype=torch.long, device="meta")).sum()
        loss.backward()
    executed = E.exact_executed_flops_per_token(L7, n, recompute=True, schedule=schedule)
    assert counter.get_total_flops() == n * executed
    # = 6 (a + b N) + 2 x 29 runs x (202,375,168 + 8,192 N)
    a, b = macs_polynomial(L7, schedule)
    assert executed == 6 * (a + b * n) + 2 * 29 * (202_375_168 + 8_192 * n)


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-3-8b", "llama-3.2-1b", "tiny"])
@pytest.mark.parametrize("schedule", [None, [0, 1, 1, 0]])
def test_exact_counts_come_from_the_table(name, schedule):
    cfg, n = PRESETS[name], 96
    a, b = macs_polynomial(cfg, schedule)
    assert E.exact_forward_macs(cfg, n, schedule=schedule) == analyze(cfg, seqlen=n, schedule=schedule).macs\
        == a * n + b * n * n
    # training 6 (a + b N), inference 2 (a + b N) FLOPs per token
    assert E.exact_model_flops_per_token(cfg, n, schedule=schedule) == 6 * (a + b * n)
    assert E.exact_model_flops_per_token(cfg, n, train=False, schedule=schedule) == 2 * (a + b * n)
    assert E.exact_train_macs(cfg, n, 2, schedule) == 6 * (a * n + b * n * n)
    # recompute: one more forward of the layer runs alone (no embedding, final norm or head)
    head = cfg.dim * cfg.vocab_size
    runs = len(schedule) if schedule else cfg.n_layers
    assert E.exact_executed_flops_per_token(cfg, n, recompute=True, schedule=schedule) == 6 * (a + b * n) + 2 * (
        a - head + b * n)
    assert (a - head) % runs == 0 and b % runs == 0  # every layer run costs the same


def test_bad_flags():
    with pytest.raises(ValueError, match="train must be a bool"):
        E.exact_model_flops_per_token(L7, 16, train=1)
    with pytest.raises(ValueError, match="recompute must be a bool"):
        E.exact_executed_flops_per_token(L7, 16, recompute="yes")
    with pytest.raises(ValueError, match="out of range"):
        E.exact_forward_macs(L7, 16, schedule=[40])


# ---------------------------------------------------------------- each published formula
@pytest.fixture(params=["llama-2-7b", "llama-2-70b", "llama-3-8b", "llama-2-13b", "tiny"])
def cfg(request):
    return PRESETS[request.param]


@pytest.mark.parametrize("n", [1, 2048, 4096, 8192])
def test_torchtitan_is_exact_plus_six_norm_weights(cfg, n):
    # 6 * (all params - tok_embeddings) + 6 * L * H * (2 * hd) * T; all params - embedding = matmul + norms
    p = E.param_counts(cfg)
    assert E.torchtitan_flops_per_token(cfg, n) == 6 * (p["total"] - p["embedding"]) + 12 * cfg.n_layers * cfg.dim * n
    assert E.torchtitan_flops_per_token(cfg, n) - E.exact_model_flops_per_token(cfg, n) == 6 * (2 * cfg.n_layers + 1) * cfg.dim


def test_torchtitan_7b_by_hand():
    # 6 * (6,738,415,616 - 131,072,000) + 12 * 32 * 32 * 128 * 2048
    assert E.torchtitan_flops_per_token(L7, 2048) == 6 * 6_607_343_616 + 12 * 32 * 32 * 128 * 2048 == 42_865_287_168


TIED = ["llama-3.2-1b", "llama-3.2-3b"]


@pytest.mark.parametrize("name", TIED)
@pytest.mark.parametrize("n", [1, 2048, 8192])
def test_torchtitan_tied_keeps_the_shared_matrix(name, n):
    # torchtitan since 4ed3c536 ("Fix weight tying parameter accounting"): nparams_for_matmul = nparams when
    # enable_weight_tying, so the head's products stay; still exact + 6 x the norm weights
    cfg = PRESETS[name]
    p = E.param_counts(cfg)
    assert cfg.tie_word_embeddings and p["output"] == 0
    assert E.torchtitan_flops_per_token(cfg, n) == 6 * p["total"] + 12 * cfg.n_layers * cfg.dim * n
    assert E.torchtitan_flops_per_token(cfg, n) - E.exact_model_flops_per_token(cfg, n) == 6 * (2 * cfg.n_layers + 1) * cfg.dim
    # nanoGPT's N (all parameters, the shared matrix once) is then the same N, and so is PaLM's default:
    # the tied model's one vocabulary matrix does the head's product, so it is in N once
    assert E.nanogpt_flops_per_token(cfg, n) == E.torchtitan_flops_per_token(cfg, n)
    assert E.palm_flops_per_token(cfg, n) == 6 * p["total"] + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * n
    assert E.palm_flops_per_token(cfg, n) == E.torchtitan_flops_per_token(cfg, n)  # head_dim = dim // n_heads here


def test_torchtitan_tied_by_hand():
    # llama-3.2-1b: 6 * 1,235,814,400 + 6 * 16 layers * 32 heads * (2 * 2048 // 32) * 2048
    assert 6 * 1_235_814_400 + 6 * 16 * 32 * 128 * 2048 == 8_220_192_768 == E.torchtitan_flops_per_token(
        PRESETS["llama-3.2-1b"], 2048)
    # +0.0049 %: exact 8,219,787,264, the difference 6 * 33 norms * 2048 = 405,504
    assert E.exact_model_flops_per_token(PRESETS["llama-3.2-1b"], 2048) == 8_220_192_768 - 405_504
    # llama-3.2-3b: 6 * 3,212,749,824 + 6 * 28 * 24 * (2 * 3072 // 24) * 2048
    assert 6 * 3_212_749_824 + 6 * 28 * 24 * 256 * 2048 == 21_390_428_160 == E.torchtitan_flops_per_token(
        PRESETS["llama-3.2-3b"], 2048)


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-3-8b"] + TIED)
def test_torchtitan_transcribed_on_the_meta_model(name):
    # torchtitan/models/utils.py get_dense_model_nparams_and_flops (b5bcd76c, lines 436-457), run on our model:
    # nparams over model.parameters() (a tied matrix once), the nn.Embedding's parameters, no subtraction if tied
    cfg = PRESETS[name]
    model = Llama(cfg, device="meta")
    nparams = sum(p.numel() for p in model.parameters())
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    assert len(embeddings) == 1  # torchtitan sums its direct nn.Embedding children: one table
    nparams_embedding = sum(p.numel() for p in embeddings[0].parameters())
    nparams_for_matmul = nparams if cfg.tie_word_embeddings else nparams - nparams_embedding
    head_dims = 2 * (cfg.dim // cfg.n_heads)
    assert E.torchtitan_flops_per_token(cfg, 2048) == 6 * nparams_for_matmul + 6 * cfg.n_layers * cfg.n_heads * head_dims * 2048


@pytest.mark.parametrize("n", [1, 2048])
def test_palm_default_is_torchtitan_and_takes_any_n(cfg, n):
    assert E.palm_flops_per_token(cfg, n) == E.torchtitan_flops_per_token(cfg, n)
    assert E.palm_flops_per_token(cfg, n) == 6 * E.param_counts(cfg)["weights_in_a_product"] + 12 * cfg.n_layers * (
        cfg.n_heads * cfg.head_dim * n)
    # 6N + 12LHQT with N given
    assert E.palm_flops_per_token(cfg, n, n_params=1000) == 6000 + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * n


@pytest.mark.parametrize("n", [1, 2048, 8192])
def test_nanogpt_counts_every_parameter(cfg, n):
    # N = all params (Llama has no wpe to subtract): exact + 6 * (input embedding + norm weights)
    p = E.param_counts(cfg)
    assert E.nanogpt_flops_per_token(cfg, n) - E.exact_model_flops_per_token(cfg, n) == 6 * (p["embedding"] + p["norms"])


def test_nanogpt_7b_by_hand():
    # 6 * 6,738,415,616 + 12 * 32 * 32 * 128 * 2048 = 40,430,493,696 + 3,221,225,472
    assert E.nanogpt_flops_per_token(L7, 2048) == 43_651_719_168


@pytest.mark.parametrize("n", [1, 3, 2048, 8192])
def test_levanter_is_exact_plus_its_mask_term(cfg, n):
    # levanter's extra 3 * T^2 * H per layer ("mask"), / T per token, x3 for training
    assert E.levanter_flops_per_token(cfg, n) - E.exact_model_flops_per_token(cfg, n) == 9 * cfg.n_layers * cfg.n_heads * n


def test_levanter_transcribed_from_the_source_with_exact_division():
    # lm_flops_per_token for Llama-2-70B at 4096, its own statement order (/ done exactly):
    d, f, layers, kv, h, t, v = 8192, 28672, 80, 8, 64, 4096, 32000
    head_dim = Fraction(d, h)
    mlp = 2 * 3 * d * f * (1 + 0)
    qkv_proj = 2 * d * (h * head_dim + 2 * kv * head_dim)
    dense_proj = 2 * d * d
    seq_flops = 2 * t ** 2 * h * head_dim + 3 * t * t * h + 2 * t * t * head_dim * h
    per_token = layers * (mlp + qkv_proj + dense_proj + seq_flops / t) + 2 * d * v
    assert E.levanter_flops_per_token(L70, 4096) == 3 * per_token == 444_680_110_080


@pytest.mark.parametrize("n", [1, 2048, 4096, 8192])
def test_megatron_halves_attention(cfg, n):
    # causal /2 on the core-attention term: 6 * L * q * s instead of 12 * L * q * s
    exact = E.exact_model_flops_per_token(cfg, n)
    assert E.megatron_flops_per_token(cfg, n) == exact - 6 * cfg.n_layers * cfg.n_heads * cfg.head_dim * n
    assert E.megatron_pre2025_flops_per_token(cfg, n) == exact  # the dense form before 2025-03


@pytest.mark.parametrize("n", [2048, 4096, 8192])
def test_megatron_at_n_equals_exact_at_half_n(cfg, n):
    # 6 * (matmul + L*H*hd*N) = 6 * (matmul + 2*L*H*hd*(N/2))
    assert E.megatron_flops_per_token(cfg, n) == E.exact_model_flops_per_token(cfg, n // 2)


def test_llama_3_vocabulary_table_is_525m():
    assert E.param_counts(L3)["embedding"] == 128256 * 4096 == 525_336_576


def test_megatron_transcribed_from_the_source():
    # transformer_flops() for Llama-3-8B, batch 2, seq 8192, then per token (batch * seq tokens)
    h, layers, heads, groups, ffn, vpad, s, batch = 4096, 32, 32, 8, 14336, 128256, 8192, 2
    kv_channels = h // heads
    q, k = kv_channels * heads, kv_channels * groups
    self_attn = 3 * 2 * (h * (q + k + k + 0) + q * h)
    core = Fraction(3 * 2 * q, 2) * 2
    total = batch * s * (3 * 2 * h * (ffn * 3) * layers + self_attn * layers + 3 * 2 * h * vpad)\
        + batch * s * s * core * layers
    assert E.megatron_flops_per_token(L3, s) == total / (batch * s) == 51_470_401_536


def test_megatron_vocab_padding():
    # rounded up to a multiple of 128 * TP; Llama-2/3 vocabularies are already multiples of 128
    assert E.megatron_padded_vocab_size(32000) == 32000 and E.megatron_padded_vocab_size(128256) == 128256
    assert E.megatron_padded_vocab_size(32001) == 32128
    assert E.megatron_padded_vocab_size(32000, tensor_model_parallel_size=3) == 32256  # 84 * 384
    cfg = L7.replace(vocab_size=32001)
    # the padded 127 columns count: 6 * 4096 * 32128 logit FLOPs instead of 6 * 4096 * 32001
    assert (E.megatron_flops_per_token(cfg, 2048) - E.megatron_flops_per_token(cfg, 2048, padded_vocab_size=32001)
            == 6 * 4096 * 127)


def test_flash_attention_benchmark_formula():
    # f = 4 * batch * seqlen^2 * nheads * headdim // (2 if causal); bwd 2.5 f; fwd_bwd 3.5 f
    f = 4 * 2 * 1024 ** 2 * 16 * 64
    assert E.flash_attention_benchmark_flops(2, 1024, 64, 16, False, "fwd") == f
    assert E.flash_attention_benchmark_flops(2, 1024, 64, 16, True, "fwd") == f // 2
    assert E.flash_attention_benchmark_flops(2, 1024, 64, 16, False, "bwd") == 5 * f // 2
    assert E.flash_attention_benchmark_flops(2, 1024, 64, 16, True, "fwd_bwd") == 7 * (f // 2) // 2
    # odd product: 4*1*3^2*1*1 // 2 = 18, x3.5 = 63; with 1x1: 4 // 2 = 2, x2.5 = 5; 4*1*1*1*1 x 3.5 = 14
    assert E.flash_attention_benchmark_flops(1, 1, 1, 1, False, "fwd_bwd") == 14
    assert E.flash_attention_benchmark_flops(1, 3, 1, 1, True, "fwd_bwd") == 63


@pytest.mark.parametrize("n", [2048, 4096, 8192])
def test_flash_attention_model_estimate(cfg, n):
    # 6 * matmul params + L * 3.5 * (4 * T^2 * H * hd / 2) / T = exact - (12 - 7) * L * H * hd * T
    exact = E.exact_model_flops_per_token(cfg, n)
    assert E.flash_attention_flops_per_token(cfg, n) == exact - 5 * cfg.n_layers * cfg.n_heads * cfg.head_dim * n
    dense = E.flash_attention_flops_per_token(cfg, n, causal=False)  # 3.5 x dense = 14 L H hd T
    assert dense == exact + 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim * n


@pytest.mark.parametrize("n", [1, 2048, 8192])
def test_three_x_forward(cfg, n):
    assert E.three_x_forward_flops_per_token(cfg, n) == E.exact_model_flops_per_token(cfg, n)
    assert E.calflops_flops_per_token(cfg, n) == E.exact_model_flops_per_token(cfg, n)


def test_three_x_forward_with_the_nonmatmul_work_of_7b():
    # README: one 2048-token forward of Llama-2-7B has 38,000,660,480 non-matmul FLOPs (all four counters)
    got = E.three_x_forward_flops_per_token(L7, 2048, include_nonmatmul=True)
    assert got == E.exact_model_flops_per_token(L7, 2048) + 3 * 38_000_660_480 // 2048


def test_three_x_forward_nonmatmul_equals_the_analytic_counter():
    from counters.analytic import analyze

    for name, n in (("tiny", 9), ("llama-2-70b", 16)):
        nonmatmul = analyze(PRESETS[name], seqlen=n).total.count.nonmatmul_flops
        per_token = Fraction(3 * nonmatmul, n)
        assert E.three_x_forward_flops_per_token(PRESETS[name], n, True) == E.exact_model_flops_per_token(
            PRESETS[name], n) + per_token


@pytest.mark.parametrize("n", [1, 2048, 8192])
def test_forward_estimates_are_a_third_and_flash_attention_its_fwd_mode(cfg, n):
    assert list(E.FORWARD_ESTIMATES) == list(E.ESTIMATES)
    for name, fn in E.FORWARD_ESTIMATES.items():
        if name != "flash-attn":
            assert 3 * Fraction(fn(cfg, n)) == Fraction(E.ESTIMATES[name](cfg, n)), name
    assert E.FORWARD_ESTIMATES["3x-forward"](cfg, n) == E.exact_model_flops_per_token(cfg, n, train=False)
    # flash-attn forward: 2 x matmul params + L x (4 N^2 H hd / 2) / N = exact forward - 2 L H hd N
    assert E.FORWARD_ESTIMATES["flash-attn"](cfg, n) == E.exact_model_flops_per_token(
        cfg, n, train=False) - 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim * n
    assert E.flash_attention_flops_per_token(cfg, n, mode="bwd") + E.FORWARD_ESTIMATES["flash-attn"](
        cfg, n) == E.flash_attention_flops_per_token(cfg, n)


def test_explicit_head_dim_each_source_reads_its_own_way():
    # head_dim 96 with dim 2048 / 16 heads (= 128 derived): q_dim 1536. The exact count and PaLM and Megatron
    # use the real head size; torchtitan and nanoGPT read dim // n_heads = 128, levanter dim / n_heads
    cfg = LlamaConfig(dim=2048, n_layers=4, n_heads=16, n_kv_heads=4, vocab_size=1024, hidden_dim=5632, head_dim=96)
    n, L, H = 512, 4, 16
    p = E.param_counts(cfg)
    assert p["layers_matmul"] == 4 * (2048 * 1536 + 2 * 2048 * 384 + 1536 * 2048 + 3 * 2048 * 5632)
    exact = E.exact_model_flops_per_token(cfg, n)
    assert exact == 6 * p["matmul"] + 12 * L * H * 96 * n
    assert p["weights_in_a_product"] == p["non_embedding"]  # untied: the input table is the only one dropped
    assert E.palm_flops_per_token(cfg, n) == 6 * p["non_embedding"] + 12 * L * H * 96 * n
    assert E.torchtitan_flops_per_token(cfg, n) == 6 * p["non_embedding"] + 12 * L * H * 128 * n
    assert E.nanogpt_flops_per_token(cfg, n) == 6 * p["total"] + 12 * L * H * 128 * n
    assert E.megatron_pre2025_flops_per_token(cfg, n) == exact  # kv_channels = head_dim (vocab 1024: no padding)
    # levanter: qkv with hd = 128 (q 2048, k/v 512 each), dense_proj d*d, attention 4 T H hd + 3 T H
    lev = 3 * (L * (2 * 3 * 2048 * 5632 + 2 * 2048 * (2048 + 2 * 512) + 2 * 2048 * 2048 + 4 * n * H * 128
                    + 3 * n * H) + 2 * 2048 * 1024)
    assert E.levanter_flops_per_token(cfg, n) == lev


def test_as_config():
    assert E.as_config(L7) is L7

    class Shape:
        dim, n_layers, n_heads, vocab_size, hidden_dim = 64, 2, 4, 100, 176
        tie_word_embeddings = True

    cfg = E.as_config(Shape())
    assert isinstance(cfg, LlamaConfig) and cfg.n_kv_heads == 4 and cfg.head_dim == 16 and cfg.tie_word_embeddings
    # tied: one vocabulary matrix, used twice (lookup and head); the head is a product
    p = E.param_counts(Shape())
    assert p["output"] == 0 and p["embedding"] == 6400 and p["matmul"] == p["layers_matmul"] + 6400
    assert p["total"] == param_count(cfg)


def test_every_registered_estimate_is_exact_and_positive(cfg):
    for name, fn in E.ESTIMATES.items():
        value = fn(cfg, 2048)
        assert isinstance(value, (int, Fraction)) and not isinstance(value, bool), name
        assert value > 0, name


def test_relative_error_is_exact():
    assert E.relative_error(110, 100) == Fraction(1, 10)
    assert E.relative_error(E.megatron_flops_per_token(L7, 2048), E.exact_model_flops_per_token(L7, 2048)) == Fraction(
        -6 * 32 * 4096 * 2048, 42_863_689_728)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "2048", None])
def test_bad_seq_len(bad):
    for fn in E.ESTIMATES.values():
        with pytest.raises(ValueError, match="seq_len"):
            fn(L7, bad)
    with pytest.raises(ValueError, match="seq_len"):
        E.exact_train_macs(L7, bad)


def test_bad_config():
    class Shape:
        dim, n_layers, n_heads, n_kv_heads, vocab_size, hidden_dim = 100, 2, 3, 3, 10, 20

    with pytest.raises(ValueError, match="not divisible by n_heads"):
        E.torchtitan_flops_per_token(Shape(), 16)
    Shape.dim, Shape.n_kv_heads = 96, 2
    with pytest.raises(ValueError, match="n_kv_heads"):
        E.megatron_flops_per_token(Shape(), 16)
    with pytest.raises(ValueError, match="no attribute"):
        E.levanter_flops_per_token(object(), 16)
    Shape.n_kv_heads, Shape.vocab_size = 3, 0
    with pytest.raises(ValueError, match="vocab_size must be positive"):
        E.nanogpt_flops_per_token(Shape(), 16)


def test_duck_typed_config_and_mha_default():
    class Shape:  # no n_kv_heads: MHA
        dim, n_layers, n_heads, vocab_size, hidden_dim = 4096, 32, 32, 32000, 11008

    assert E.torchtitan_flops_per_token(Shape(), 2048) == E.torchtitan_flops_per_token(L7, 2048)


def test_bad_other_arguments():
    with pytest.raises(ValueError, match="batch"):
        E.exact_forward_macs(L7, 16, batch=0)
    with pytest.raises(ValueError, match="mode"):
        E.flash_attention_benchmark_flops(1, 16, 64, 8, True, "backward")
    with pytest.raises(ValueError, match="causal"):
        E.flash_attention_benchmark_flops(1, 16, 64, 8, 1)
    with pytest.raises(ValueError, match="n_params"):
        E.palm_flops_per_token(L7, 16, n_params=0)
    with pytest.raises(ValueError, match="padded_vocab_size"):
        E.megatron_flops_per_token(L7, 16, padded_vocab_size=-5)
    with pytest.raises(ValueError, match="exact count of 0"):
        E.relative_error(1, 0)
    for kwargs, word in ((dict(tokens_per_second=0), "tokens_per_second"), (dict(peak_flops=float("nan")), "peak_flops"),
                         (dict(peak_flops=float("inf")), "peak_flops"), (dict(devices=0), "devices"),
                         (dict(tokens_per_second="3000"), "tokens_per_second")):
        args = dict(flops_per_token=100, tokens_per_second=3000, peak_flops=989e12, devices=1) | kwargs
        with pytest.raises(ValueError, match=word):
            E.mfu(**args)
