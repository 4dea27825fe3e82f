"""Op primitives: the FLOP conventions of this project, stated once.

Every count in ``counters`` is built from these functions: the module formulas of the work table
(:mod:`counters.table`, used by the ``analytic`` and ``hooks`` counters) compose them, and the op
registry (:mod:`counters.ops`, used by the ``fvcore`` and ``torch`` counters) applies them to the ops
a forward really runs. Changing a constant here changes every counter alike, so the cross-check proves
the *decomposition* (which ops run, on which sizes), never the constants themselves: a constant is a
convention, not a measurement.

Units:

* **MACs** - multiply-accumulates of matrix products. ``FLOPs = 2 * MACs`` for these.
* **non-matmul FLOPs** - everything else, per element, with the constants below; kept apart from
  MACs and never folded into them.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

__all__ = [
    "COMPLEX_FLOPS_PER_ELEMENT", "Count", "FLOPS_PER_ELEMENT", "REDUCTION_FLOPS", "ZERO", "complex_elementwise",
    "elementwise", "matmul", "matmul_exact_flops", "reduction",
]


@dataclass(frozen=True)
class Count:
    """An exact count: ``macs`` of matrix products, ``nonmatmul_flops`` of everything else."""

    macs: int = 0
    nonmatmul_flops: int = 0

    @property
    def flops(self) -> int:
        """Matrix-product FLOPs: 2 x MACs."""
        return 2 * self.macs

    @property
    def total_flops(self) -> int:
        """Matrix-product FLOPs plus non-matmul FLOPs."""
        return 2 * self.macs + self.nonmatmul_flops

    def __add__(self, other: "Count") -> "Count":
        return Count(self.macs + other.macs, self.nonmatmul_flops + other.nonmatmul_flops)

    def __mul__(self, k: int) -> "Count":
        return Count(self.macs * k, self.nonmatmul_flops * k)

    __rmul__ = __mul__


ZERO = Count()

#: FLOPs per output element of an element-wise op on real operands.
FLOPS_PER_ELEMENT: Mapping[str, int] = MappingProxyType({
    "add": 1, "sub": 1, "mul": 1, "div": 1,
    "pow": 1,  # x.pow(2) = x*x, the only power Llama takes
    "rsqrt": 1,
    "where": 1,  # one select
    "maximum": 1, "minimum": 1,  # one comparison
    "silu": 4,  # x / (1 + exp(-x)): negate, exp, add, divide
    "sigmoid": 4,  # 1 / (1 + exp(-x)): negate, exp, add, reciprocal
    "softmax": 5,  # over a row: max, subtract, exp, sum, divide - one each per element
    "log_softmax": 5,  # over a row: max, subtract, exp, sum, subtract log(sum) - one each per element
    # backward ops
    "silu_backward": 9,  # g * s * (1 + x * (1 - s)), s = sigmoid(x): neg, exp, add, reciprocal + sub, mul, add, mul, mul
    "softmax_backward": 4,  # y * (g - sum(g * y)): mul, sum, sub, mul
    "log_softmax_backward": 4,  # g - exp(y) * sum(g): sum, exp, mul, sub
    "embedding_backward": 1,  # each gradient row added into the table's gradient: one add per element
    "nll_loss_backward": 1,  # -g / n written at each target
})
#: FLOPs per output element of an op on complex operands: (a+bi)(c+di) is 4 real multiplies and
#: 2 real adds; (a+bi) + (c+di) is 2 real adds. An op missing here has no complex convention.
COMPLEX_FLOPS_PER_ELEMENT: Mapping[str, int] = MappingProxyType({"mul": 6, "add": 2, "sub": 2})
#: Reductions: ``(per input element, per output element)``. ``mean`` is n-1 adds + 1 divide per output,
#: i.e. numel(input) in total; ``sum``/``max``/``min`` are n-1 per output.
REDUCTION_FLOPS: Mapping[str, tuple[int, int]] = MappingProxyType({
    "mean": (1, 0), "sum": (1, -1), "max": (1, -1), "min": (1, -1),
    "nll_loss": (1, 0),  # pick each target's log-probability (free), sum them (n-1), divide by n (1)
})


def _check_sizes(*sizes: int) -> None:
    for s in sizes:
        if type(s) is not int or s < 0:
            raise ValueError(f"op sizes must be non-negative ints, got {sizes!r}")


def elementwise(op: str, n: int) -> Count:
    """``op`` on real operands producing ``n`` elements (a broadcast ``scores + mask`` produces the
    scores' numel, whatever the mask's shape)."""
    _check_sizes(n)
    return Count(nonmatmul_flops=FLOPS_PER_ELEMENT[op] * n)


def complex_elementwise(op: str, n: int) -> Count:
    """``op`` on complex operands producing ``n`` complex elements."""
    _check_sizes(n)
    return Count(nonmatmul_flops=COMPLEX_FLOPS_PER_ELEMENT[op] * n)


def reduction(op: str, n_in: int, n_out: int) -> Count:
    """Reduce ``n_in`` elements to ``n_out``."""
    _check_sizes(n_in, n_out)
    per_in, per_out = REDUCTION_FLOPS[op]
    return Count(nonmatmul_flops=per_in * n_in + per_out * n_out)


def matmul(m: int, k: int, n: int) -> Count:
    """``(m x k) @ (k x n)``: ``m*k*n`` MACs (batch dimensions folded into ``m``)."""
    _check_sizes(m, k, n)
    return Count(macs=m * k * n)


def matmul_exact_flops(m: int, k: int, n: int) -> int:
    """Exact FLOPs of the same product: each of the ``m*n`` outputs is ``k`` multiplies and ``k-1``
    adds, ``m*n*(2k-1)`` (0 for an empty product)."""
    _check_sizes(m, k, n)
    return m * n * (2 * k - 1) if k else 0
