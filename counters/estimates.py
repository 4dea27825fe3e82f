"""Published training-FLOP formulas, each an exact pure function of the model shape and ``seq_len``.

Every estimate returns **FLOPs per token of one training step** (forward + backward, one optimizer
step's worth of work, batch-independent) as an exact ``int`` (or a ``Fraction`` where the source's
formula is not integral). They are what each source's MFU logging would use for a Llama model, read
from the source itself (repository, file, function, and the commit read are quoted in each docstring).

The reference they are compared with is :func:`exact_model_flops_per_token`: what the project's
counters measure with the math attention kernel and no activation recompute,

* forward MACs of one sequence of N tokens
  ``= n_layers * (dim*q_dim + 2*dim*kv_dim + q_dim*dim + 3*dim*hidden_dim) * N + dim*vocab*N
  + n_layers * 2 * n_heads * head_dim * N**2`` (dense attention over the N x N scores of every query head),
* training MACs = 3 x forward MACs (each product once forward, twice backward: grad wrt input and
  wrt weight / other operand) - exactly what ``FlopCounterMode`` reports for transformers' eager
  ``LlamaForCausalLM`` forward + backward (notes/backward_ops.md),
* model FLOPs per token = 2 x training MACs / N.

Nothing here imports torch: a config is anything with ``dim``, ``n_layers``, ``n_heads``,
``n_kv_heads``, ``vocab_size`` and ``hidden_dim`` (``llama_ref.LlamaConfig`` or a duck-typed object).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Mapping, Union

from llama_ref.config import LlamaConfig

from .analytic import analyze


__all__ = [
    "ESTIMATES", "Exact", "ModelShape", "calflops_flops_per_token", "exact_forward_macs",
    "exact_model_flops_per_token", "exact_train_macs", "flash_attention_benchmark_flops",
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


@dataclass(frozen=True)
class ModelShape:
    """The shape numbers the formulas need, validated. ``n_kv_heads=None`` means MHA; ``head_dim=None``
    means ``dim // n_heads``."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    hidden_dim: int
    head_dim: int
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "head_dim"):
            _positive_int(field, getattr(self, field))
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")

    @classmethod
    def of(cls, config: Any) -> "ModelShape":
        """From a ``LlamaConfig`` (or anything with the same attribute names)."""
        if isinstance(config, ModelShape):
            return config
        missing = [f for f in ("dim", "n_layers", "n_heads", "vocab_size", "hidden_dim") if not hasattr(config, f)]
        if missing:
            raise ValueError(f"config {config!r} has no attribute(s) {', '.join(missing)}")
        n_kv = getattr(config, "n_kv_heads", None)
        head_dim = getattr(config, "head_dim", None)
        if head_dim is None:
            _positive_int("n_heads", config.n_heads)
            if config.dim % config.n_heads:
                raise ValueError(f"dim={config.dim} is not divisible by n_heads={config.n_heads}")
            head_dim = config.dim // config.n_heads
        return cls(config.dim, config.n_layers, config.n_heads, config.n_heads if n_kv is None else n_kv,
                   config.vocab_size, config.hidden_dim, head_dim, bool(getattr(config, "tie_word_embeddings", False)))

    @property
    def q_dim(self) -> int:
        """Width of the q projection and of the attention output: n_heads * head_dim."""
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


def _seq_len(seq_len: Any) -> int:
    return _positive_int("seq_len", seq_len)


