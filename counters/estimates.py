"""Published training-FLOP formulas, each an exact pure function of the model shape and ``seq_len``,
and the exact count they are judged against.

Every estimate returns **FLOPs per token of one training step** (forward + backward, one optimizer
step's worth of work, batch-independent) as an exact ``int`` (or a ``Fraction`` where the source's
formula is not integral). They are what each source's MFU logging would use for a Llama model, read
from the source itself (repository, file, function, and the commit read are quoted in each docstring).
:data:`FORWARD_ESTIMATES` gives each one's forward share (inference).

The reference is :func:`exact_model_flops_per_token`, taken from the work table through
:mod:`counters.analytic` (the one source of every count; tied embeddings, explicit ``head_dim`` and
layer schedules are handled there): what the project's counters measure with the math attention
kernel and no activation recompute,

* forward MACs of one sequence of N tokens = ``a*N + b*N**2`` (:func:`counters.analytic.macs_polynomial`:
  ``a`` = the weights that enter a matrix product, ``b`` = dense QK^T and attention x V over the N x N
  scores of every query head),
* training MACs = 3 x forward MACs (each product once forward, twice backward: grad wrt input and
  wrt weight / other operand) - exactly what ``FlopCounterMode`` reports for transformers' eager
  ``LlamaForCausalLM`` forward + backward (tests/test_estimates.py),
* model FLOPs per token = 2 x training MACs / N = ``6 * (a + b*N)`` (training) or ``2 * (a + b*N)``
  (inference, forward only). Matrix products only: non-matmul work is not model FLOPs.

With activation checkpointing per decoder layer the backward reruns every layer's forward once:
:func:`exact_executed_flops_per_token` (hardware FLOPs, for HFU).

A config is a ``llama_ref.LlamaConfig``, or anything with ``dim``, ``n_layers``, ``n_heads``,
``vocab_size`` and ``hidden_dim`` (optionally ``n_kv_heads``, ``head_dim``, ``tie_word_embeddings``),
which :func:`as_config` turns into one.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Callable, Mapping, Union

from llama_ref.config import LlamaConfig
from llama_ref.schedule import ScheduleSpec
from llama_ref.shapes import param_count

from . import table as T
from .analytic import analyze


__all__ = [
    "ESTIMATES", "Exact", "FORWARD_ESTIMATES", "as_config", "calflops_flops_per_token", "exact_executed_flops_per_token",
    "exact_forward_macs", "exact_model_flops_per_token", "exact_train_macs", "flash_attention_benchmark_flops",
    "flash_attention_flops_per_token", "levanter_flops_per_token", "megatron_flops_per_token",
    "megatron_padded_vocab_size", "megatron_pre2025_flops_per_token", "mfu", "nanogpt_flops_per_token",
    "palm_flops_per_token", "param_counts", "relative_error", "three_x_forward_flops_per_token",
    "torchtitan_flops_per_token",
]

Exact = Union[int, Fraction]


def _int_or_fraction(x: Fraction) -> Exact:
    return int(x) if x.denominator == 1 else x


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def as_config(config: Any) -> LlamaConfig:
    """``config`` itself if it is a ``LlamaConfig``; otherwise a ``LlamaConfig`` built (and validated) from
    its attributes. ``n_kv_heads`` missing or None means MHA; ``head_dim`` missing or None means
    ``dim // n_heads``."""
    if isinstance(config, LlamaConfig):
        return config
    missing = [f for f in ("dim", "n_layers", "n_heads", "vocab_size", "hidden_dim") if not hasattr(config, f)]
    if missing:
        raise ValueError(f"config {config!r} has no attribute(s) {', '.join(missing)}")
    return LlamaConfig(dim=config.dim, n_layers=config.n_layers, n_heads=config.n_heads, vocab_size=config.vocab_size,
                       hidden_dim=config.hidden_dim, n_kv_heads=getattr(config, "n_kv_heads", None),
                       head_dim=getattr(config, "head_dim", None),
                       tie_word_embeddings=getattr(config, "tie_word_embeddings", False))


def _seq_len(seq_len: Any) -> int:
    return _positive_int("seq_len", seq_len)


