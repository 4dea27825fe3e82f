"""Closed-form counts: pure functions of shapes, shared by every counter.

Units (see README "Conventions"):

* **MACs** - multiply-accumulates of matrix products (q, k, v, o, w1, w3, w2, the output head,
  QK^T and attention x V). ``FLOPs = 2 * MACs`` for these.
* **non-matmul FLOPs** - everything else, per element, with the constants below. Kept apart
  from MACs and never folded into them.

Module-level formulas (used by ``analytic`` and ``hooks``) and the op-level formulas in
:mod:`counters.ops` (used by ``fvcore`` and ``torch``) are two descriptions of the same work;
the test-suite proves they agree exactly, op for op and layer for layer.
"""

from __future__ import annotations

from dataclasses import dataclass

# ---------------------------------------------------------------- per-element FLOP constants
# RMSNorm over a row of d values: x*x (d), sum+divide for the mean (d), + eps (1), rsqrt (1),
# x * rsqrt (d), * weight (d)  ->  4d + 2 per row.
RMSNORM_FLOPS_PER_ELEMENT = 4
RMSNORM_FLOPS_PER_ROW = 2
# One complex multiply (a+bi)(c+di) = 4 real multiplies + 2 real adds.
COMPLEX_MUL_FLOPS = 6
# silu(x) = x / (1 + exp(-x)): negate, exp, add, divide.
SILU_FLOPS = 4
# The SwiGLU gate multiply silu(w1 x) * (w3 x).
GATE_MUL_FLOPS = 1
# softmax over a row: max, subtract, exp, sum, divide - one each per element.
SOFTMAX_FLOPS = 5
# Scores / sqrt(head_dim), and + causal mask (only when more than one new token).
SCALE_FLOPS = 1
MASK_FLOPS = 1
# Residual adds: two per decoder layer, one FLOP per element each.
RESIDUAL_FLOPS = 1


@dataclass(frozen=True)
class Count:
    """An exact count. ``macs`` of matrix products, ``nonmatmul_flops`` of everything else."""

    macs: int = 0
    nonmatmul_flops: int = 0

    @property
    def flops(self) -> int:
        """Matrix-product FLOPs: 2 x MACs."""
        return 2 * self.macs

    @property
    def total_flops(self) -> int:
        return 2 * self.macs + self.nonmatmul_flops

    def __add__(self, other: "Count") -> "Count":
        return Count(self.macs + other.macs, self.nonmatmul_flops + other.nonmatmul_flops)

    def __mul__(self, k: int) -> "Count":
        return Count(self.macs * k, self.nonmatmul_flops * k)

    __rmul__ = __mul__


ZERO = Count()


# ---------------------------------------------------------------- module-level formulas
def linear(rows: int, in_features: int, out_features: int) -> Count:
    """``rows`` vectors times an (out, in) weight: rows*in*out MACs."""
    return Count(macs=rows * in_features * out_features)


def linear_exact_flops(rows: int, in_features: int, out_features: int) -> int:
    """Exact FLOPs of the same product: each output is in multiplies and in-1 adds: M*N*(2K-1)."""
    return rows * out_features * (2 * in_features - 1)


def rmsnorm(rows: int, dim: int) -> Count:
    return Count(nonmatmul_flops=rows * (RMSNORM_FLOPS_PER_ELEMENT * dim + RMSNORM_FLOPS_PER_ROW))


def rope(rows: int, n_heads: int, n_kv_heads: int, head_dim: int) -> Count:
    """Complex multiply of q and k: (n_heads + n_kv_heads) * head_dim/2 complex numbers per token."""
    return Count(nonmatmul_flops=rows * (n_heads + n_kv_heads) * (head_dim // 2) * COMPLEX_MUL_FLOPS)


def attention_core(bsz: int, n_heads: int, seqlen: int, kvlen: int, head_dim: int) -> Count:
    """QK^T and attention x V over the dense (seqlen x kvlen) score matrix of every *query* head
    (GQA shares k/v heads but not the products), plus scale, mask (seqlen > 1) and softmax."""
    scores = bsz * n_heads * seqlen * kvlen
    per_score = SCALE_FLOPS + (MASK_FLOPS if seqlen > 1 else 0) + SOFTMAX_FLOPS
    return Count(macs=2 * scores * head_dim, nonmatmul_flops=scores * per_score)


def attention_core_causal_macs(bsz: int, n_heads: int, seqlen: int, cached: int, head_dim: int) -> int:
    """MACs of the score entries that survive the causal mask: query i sees cached + i + 1 keys."""
    useful_scores = seqlen * cached + seqlen * (seqlen + 1) // 2
    return 2 * bsz * n_heads * useful_scores * head_dim


def gated_silu(rows: int, hidden_dim: int) -> Count:
    return Count(nonmatmul_flops=rows * hidden_dim * (SILU_FLOPS + GATE_MUL_FLOPS))


def residuals(rows: int, dim: int) -> Count:
    """The two residual adds of one decoder layer."""
    return Count(nonmatmul_flops=2 * rows * dim * RESIDUAL_FLOPS)


def embedding(rows: int, dim: int) -> Count:
    """A table lookup: no arithmetic."""
    return ZERO