# ---------------------------------------------------------------- parameters
def param_counts(config: Any) -> dict[str, int]:
    """Exact parameter counts: ``embedding`` (tok_embeddings), ``output`` (the untied head),
    ``layers_matmul`` (q, k, v, o, w1, w2, w3 of all layers), ``norms`` (2 per layer + final),
    ``total``, and the two "N"s the formulas use: ``non_embedding`` (total - embedding: torchtitan)
    and ``matmul`` (layers_matmul + output: the weights that enter a matrix product)."""
    s = ModelShape.of(config)
    layers_matmul = s.n_layers * (s.dim * s.q_dim + 2 * s.dim * s.kv_dim + s.q_dim * s.dim + 3 * s.dim * s.hidden_dim)
    embedding = head = s.vocab_size * s.dim
    output = 0 if s.tie_word_embeddings else head  # a tied head is the embedding matrix itself
    norms = (2 * s.n_layers + 1) * s.dim
    total = embedding + layers_matmul + norms + output
    return {
        "embedding": embedding, "output": output, "layers_matmul": layers_matmul, "norms": norms, "total": total,
        # the head is a matrix product whether or not its matrix is shared with the embedding
        "non_embedding": total - embedding, "matmul": layers_matmul + head,
    }


# ---------------------------------------------------------------- the exact count
def exact_forward_macs(config: Any, seq_len: int, batch: int = 1) -> int:
    """MACs of one forward of ``batch`` sequences of ``seq_len`` tokens, empty cache, math kernel:
    every matmul weight once per token, plus QK^T and attention x V dense over N x N per query head."""
    s, n = ModelShape.of(config), _seq_len(seq_len)
    batch = _positive_int("batch", batch)
    per_token = param_counts(s)["matmul"]
    attention = s.n_layers * 2 * s.n_heads * s.head_dim * n * n
    return batch * (per_token * n + attention)


def exact_train_macs(config: Any, seq_len: int, batch: int = 1) -> int:
    """Forward + backward MACs, no recompute: 3 x forward (forward, grad wrt input, grad wrt weight)."""
    return 3 * exact_forward_macs(config, seq_len, batch)


def exact_model_flops_per_token(config: Any, seq_len: int) -> int:
    """Model FLOPs per trained token: ``2 * exact_train_macs / N`` = ``6 * (matmul params + 2 * n_layers *
    n_heads * head_dim * N)``, an integer. Matmul FLOPs only (non-matmul work is not model FLOPs)."""
    n = _seq_len(seq_len)
    flops, rem = divmod(2 * exact_train_macs(config, n), n)
    assert rem == 0  # a*N + b*N^2 is divisible by N: not user input, an identity
    return flops


# ---------------------------------------------------------------- published formulas
def palm_flops_per_token(config: Any, seq_len: int, n_params: int | None = None) -> int:
    """PaLM, Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with Pathways", Appendix B
    (model FLOPs utilization): ``6N + 12LHQT`` FLOPs per token, L layers, H heads, Q head dim, T seq_len.

    Assumptions: ``6N`` = every parameter in one matmul per token, x2 (multiply + add) x3 (forward,
    two backward products); ``12LHQT`` = QK^T and attention x V, dense (no causal halving), same x6;
    no rematerialisation (MFU excludes it by definition). GQA: H counts *query* heads (correct: the
    products are per query head; k/v sharing only shrinks N). SwiGLU and the untied head enter only
    through N. Non-matmul work (norms, softmax, RoPE) is not counted.

    What N counts is the caller's choice here (``n_params``); PaLM's own model ties input and output
    embeddings, so it has one vocabulary matrix, used as a matmul. The default is the reading both
    torchtitan and this project use for an untied Llama: all parameters except the input embedding
    (:func:`torchtitan_flops_per_token`). NOTE: the paper's wording was not available to read here;
    the formula is quoted as nanoGPT's ``estimate_mfu`` and torchtitan's comments cite it.
    """
    s, t = ModelShape.of(config), _seq_len(seq_len)
    n = param_counts(s)["non_embedding"] if n_params is None else _positive_int("n_params", n_params)
    return 6 * n + 12 * s.n_layers * s.n_heads * s.head_dim * t