# ---------------------------------------------------------------- parameters
def param_counts(config: Any) -> dict[str, int]:
    """Exact parameter counts from the work table's rows: ``embedding`` (tok_embeddings), ``output`` (the
    untied head; 0 when tied), ``layers_matmul`` (q, k, v, o, w1, w2, w3 of all layers), ``norms``
    (2 per layer + final), ``total``, and the "N"s the formulas use: ``non_embedding`` (total -
    embedding; for a tied config that removes the head's matrix too), ``weights_in_a_product`` (every
    parameter except an *untied* input table: total - embedding when untied, total when tied, as
    torchtitan's ``get_dense_model_nparams_and_flops`` and PaLM's tied model count; it includes the
    norm weights) and ``matmul`` (the weights that enter a matrix product per token: the layers' and
    the head's, tied or not; the ``a`` of :func:`counters.analytic.macs_polynomial`)."""
    c = as_config(config)
    rows = T.TOP_ROWS_BEFORE + T.TOP_ROWS_AFTER
    embedding = sum(r.params(c) for r in rows if r.kind is T.EMBEDDING)
    output = sum(r.params(c) for r in rows if r.kind is T.LINEAR)
    layers_matmul = c.n_layers * sum(r.params(c) for r in T.BLOCK_ROWS if r.kind is T.LINEAR)
    norms = sum(r.params(c) for r in rows if r.kind is T.RMSNORM) + c.n_layers * sum(
        r.params(c) for r in T.BLOCK_ROWS if r.kind is T.RMSNORM)
    total = param_count(c)  # the shape algebra's; the parts above are the table's breakdown of it
    if embedding + layers_matmul + norms + output != total:  # pragma: no cover - the table lost a parameter
        raise ArithmeticError(f"{c.name}: the table's parameter breakdown does not add up to param_count")
    # the head is a matrix product whether or not its matrix is shared with the embedding
    head = c.dim * c.vocab_size
    # a tied table is the head's matrix: it stays in N; an untied one is a lookup only
    weights_in_a_product = total if c.tie_word_embeddings else total - embedding
    return {"embedding": embedding, "output": output, "layers_matmul": layers_matmul, "norms": norms, "total": total,
            "non_embedding": total - embedding, "weights_in_a_product": weights_in_a_product,
            "matmul": layers_matmul + head}


# ---------------------------------------------------------------- the exact count
def exact_forward_macs(config: Any, seq_len: int, batch: int = 1, schedule: ScheduleSpec = None) -> int:
    """MACs of one forward of ``batch`` sequences of ``seq_len`` tokens, empty cache, math kernel, running
    the layers of ``schedule`` (default all): the work table's count (:func:`counters.analytic.analyze`)."""
    c, n = as_config(config), _seq_len(seq_len)
    return analyze(c, batch=_positive_int("batch", batch), seqlen=n, schedule=schedule).macs


def exact_train_macs(config: Any, seq_len: int, batch: int = 1, schedule: ScheduleSpec = None) -> int:
    """Forward + backward MACs, no recompute: 3 x forward (forward, grad wrt input, grad wrt weight)."""
    return 3 * exact_forward_macs(config, seq_len, batch, schedule)


def _per_token(macs_per_sequence: int, n: int) -> int:
    flops, rem = divmod(2 * macs_per_sequence, n)
    if rem:  # pragma: no cover - every row's MACs have a factor N (a*N + b*N^2): an identity, not user input
        raise ArithmeticError(f"{macs_per_sequence} MACs of {n} tokens are not a whole number of FLOPs per token")
    return flops


def exact_model_flops_per_token(config: Any, seq_len: int, *, train: bool = True, schedule: ScheduleSpec = None) -> int:
    """Model FLOPs per token of one sequence of ``seq_len`` tokens: ``2 * exact_train_macs / N`` =
    ``6 * (a + b*N)`` with ``train`` (forward + backward), ``2 * (a + b*N)`` without (forward only).
    Matmul FLOPs only (non-matmul work is not model FLOPs); an integer."""
    if not isinstance(train, bool):
        raise ValueError(f"train must be a bool, got {train!r}")
    n = _seq_len(seq_len)
    fwd = exact_forward_macs(config, n, schedule=schedule)
    return _per_token(3 * fwd if train else fwd, n)