def torchtitan_flops_per_token(config: Any, seq_len: int) -> int:
    """torchtitan (pytorch/torchtitan @ b5bcd76c, 2026-08): ``torchtitan/models/utils.py``
    ``get_dense_model_nparams_and_flops`` (called by ``models/llama3/model.py``
    ``get_nparams_and_flops`` with ``head_dims = 2 * (dim // n_heads)``):
    ``6 * (nparams - nparams_embedding) + 6 * n_layers * n_heads * head_dims * seq_len``.

    ``nparams`` = ``sum(p.numel() for p in model.parameters())`` (norm weights included);
    ``nparams_embedding`` = parameters of ``nn.Embedding`` children only (the input embedding; the
    untied ``output`` head stays in N, as it is a matmul). Attention dense (comment: "we follow the
    convention and do not account for sparsity in causal attention"), flash-attention's backward
    recompute not counted. GQA: n_heads = query heads. Older torchtitan (``tools/utils.py``
    ``get_num_flop_per_token``, Feb 2025) is the same: ``6 * num_params + 12 * l * h * q * t`` with
    ``get_num_params(model, exclude_embedding=True)`` subtracting ``tok_embeddings``.
    Differs from the exact count by 6 x the norm weights ((2L+1) * dim) only.
    """
    s, t = ModelShape.of(config), _seq_len(seq_len)
    head_dims = 2 * s.head_dim
    return 6 * param_counts(s)["non_embedding"] + 6 * s.n_layers * s.n_heads * head_dims * t


def nanogpt_flops_per_token(config: Any, seq_len: int) -> int:
    """nanoGPT (karpathy/nanoGPT @ 3adf61e1): ``model.py`` ``GPT.estimate_mfu``:
    ``N = self.get_num_params()``; ``flops_per_token = 6*N + 12*L*H*Q*T`` with T = ``block_size``.

    ``get_num_params(non_embedding=True)`` (the default) subtracts only the *position* embedding
    ``wpe``; the token embedding stays because GPT-2 ties it to the output head. Llama has no learned
    position embedding and an untied head, so applied to Llama N = **all** parameters: the input
    embedding (a lookup, no matmul) is counted as if it were a matmul, and norm weights too. Attention
    dense; no recompute; T is the training context (= seq_len here).
    """
    s, t = ModelShape.of(config), _seq_len(seq_len)
    return 6 * param_counts(s)["total"] + 12 * s.n_layers * s.n_heads * s.head_dim * t


def levanter_flops_per_token(config: Any, seq_len: int) -> int:
    """levanter (stanford-crfm/levanter @ 9263f81e): ``src/levanter/utils/flop_utils.py``
    ``lm_flops_per_token(hidden_dim, intermediate_dim, num_layers, num_kv_heads, num_heads, seq_len,
    vocab_size, glu=True)`` (``models/llama.py`` ``LlamaConfig.flops_per_token``), multiplied by 3 in
    ``main/train_lm.py`` (``flops_per_example = 3 * flops_per_token * Pos.size``).

    Forward per token: ``num_layers * (mlp + qkv_proj + dense_proj + attn) + lm_head`` with
    mlp = 2*3*d*F (GLU: 3 matrices), qkv_proj = 2*d*(H*hd + 2*KV*hd) (GQA handled), dense_proj = 2*d*d,
    attn = (2*T^2*H*hd [QK^T] + 3*T^2*H ["mask"] + 2*T^2*hd*H [x V]) / T, lm_head = 2*d*V. Attention is
    **dense** ("assume full attention map like megatron-lm"): levanter does *not* halve for causality.
    Embedding lookup not counted. The extra ``3*T*H`` per layer (softmax/mask work, x3 for training)
    is the only difference from the exact count: ``+ 9 * n_layers * n_heads * seq_len``.
    (levanter computes head_dim = hidden_dim / num_heads as a float; exact here since dim % n_heads == 0.)
    """
    s, t = ModelShape.of(config), _seq_len(seq_len)
    d, hd, h = s.dim, s.head_dim, s.n_heads
    mlp = 2 * 3 * d * s.hidden_dim
    qkv_proj = 2 * d * (h * hd + 2 * s.n_kv_heads * hd)
    dense_proj = 2 * d * d
    seq_flops = 2 * t * t * h * hd + 3 * t * t * h + 2 * t * t * hd * h
    attn = Fraction(seq_flops, t)
    lm_head = 2 * d * s.vocab_size
    return _int_or_fraction(3 * (s.n_layers * (mlp + qkv_proj + dense_proj + attn) + lm_head))