def _layer_run_macs(config: Any, n: int, schedule: ScheduleSpec) -> int:
    """Forward MACs of the decoder-layer runs alone (the table's rows with a schedule position)."""
    return sum(r.macs for r in analyze(as_config(config), seqlen=n, schedule=schedule).rows if r.position is not None)


def exact_executed_flops_per_token(config: Any, seq_len: int, *, recompute: bool,
                                   schedule: ScheduleSpec = None) -> int:
    """Matmul FLOPs a training step really executes per token (hardware FLOPs, for HFU). Without
    ``recompute`` that is the model count; with it (activation checkpointing per decoder layer, each
    layer's whole forward recomputed once in the backward: ``set_checkpoint_early_stop(False)``) one more
    forward of every decoder-layer run - not of the embedding, the final norm or the output head."""
    if not isinstance(recompute, bool):
        raise ValueError(f"recompute must be a bool, got {recompute!r}")
    n = _seq_len(seq_len)
    macs = exact_train_macs(config, n, schedule=schedule)
    if recompute:
        macs += _layer_run_macs(config, n, schedule)
    return _per_token(macs, n)


# ---------------------------------------------------------------- published formulas
def palm_flops_per_token(config: Any, seq_len: int, n_params: int | None = None) -> int:
    """PaLM, Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with Pathways", Appendix B
    (model FLOPs utilization): ``6N + 12LHQT`` FLOPs per token, L layers, H heads, Q head dim, T seq_len.

    Assumptions: ``6N`` = every parameter in one matmul per token, x2 (multiply + add) x3 (forward,
    two backward products); ``12LHQT`` = QK^T and attention x V, dense (no causal halving), same x6;
    no rematerialisation (MFU excludes it by definition). GQA: H counts *query* heads (correct: the
    products are per query head; k/v sharing only shrinks N). SwiGLU and the untied head enter only
    through N. Non-matmul work (norms, softmax, RoPE) is not counted.

    What N counts is the caller's choice here (``n_params``). PaLM's own model ties its input and
    output embeddings (Section 2, "Shared Input-Output Embeddings"): its one vocabulary matrix does the
    output layer's product, and the lookup costs nothing, so ``6N`` over **all** its parameters, that
    matrix counted once, counts the head's product once and the lookup not at all. That is the reading
    the tied model implies, and the default here: ``param_counts(config)["weights_in_a_product"]`` =
    all parameters for a tied config (not minus the shared matrix: that would drop the head's
    products), all parameters minus the input table for an untied one (the table is then a lookup
    only; the untied head stays). It is torchtitan's current N (:func:`torchtitan_flops_per_token`),
    norm weights included. NOTE: the paper's Appendix B wording was not available to read here; the
    formula is quoted as nanoGPT's ``estimate_mfu`` and torchtitan's comments cite it.
    """
    c, t = as_config(config), _seq_len(seq_len)
    n = param_counts(c)["weights_in_a_product"] if n_params is None else _positive_int("n_params", n_params)
    return 6 * n + 12 * c.n_layers * c.n_heads * c.head_dim * t


def torchtitan_flops_per_token(config: Any, seq_len: int) -> int:
    """torchtitan (pytorch/torchtitan @ b5bcd76c, read 2026-12-06): ``torchtitan/models/utils.py``
    ``get_dense_model_nparams_and_flops`` (lines 412-459), called by ``models/llama3/model.py``
    ``get_nparams_and_flops`` (lines 82-92) with ``head_dims = 2 * (dim // n_heads)`` and
    ``enable_weight_tying``:
    ``6 * nparams_for_matmul + 6 * n_layers * n_heads * head_dims * seq_len``, where
    ``nparams_for_matmul = nparams if enable_weight_tying else nparams - nparams_embedding``.

    ``nparams`` = ``sum(p.numel() for p in model.parameters())`` (norm weights included; a tied matrix
    listed once); ``nparams_embedding`` = parameters of ``nn.Embedding`` children only (the input
    table). Untied: the table is dropped and the ``output`` head stays, as it is a matmul. Tied: nothing
    is dropped, since the shared matrix does the head's product - the fix "Fix weight tying parameter
    accounting" (4ed3c536, 2026-05-08, #3225); before it the tied table was subtracted too, losing the
    head's products. Attention dense (comment: "we follow the convention and do not account for
    sparsity in causal attention"), flash-attention's backward recompute not counted. GQA: n_heads =
    query heads. Older torchtitan (``tools/utils.py`` ``get_num_flop_per_token``, Feb 2025) had the
    untied form: ``6 * num_params + 12 * l * h * q * t`` with ``get_num_params(model,
    exclude_embedding=True)`` subtracting ``tok_embeddings``.
    Differs from the exact count by 6 x the norm weights ((2L+1) * dim) only, tied or not.
    """
    c, t = as_config(config), _seq_len(seq_len)
    head_dims = 2 * (c.dim // c.n_heads)  # torchtitan's head size is dim // n_heads, not an explicit head_dim
    return 6 * param_counts(c)["weights_in_a_product"] + 6 * c.n_layers * c.n_heads * head_dims * t


def nanogpt_flops_per_token(config: Any, seq_len: int) -> int:
    """nanoGPT (karpathy/nanoGPT @ 3adf61e1, read 2026-12-06): ``model.py`` ``GPT.estimate_mfu`` (lines
    289-303): ``N = self.get_num_params()``; ``flops_per_token = 6*N + 12*L*H*Q*T`` with T = ``block_size``;
    ``get_num_params`` lines 150-160.

    ``get_num_params(non_embedding=True)`` (the default) subtracts only the *position* embedding
    ``wpe``; the token embedding stays because GPT-2 ties it to the output head. Llama has no learned
    position embedding and an untied head, so applied to Llama N = **all** parameters: the input
    embedding (a lookup, no matmul) is counted as if it were a matmul, and norm weights too. Attention
    dense; no recompute; T is the training context (= seq_len here).
    """
    c, t = as_config(config), _seq_len(seq_len)
    q = c.dim // c.n_heads  # nanoGPT: Q = n_embd // n_head
    return 6 * param_counts(c)["total"] + 12 * c.n_layers * c.n_heads * q * t


def levanter_flops_per_token(config: Any, seq_len: int) -> int:
    """levanter (stanford-crfm/levanter @ 9263f81e, read 2026-12-06): ``src/levanter/utils/flop_utils.py``
    ``lm_flops_per_token(hidden_dim, intermediate_dim, num_layers, num_kv_heads, num_heads, seq_len,
    vocab_size, glu=True)`` (lines 10-38; ``models/llama.py`` ``LlamaConfig.flops_per_token``, lines
    187-197), multiplied by 3 in ``main/train_lm.py`` line 198 (``flops_per_example = 3 *
    flops_per_token * Pos.size``).

    Forward per token: ``num_layers * (mlp + qkv_proj + dense_proj + attn) + lm_head`` with
    mlp = 2*3*d*F (GLU: 3 matrices), qkv_proj = 2*d*(H*hd + 2*KV*hd) (GQA handled), dense_proj = 2*d*d,
    attn = (2*T^2*H*hd [QK^T] + 3*T^2*H ["mask"] + 2*T^2*hd*H [x V]) / T, lm_head = 2*d*V. Attention is
    **dense** ("assume full attention map like megatron-lm"): levanter does *not* halve for causality.
    Embedding lookup not counted. The extra ``3*T*H`` per layer (softmax/mask work, x3 for training)
    is the only difference from the exact count: ``+ 9 * n_layers * n_heads * seq_len``.
    (levanter computes head_dim = hidden_dim / num_heads as a float, and ``dense_proj`` assumes
    n_heads * head_dim = hidden_dim: with an explicit head_dim of another width its figure is off by more.)
    """
    c, t = as_config(config), _seq_len(seq_len)
    d, h = c.dim, c.n_heads
    hd = Fraction(d, h)  # levanter: head_dim = hidden_dim / num_heads (a float there, exact here)
    mlp = 2 * 3 * d * c.hidden_dim
    qkv_proj = 2 * d * (h * hd + 2 * c.n_kv_heads * hd)
    dense_proj = 2 * d * d
    seq_flops = 2 * t * t * h * hd + 3 * t * t * h + 2 * t * t * hd * h
    attn = Fraction(seq_flops, t)
    lm_head = 2 * d * c.vocab_size
    return _int_or_fraction(3 * (c.n_layers * (mlp + qkv_proj + dense_proj + attn) + lm_head))


def megatron_padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128,
                               tensor_model_parallel_size: int = 1) -> int:
    """Megatron-LM (@ d98e8a64, read 2026-12-06) ``megatron/core/tokenizers/utils/build_tokenizer.py``
    ``vocab_size_with_padding`` (lines 133-146; the same in ``megatron/training/vocab_utils.py``
    ``calculate_padded_vocab_size``, lines 9-59): round up to a multiple of
    ``make_vocab_size_divisible_by * tensor_model_parallel_size`` (defaults 128, ``arguments.py`` line
    2441, and 1). Llama-2's 32000 and Llama-3's 128256 are already multiples of 128. (Older Megatron had
    it as ``megatron/training/tokenizer`` ``_vocab_size_with_padding``.)"""
    multiple = _positive_int("make_vocab_size_divisible_by", make_vocab_size_divisible_by) * _positive_int(
        "tensor_model_parallel_size", tensor_model_parallel_size)
    v = _positive_int("vocab_size", vocab_size)
    return -(-v // multiple) * multiple


def megatron_flops_per_token(config: Any, seq_len: int, padded_vocab_size: int | None = None) -> Exact:
    """Megatron-LM (NVIDIA/Megatron-LM @ d98e8a64, read 2026-12-06): ``megatron/training/training.py``
    ``num_floating_point_operations(args, batch_size, ...)`` (line 802), inner ``transformer_flops()``
    (lines 1009-1311; GQA attention terms 1139-1170, totals 1255-1310), dense layers, standard (GQA)
    attention, no MoE/MTP, BSHD (no packed sequences), divided by ``batch_size * seq_length`` tokens:

    ``3 * 2 * [ L * (d*(q + 2*kv) + q*d) + L * 3*d*F + d*V_pad ] + 3 * 2 * q / 2 * 2 * L * s``

    (forward_backward_expansion_factor 3, fma_expansion_factor 2, ffn_expansion_factor 3 for SwiGLU,
    q = kv_channels * num_attention_heads, kv = kv_channels * num_query_groups, V_pad the padded
    vocabulary). Core attention is **causal-halved** ("/ 2  # causal mask (only half of the mask is
    non-zero)"), since commit 8873b55d (2025-03-06, "Fixes in number of floating-point operation
    estimates for MoE and attention layer"); see :func:`megatron_pre2025_flops_per_token` for the dense
    form before it. No activation-recompute factor in the code (the 2021 paper's 4x is not used);
    embedding lookup and norms not counted; GQA and SwiGLU handled; logits counted.
    """
    c, t = as_config(config), _seq_len(seq_len)
    v = megatron_padded_vocab_size(c.vocab_size) if padded_vocab_size is None else _positive_int(
        "padded_vocab_size", padded_vocab_size)
    q, kv, d = c.q_dim, c.kv_dim, c.dim  # kv_channels = head_dim (explicit or dim // n_heads)
    fb, fma = 3, 2
    self_attn = fb * fma * (d * (q + kv + kv) + q * d)
    core = Fraction(fb * fma * q, 2) * 2  # per token per layer, times s
    mlp = fb * fma * d * (c.hidden_dim * 3)
    logit = fb * fma * d * v
    return _int_or_fraction(c.n_layers * (mlp + self_attn) + logit + core * c.n_layers * t)


def megatron_pre2025_flops_per_token(config: Any, seq_len: int, padded_vocab_size: int | None = None) -> Exact:
    """Megatron-LM before 2025-03 (e.g. @ 37de40c2, 2024-07-17, read 2026-12-06): ``megatron/training/training.py``
    ``num_floating_point_operations`` (lines 73-118), per token (divided by ``batch_size * seq_length``):

    ``12 * L * d^2 * ( (1 + g/n + s/d) * q/d + (F/d) * 3/2 + V_pad / (2*L*d) )``

    (expansion_factor = 3 x 2 x 2: forward/wgrad/dgrad, two stacked GEMMs, FMA; gated_linear_multiplier
    3/2 for SwiGLU; g = num_query_groups, n = num_attention_heads). Dense attention. Expanded, it is
    12*L*d*q + 12*L*d*kv + 18*L*d*F + 6*d*V + 12*L*q*s: exactly the project's model count (norms and
    the embedding lookup excluded), computed there in floating point.
    """
    c, t = as_config(config), _seq_len(seq_len)
    v = megatron_padded_vocab_size(c.vocab_size) if padded_vocab_size is None else _positive_int(
        "padded_vocab_size", padded_vocab_size)
    d, L = c.dim, c.n_layers
    q_ratio = Fraction(c.q_dim, d)
    attention = (1 + Fraction(c.n_kv_heads, c.n_heads) + Fraction(t, d)) * q_ratio
    mlp = Fraction(c.hidden_dim, d) * Fraction(3, 2)
    logit = Fraction(v, 2 * L * d)
    return _int_or_fraction(12 * L * d * d * (attention + mlp + logit))


_FLASH_MODES = ("fwd", "bwd", "fwd_bwd")


def flash_attention_benchmark_flops(batch: int, seqlen: int, headdim: int, nheads: int, causal: bool,
                                    mode: str = "fwd") -> Exact:
    """flash-attention (Dao-AILab/flash-attention @ 0251105a, read 2026-12-06):
    ``benchmarks/benchmark_flash_attention.py`` ``flops(batch, seqlen, headdim, nheads, causal, mode="fwd")``
    (lines 27-30), attention only, one layer:
    ``f = 4 * batch * seqlen**2 * nheads * headdim // (2 if causal else 1)``; ``fwd``: f, ``bwd``: 2.5 f,
    ``fwd_bwd``: 3.5 f. The 2.5 is the flash backward's five products (QK^T recomputed, dV, dP, dQ, dK)
    against the forward's two: **recompute included** (a hardware-FLOP count, not model FLOPs);
    ``causal`` halves (the ``//`` floors; exact for even products)."""
    for name, value in (("batch", batch), ("seqlen", seqlen), ("headdim", headdim), ("nheads", nheads)):
        _positive_int(name, value)
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    if mode not in _FLASH_MODES:
        raise ValueError(f"mode must be one of {_FLASH_MODES}, got {mode!r}")
    f = 4 * batch * seqlen ** 2 * nheads * headdim // (2 if causal else 1)
    factor = {"fwd": Fraction(1), "bwd": Fraction(5, 2), "fwd_bwd": Fraction(7, 2)}[mode]
    return _int_or_fraction(factor * f)


def flash_attention_flops_per_token(config: Any, seq_len: int, causal: bool = True, mode: str = "fwd_bwd") -> Exact:
    """A whole-model estimate in the flash-attention benchmarks' convention: the exact matmul-weight
    part (``6 * matmul params``, as every estimate here has it) plus, per layer, the benchmark's
    ``flops(1, seq_len, head_dim, n_heads, causal, mode="fwd_bwd")`` / seq_len, i.e. 3.5 x the causal-
    halved forward attention = ``7 * L * H * hd * T`` instead of the model count's ``12 * L * H * hd * T``.
    The benchmark file itself times attention only; this composition is ours, to put its attention
    convention (causal halving, recompute counted) on the same per-token scale as the others.
    ``mode="fwd"`` is the forward alone (``2 * matmul params`` + the benchmark's forward ``f``)."""
    c, t = as_config(config), _seq_len(seq_len)
    attention = flash_attention_benchmark_flops(1, t, c.head_dim, c.n_heads, causal, mode)
    linear = {"fwd": 2, "bwd": 4, "fwd_bwd": 6}[mode]  # a weight's product: once forward, twice backward
    return _int_or_fraction(linear * param_counts(c)["matmul"] + c.n_layers * Fraction(attention) / t)


def three_x_forward_flops_per_token(config: Any, seq_len: int, include_nonmatmul: bool = False) -> int:
    """"3 x forward" (calflops' ``include_backPropagation=True``: ``flops * (1 + compute_bp_factor)`` with
    ``compute_bp_factor=2.0``, MrYxJ/calculate-flops.pytorch @ 29ca5844, read 2026-12-06,
    ``calflops/flops_counter.py`` ``calculate_flops``, lines 25-32 and 182-184): 3 x the forward FLOPs
    per token. With the forward's matmul FLOPs only it *is* the exact model count (the backward does
    exactly 2 x the forward's products). With
    ``include_nonmatmul`` the forward's non-matmul FLOPs (this project's conventions,
    :mod:`counters.table`: RMSNorm, RoPE, scale/mask/softmax, SwiGLU gate, residual adds) are
    tripled too - the "3 x total forward" that a counter reporting all forward FLOPs gives."""
    c, t = as_config(config), _seq_len(seq_len)
    flops = exact_model_flops_per_token(c, t)
    if not include_nonmatmul:
        return flops
    nonmatmul = analyze(c, seqlen=t).nonmatmul_flops  # the work table's conventions, one forward
    per_token, rem = divmod(3 * nonmatmul, t)
    if rem:
        return _int_or_fraction(flops + Fraction(3 * nonmatmul, t))  # pragma: no cover - every term has a factor N
    return flops + per_token


def calflops_flops_per_token(config: Any, seq_len: int) -> int:
    """calflops' training figure for a forward that counted every matmul as 2 FLOPs per MAC:
    :func:`three_x_forward_flops_per_token` (matmul part). calflops' own forward also counts some
    element-wise functionals (``F.silu``, ``F.softmax``: 1 FLOP per element) but not others (tensor
    ``*``/``+`` operators, ``torch.rsqrt``): its exact forward for a given transformers version is not
    modelled here (it was not run: no calflops in the environment)."""
    return three_x_forward_flops_per_token(config, seq_len)


# ---------------------------------------------------------------- registry and helpers
#: name -> estimate(config, seq_len): the figures ``llama-ref mfu`` prints beside the exact MFU.
ESTIMATES: Mapping[str, Callable[[Any, int], Exact]] = {
    "palm": palm_flops_per_token,
    "torchtitan": torchtitan_flops_per_token,
    "nanogpt": nanogpt_flops_per_token,
    "levanter": levanter_flops_per_token,
    "megatron": megatron_flops_per_token,
    "megatron-pre2025": megatron_pre2025_flops_per_token,
    "flash-attn": flash_attention_flops_per_token,
    "3x-forward": three_x_forward_flops_per_token,
    "3x-forward-all": lambda config, seq_len: three_x_forward_flops_per_token(config, seq_len, True),
}


def _forward_share(estimate: Callable[[Any, int], Exact]) -> Callable[[Any, int], Exact]:
    def forward(config: Any, seq_len: int) -> Exact:
        return _int_or_fraction(Fraction(estimate(config, seq_len)) / 3)
    return forward


#: name -> the forward share of each estimate (inference: one forward per token). Every formula above
#: is 3 x a forward count (PaLM's and nanoGPT's 6 = 2 x 3, levanter's and Megatron's explicit factor 3,
#: "3 x forward"), so its forward share is a third of it; flash-attn's forward is its ``mode="fwd"``.
FORWARD_ESTIMATES: Mapping[str, Callable[[Any, int], Exact]] = {
    name: (lambda config, seq_len: flash_attention_flops_per_token(config, seq_len, mode="fwd"))
    if name == "flash-attn" else _forward_share(fn)
    for name, fn in ESTIMATES.items()
}


def relative_error(estimate: Exact, exact: Exact) -> Fraction:
    """``(estimate - exact) / exact`` as an exact fraction (positive: the estimate is too high)."""
    if exact == 0:
        raise ValueError("relative error against an exact count of 0 is undefined")
    return (Fraction(estimate) - Fraction(exact)) / Fraction(exact)


def mfu(flops_per_token: Exact, tokens_per_second: Union[int, float, Fraction], peak_flops: Union[int, float, Fraction],
        devices: int = 1) -> Fraction:
    """Model FLOPs utilization: ``tokens_per_second * flops_per_token / (peak_flops * devices)``, exact
    (floats are converted exactly). ``tokens_per_second`` is the whole job's throughput over ``devices``."""
    def _positive(name: str, x: Any) -> Fraction:
        if isinstance(x, bool) or not isinstance(x, (int, float, Fraction)):
            raise ValueError(f"{name} must be a number, got {x!r}")
        if not x > 0 or x != x or x == float("inf"):
            raise ValueError(f"{name} must be a positive finite number, got {x!r}")
        return Fraction(x)

    devices = _positive_int("devices", devices)
    return (_positive("tokens_per_second", tokens_per_second) * _positive("flops_per_token", flops_per_token)
            / (_positive("peak_flops", peak_flops) * devices))