def megatron_padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128,
                               tensor_model_parallel_size: int = 1) -> int:
    """Megatron-LM ``megatron/training/tokenizer`` ``_vocab_size_with_padding``: round up to a multiple of
    ``make_vocab_size_divisible_by * tensor_model_parallel_size`` (defaults 128 and 1). Llama-2's
    32000 and Llama-3's 128256 are already multiples of 128."""
    multiple = _positive_int("make_vocab_size_divisible_by", make_vocab_size_divisible_by) * _positive_int(
        "tensor_model_parallel_size", tensor_model_parallel_size)
    v = _positive_int("vocab_size", vocab_size)
    return -(-v // multiple) * multiple


def megatron_flops_per_token(config: Any, seq_len: int, padded_vocab_size: int | None = None) -> Exact:
    """Megatron-LM (NVIDIA/Megatron-LM @ d98e8a64, 2026-08): ``megatron/training/training.py``
    ``num_floating_point_operations(args, batch_size)``, inner ``transformer_flops()``, dense layers,
    standard (GQA) attention, no MoE/MTP, divided by ``batch_size * seq_length`` tokens:

    ``3 * 2 * [ L * (d*(q + 2*kv) + q*d) + L * 3*d*F + d*V_pad ] + 3 * 2 * q / 2 * 2 * L * s``

    (forward_backward_expansion_factor 3, fma_expansion_factor 2, ffn_expansion_factor 3 for SwiGLU,
    q = kv_channels * num_attention_heads, kv = kv_channels * num_query_groups, V_pad the padded
    vocabulary). Core attention is **causal-halved** ("/ 2  # causal mask (only half of the mask is
    non-zero)"), since commit 8873b55d (2025-03-06, "Fixes in number of floating-point operation
    estimates for MoE and attention layer"); see :func:`megatron_pre2025_flops_per_token` for the dense
    form before it. No activation-recompute factor in the code (the 2021 paper's 4x is not used);
    embedding lookup and norms not counted; GQA and SwiGLU handled; logits counted.
    """
    s, t = ModelShape.of(config), _seq_len(seq_len)
    v = megatron_padded_vocab_size(s.vocab_size) if padded_vocab_size is None else _positive_int(
        "padded_vocab_size", padded_vocab_size)
    q, kv, d = s.q_dim, s.kv_dim, s.dim
    fb, fma = 3, 2
    self_attn = fb * fma * (d * (q + kv + kv) + q * d)
    core = Fraction(fb * fma * q, 2) * 2  # per token per layer, times s
    mlp = fb * fma * d * (s.hidden_dim * 3)
    logit = fb * fma * d * v
    return _int_or_fraction(s.n_layers * (mlp + self_attn) + logit + core * s.n_layers * t)


def megatron_pre2025_flops_per_token(config: Any, seq_len: int, padded_vocab_size: int | None = None) -> Exact:
    """Megatron-LM before 2025-03 (e.g. @ 37de40c2, 2024-07): ``megatron/training/training.py``
    ``num_floating_point_operations``, per token (divided by ``batch_size * seq_length``):

    ``12 * L * d^2 * ( (1 + g/n + s/d) * q/d + (F/d) * 3/2 + V_pad / (2*L*d) )``

    (expansion_factor = 3 x 2 x 2: forward/wgrad/dgrad, two stacked GEMMs, FMA; gated_linear_multiplier
    3/2 for SwiGLU; g = num_query_groups, n = num_attention_heads). Dense attention. Expanded, it is
    12*L*d*q + 12*L*d*kv + 18*L*d*F + 6*d*V + 12*L*q*s: exactly the project's model count (norms and
    the embedding lookup excluded), computed there in floating point.
    """
    s, t = ModelShape.of(config), _seq_len(seq_len)
    v = megatron_padded_vocab_size(s.vocab_size) if padded_vocab_size is None else _positive_int(
        "padded_vocab_size", padded_vocab_size)
    d, L = s.dim, s.n_layers
    q_ratio = Fraction(s.q_dim, d)
    attention = (1 + Fraction(s.n_kv_heads, s.n_heads) + Fraction(t, d)) * q_ratio
    mlp = Fraction(s.hidden_dim, d) * Fraction(3, 2)
    logit = Fraction(v, 2 * L * d)
    return _int_or_fraction(12 * L * d * d * (attention + mlp + logit))


_FLASH_MODES = ("fwd", "bwd", "fwd_bwd")


def flash_attention_benchmark_flops(batch: int, seqlen: int, headdim: int, nheads: int, causal: bool,
                                    mode: str = "fwd") -> Exact:
    """flash-attention (Dao-AILab/flash-attention @ 0251105a): ``benchmarks/benchmark_flash_attention.py``
    ``flops(batch, seqlen, headdim, nheads, causal, mode="fwd")``, attention only, one layer:
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


def flash_attention_flops_per_token(config: Any, seq_len: int, causal: bool = True) -> Exact:
    """A whole-model estimate in the flash-attention benchmarks' convention: the exact matmul-weight
    part (``6 * matmul params``, as every estimate here has it) plus, per layer, the benchmark's
    ``flops(1, seq_len, head_dim, n_heads, causal, mode="fwd_bwd")`` / seq_len, i.e. 3.5 x the causal-
    halved forward attention = ``7 * L * H * hd * T`` instead of the model count's ``12 * L * H * hd * T``.
    The benchmark file itself times attention only; this composition is ours, to put its attention
    convention (causal halving, recompute counted) on the same per-token scale as the others."""
    s, t = ModelShape.of(config), _seq_len(seq_len)
    attention = flash_attention_benchmark_flops(1, t, s.head_dim, s.n_heads, causal, "fwd_bwd")
    return _int_or_fraction(6 * param_counts(s)["matmul"] + s.n_layers * Fraction(attention) / t)


def three_x_forward_flops_per_token(config: Any, seq_len: int, include_nonmatmul: bool = False) -> int:
    """"3 x forward" (calflops' ``include_backPropagation=True``: ``flops * (1 + compute_bp_factor)`` with
    ``compute_bp_factor=2.0``, MrYxJ/calculate-flops.pytorch @ 29ca5844, ``calflops/flops_counter.py``
    ``calculate_flops``): 3 x the forward FLOPs per token. With the forward's matmul FLOPs only it *is*
    the exact model count (the backward does exactly 2 x the forward's products). With
    ``include_nonmatmul`` the forward's non-matmul FLOPs (this project's conventions,
    :mod:`counters.table`: RMSNorm, RoPE, scale/mask/softmax, SwiGLU gate, residual adds) are
    tripled too - the "3 x total forward" that a counter reporting all forward FLOPs gives."""
    s, t = ModelShape.of(config), _seq_len(seq_len)
    flops = exact_model_flops_per_token(s, t)
    if not include_nonmatmul:
        return flops
    nonmatmul = _forward_nonmatmul_flops(s, t)
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


def _forward_nonmatmul_flops(s: ModelShape, n: int) -> int:
    """Non-matmul FLOPs of one forward of N tokens (batch 1, empty cache): the work table's conventions."""
    config = LlamaConfig(dim=s.dim, n_layers=s.n_layers, n_heads=s.n_heads, n_kv_heads=s.n_kv_heads,
                         vocab_size=s.vocab_size, hidden_dim=s.hidden_dim, head_dim=s.head_dim, max_seq_len=n,
                         tie_word_embeddings=s.tie_word_embeddings)
    return analyze(config, n_tokens=n).nonmatmul_flops


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
