"""The one table of the work a Llama forward does: every row, in execution order.

A **row** is one module of :mod:`llama_ref` at one schedule position (or at the top level): its path in
the model, the kind of work it does, and the sizes that work takes from the config. A **kind** says what
a kind of module computes, as a decomposition into op primitives (:mod:`counters.primitives`), where its
sizes are read from a real call (for the hooks counter), and which bytes it moves (for the roofline).

Everything that needs to know "what a forward computes" iterates this table:

* ``analytic`` evaluates every row's ops on sizes from the config (source ``formula``);
* ``hooks`` installs one hook per row and evaluates the same ops on sizes read from the tensors that
  really flow (source ``shapes``);
* the ``fvcore`` and ``torch`` counters attribute each op they see to the row of the module that ran it
  (:func:`row_for_module`) and must land on the same numbers;
* the row order of every report, the roofline's bytes and its timed modules, and the tests' expectations.

Adding a module to the model is one entry here (plus a kind, if it computes something new).

**Tensor parallelism**. A rank of a tensor-parallel model (``llama_ref.parallel.parallelize``) has the same rows
(same names, same paths), with one rank's sizes: :class:`Dims` with ``tp=N`` gives them from the shape
algebra (``llama_ref.shapes.TPShares(config, N)``). What a rank's modules are and which collectives they send
is this table's own *TP plan* (each row's ``tp``, ``tp_class`` and ``collective``), checked against the
model that runs; the counting core never imports ``llama_ref.parallel``. Every row is either ``split`` (its work divided evenly across the ranks: the
projections, RoPE, the attention core, the SwiGLU gate, the embedding's columns, the output head's
vocabulary) or ``replicated`` (every rank does the whole of it: the RMSNorms, the residual adds, the
model's own mask construction); summed over the ranks a split row equals the single-process row and a
replicated one N times it. The parallel layers map to the kinds of their single-process bases (their own
``forward`` is the base's arithmetic plus a collective), and four rows run a collective on every rank
(:class:`counters.collectives.Collective`: communication, 0 FLOPs, recorded with its bytes): the embedding
and the output head all-gather, ``attention.wo`` and ``feed_forward.w2`` all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional

from torch import nn

from llama_ref.config import LlamaConfig
from llama_ref.model import (Attention, AttentionCore, FeedForward, GatedSiLU, Linear, Llama, RMSNorm, RotaryEmbedding,
                             TransformerBlock)
from llama_ref.shapes import FREQS_CIS_ENTRY_BYTES, TPShares

from . import primitives as P
from .collectives import ALL_GATHER, ALL_REDUCE, Collective
from .primitives import ZERO, Count

__all__ = [
    "BLOCK_ROWS", "Bytes", "Dims", "Dtypes", "Kind", "Op", "REPLICATED", "Row", "RowKey", "RunShape", "SPLIT",
    "TOP_ROWS_AFTER", "TOP_ROWS_BEFORE", "KINDS", "all_rows", "block_row_names",
    "row_for_module", "row_order", "timed_block_paths", "tp_world_size", "TOKEN_ID_BYTES", "FREQS_CIS_ENTRY_BYTES",
]

RowKey = tuple[Optional[int], str]  # (schedule position or None for top-level rows, row name)

# Bytes of one int64 token id (the RoPE table's entry size, FREQS_CIS_ENTRY_BYTES, is the shape algebra's).
TOKEN_ID_BYTES = 8


# ====================================================================== building blocks
@dataclass(frozen=True)
class Op:
    """One op of a row's decomposition: the primitive's name, its count, and for a matrix product its
    ``(m, k, n)`` (to give the exact ``m*n*(2k-1)`` FLOPs)."""

    name: str
    count: Count
    mm: Optional[tuple[int, int, int]] = None


def _matmul(m: int, k: int, n: int) -> Op:
    return Op("matmul", P.matmul(m, k, n), (m, k, n))


def _ew(name: str, n: int) -> Op:
    return Op(name, P.elementwise(name, n))


def _sum(n_in: int, n_out: int) -> Op:
    return Op("sum", P.reduction("sum", n_in, n_out))


def sum_ops(ops) -> Count:
    total = ZERO
    for op in ops:
        total = total + op.count
    return total


@dataclass(frozen=True)
class RunShape:
    """What one forward computes: ``batch`` sequences of ``seqlen`` new tokens after ``start_pos``
    cached positions; ``last_only``: the output head runs on each sequence's last position only (what
    generation needs: ``Llama.forward(..., last_only=True)``), else on every position (scoring, training)."""

    batch: int
    seqlen: int
    start_pos: int = 0
    last_only: bool = False

    @property
    def rows(self) -> int:
        """Token vectors in flight: batch x new tokens."""
        return self.batch * self.seqlen

    @property
    def logit_rows(self) -> int:
        """Token vectors the output head multiplies: every position's, or each sequence's last one."""
        return self.batch if self.last_only else self.rows

    @property
    def kvlen(self) -> int:
        """Positions each new token attends to at most (the dense score matrix is seqlen x kvlen)."""
        return self.start_pos + self.seqlen


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element of weights, activations and the KV cache."""

    weight: int
    act: int
    kv: int


@dataclass(frozen=True)
class Dims:
    """The sizes one process's modules have: the whole model's (``tp=None``, a single-process ``Llama``) or
    one rank's of a ``tp``-way tensor-parallel model (Meta's layout, ``TPShares``: query heads, kv heads,
    FFN width, output-head vocabulary and embedding columns divided by ``tp``; the residual stream ``dim``
    whole on every rank). ``tp=1`` is a one-rank tensor-parallel model: the single-process sizes, plus its
    collectives (over one rank). Every rank of Meta's layout has the same sizes. Derived sizes are
    properties (one rank's taken from ``TPShares``); a world size that does not divide the model raises
    ``TPShares``'s ValueError.
    """

    config: LlamaConfig
    tp: Optional[int] = None
    # One rank's shares come from the shape algebra (TPShares), which checks every divisibility problem.
    layout: Optional[TPShares] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layout", None if self.tp is None else TPShares(self.config, self.tp))

    def _share(self, name: str) -> int:
        """This process's share of a split size: the rank's (``TPShares``) or the whole model's."""
        return getattr(self.config if self.layout is None else self.layout, name)

    @property
    def ranks(self) -> int:
        return 1 if self.tp is None else self.tp

    @property
    def dim(self) -> int:
        """The residual stream's width: whole on every rank (norms, residual adds, projection inputs)."""
        return self.config.dim

    @property
    def embed_dim(self) -> int:
        """Embedding columns this rank looks up (gathered to ``dim`` afterwards)."""
        return self.config.dim if self.layout is None else self.layout.embed_dim

    @property
    def n_heads(self) -> int:
        return self._share("n_heads")

    @property
    def n_kv_heads(self) -> int:
        return self._share("n_kv_heads")

    @property
    def head_dim(self) -> int:
        return self.config.head_dim

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def hidden_dim(self) -> int:
        return self._share("hidden_dim")

    @property
    def vocab_size(self) -> int:
        """Output-head rows (logits) this rank computes."""
        return self._share("vocab_size")

    @property
    def full_vocab_size(self) -> int:
        """Logits per position after the output head's all-gather (what a loss sees on every rank)."""
        return self.config.vocab_size


def as_dims(config: Any, tp: Optional[int] = None) -> Dims:
    """``config`` (a LlamaConfig, or Dims already) as :class:`Dims`."""
    if isinstance(config, Dims):
        if tp is not None and tp != config.tp:
            raise ValueError(f"Dims of tp={config.tp} given with tp={tp}")
        return config
    return Dims(config, tp)


@dataclass(frozen=True)
class Bytes:
    """Bytes a row moves (each tensor crosses memory once per use; see :mod:`counters.analytic`)."""

    weight: int = 0
    act: int = 0
    kv_read: int = 0
    kv_write: int = 0

    @property
    def total(self) -> int:
        return self.weight + self.act + self.kv_read + self.kv_write


NO_BYTES = Bytes()


# ---------------------------------------------------------------- sizes of each kind
class Mat(NamedTuple):
    """A linear layer: ``rows`` vectors of ``k`` in, ``n`` out."""
    rows: int
    k: int
    n: int


class Norm(NamedTuple):
    rows: int
    dim: int


class Rope(NamedTuple):
    bsz: int
    seqlen: int
    n_heads: int
    n_kv_heads: int
    head_dim: int


class Attn(NamedTuple):
    """The attention core: ``seqlen`` queries per head over ``kvlen`` keys; ``masked`` when a mask is added."""
    bsz: int
    seqlen: int
    kvlen: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    masked: bool


class Elems(NamedTuple):
    """An element-wise row: ``rows`` vectors of ``width``."""
    rows: int
    width: int


class KvWrite(NamedTuple):
    rows: int
    kv_dim: int


class Nothing(NamedTuple):
    pass


def _rows(shape) -> int:
    n = 1
    for s in shape[:-1]:
        n *= int(s)
    return n


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs[name]


# ====================================================================== kinds
@dataclass(frozen=True)
class Kind:
    """What a kind of module computes.

    ``module``: the llama_ref class whose ``forward`` this describes (a subclass that overrides
    ``forward`` may do other work and is not covered). ``leaf``: the kind covers the module and
    everything below it; otherwise only the module's *own* ops (its children have rows of their own).
    ``ops(sizes)``: the decomposition into op primitives, in the order the forward runs them.
    ``read(module, args, kwargs, output)``: the sizes, from a real call's tensors (the hooks counter).
    ``bytes(sizes, dtypes)``: the bytes it moves. ``macs_causal(sizes)``: MACs of only the attention
    scores a causal mask keeps (default: all MACs).

    Training: ``backward_ops(sizes)`` is what autograd runs for the module's backward (``None``: nothing,
    e.g. views and pass-through adds), and ``read_backward(module, grad_input, grad_output)`` the same
    sizes read from the real gradient tensors (full backward hooks).
    """

    name: str
    module: type  # type(None) for work that is not a module's (the loss)
    leaf: bool
    ops: Callable[[Any], tuple[Op, ...]]
    read: Optional[Callable[[nn.Module, tuple, dict, Any], Any]]
    bytes: Callable[[Any, Dtypes], Bytes]
    macs_causal: Optional[Callable[[Any], int]] = None
    backward_ops: Optional[Callable[[Any], tuple[Op, ...]]] = None
    read_backward: Optional[Callable[[nn.Module, tuple, tuple], Any]] = None

    def count(self, sizes: Any) -> Count:
        return sum_ops(self.ops(sizes))

    def backward_count(self, sizes: Any) -> Count:
        return ZERO if self.backward_ops is None else sum_ops(self.backward_ops(sizes))

    def covers(self, module: nn.Module) -> bool:
        """``module`` is this kind's class and runs that class's own ``forward``."""
        return isinstance(module, self.module) and type(module).forward is self.module.forward


# ---------------------------------------------------------------- linear (q, k, v, o, w1, w3, w2, output head)
def _linear_ops(s: Mat) -> tuple[Op, ...]:
    return (_matmul(s.rows, s.k, s.n),)  # (rows, k) @ (k, n)


def _linear_read(module, args, kwargs, output) -> Mat:
    # The product is (rows, k) @ (k, n) with n the weight's rows: the output's width, except for a tensor-parallel
    # output head, whose rank computes vocab / N logits before gathering them (communication, not arithmetic).
    x = _arg(args, kwargs, 0, "x")
    return Mat(_rows(output.shape), int(x.shape[-1]), int(module.weight.shape[0]))


def _linear_bytes(s: Mat, dt: Dtypes) -> Bytes:
    return Bytes(weight=s.k * s.n * dt.weight, act=(s.rows * s.k + s.rows * s.n) * dt.act)


def _linear_backward(s: Mat) -> tuple[Op, ...]:
    return (_matmul(s.n, s.rows, s.k),  # dW = dY^T X: (n, rows) @ (rows, k)
            _matmul(s.rows, s.n, s.k))  # dX = dY W: (rows, n) @ (n, k)


def _linear_read_backward(module, grad_input, grad_output) -> Mat:
    g = grad_output[0]  # (..., n)
    return Mat(_rows(g.shape), int(module.weight.shape[1]), int(g.shape[-1]))


LINEAR = Kind("linear", Linear, True, _linear_ops, _linear_read, _linear_bytes,
              backward_ops=_linear_backward, read_backward=_linear_read_backward,
              )


# ---------------------------------------------------------------- RMSNorm
def _rmsnorm_ops(s: Norm) -> tuple[Op, ...]:
    # x * rsqrt(mean(x^2) + eps) * weight, over rows of dim: 4*dim + 2 FLOPs per row.
    n = s.rows * s.dim
    return (_ew("pow", n), Op("mean", P.reduction("mean", n, s.rows)), _ew("add", s.rows), _ew("rsqrt", s.rows),
            _ew("mul", n), _ew("mul", n))


def _rmsnorm_read(module, args, kwargs, output) -> Norm:
    x = _arg(args, kwargs, 0, "x")
    return Norm(_rows(x.shape), int(x.shape[-1]))


def _rmsnorm_bytes(s: Norm, dt: Dtypes) -> Bytes:
    return Bytes(weight=s.dim * dt.weight, act=2 * s.rows * s.dim * dt.act)


def _rmsnorm_backward(s: Norm) -> tuple[Op, ...]:
    # Autograd's own decomposition of x * rsqrt(mean(x^2) + eps) * w: 11*dim + 2 per row, minus dim.
    n = s.rows * s.dim
    return (
        _ew("mul", n), _ew("mul", n), _sum(n, s.dim),  # (* w): grad * w; grad * normed, summed over rows (dW)
        _ew("mul", n), _ew("mul", n), _sum(n, s.rows),  # (x * r): grad * r; grad * x, summed over dim (dr)
        _ew("pow", s.rows), _ew("mul", s.rows), _ew("mul", s.rows),  # rsqrt': -0.5 * r^3 * g
        _ew("div", n),  # mean': g / dim, expanded
        _ew("pow", n), _ew("mul", n), _ew("mul", n),  # (x^2)': 2 * x^1 * g
        _ew("add", n),  # x feeds both pow and the product: its two gradients are added
    )


def _norm_read_backward(module, grad_input, grad_output) -> Norm:
    g = grad_output[0]
    return Norm(_rows(g.shape), int(g.shape[-1]))


RMSNORM = Kind("rmsnorm", RMSNorm, True, _rmsnorm_ops, _rmsnorm_read, _rmsnorm_bytes,
               backward_ops=_rmsnorm_backward, read_backward=_norm_read_backward)


# ---------------------------------------------------------------- RoPE
def _rope_ops(s: Rope) -> tuple[Op, ...]:
    # One complex multiply per (head_dim / 2) complex channel of every q head and every k head.
    pairs = s.bsz * s.seqlen * (s.head_dim // 2)
    return (Op("complex_mul", P.complex_elementwise("mul", pairs * s.n_heads)),
            Op("complex_mul", P.complex_elementwise("mul", pairs * s.n_kv_heads)))


def _rope_read(module, args, kwargs, output) -> Rope:
    xq, xk = output  # (bsz, seqlen, n_heads, head_dim), (bsz, seqlen, n_kv_heads, head_dim)
    bsz, seqlen, n_heads, head_dim = (int(d) for d in xq.shape)
    return Rope(bsz, seqlen, n_heads, int(xk.shape[2]), head_dim)


def _rope_bytes(s: Rope, dt: Dtypes) -> Bytes:
    # q and k read and written, plus the (seqlen, head_dim / 2) complex64 table slice.
    rows = s.bsz * s.seqlen
    return Bytes(act=2 * rows * (s.n_heads + s.n_kv_heads) * s.head_dim * dt.act
                 + s.seqlen * (s.head_dim // 2) * FREQS_CIS_ENTRY_BYTES)


def _rope_read_backward(module, grad_input, grad_output) -> Rope:
    gq, gk = grad_output  # (bsz, seqlen, n_heads, head_dim), (bsz, seqlen, n_kv_heads, head_dim)
    bsz, seqlen, n_heads, head_dim = (int(d) for d in gq.shape)
    return Rope(bsz, seqlen, n_heads, int(gk.shape[2]), head_dim)


# The backward of a multiply by the (constant) table is a multiply by its conjugate: the same work.
ROPE = Kind("rope", RotaryEmbedding, True, _rope_ops, _rope_read, _rope_bytes,
            backward_ops=_rope_ops, read_backward=_rope_read_backward)


# ---------------------------------------------------------------- attention core
def _attention_ops(s: Attn) -> tuple[Op, ...]:
    # Dense over the seqlen x kvlen score matrix of every *query* head (GQA shares k/v heads, not products).
    q_rows = s.bsz * s.n_heads * s.seqlen
    scores = q_rows * s.kvlen
    ops = [_matmul(q_rows, s.head_dim, s.kvlen),  # QK^T: (seqlen, head_dim) @ (head_dim, kvlen) per head
           _ew("div", scores)]  # / sqrt(head_dim)
    if s.masked:
        ops.append(_ew("add", scores))  # + causal mask (also counted for SDPA's is_causal: see docs/counting.md)
    ops += [_ew("softmax", scores),
            _matmul(q_rows, s.kvlen, s.head_dim)]  # A V: (seqlen, kvlen) @ (kvlen, head_dim) per head
    return tuple(ops)


def _attention_read(module, args, kwargs, output) -> Attn:
    xq = _arg(args, kwargs, 0, "xq")  # (bsz, seqlen, n_heads, head_dim)
    keys = _arg(args, kwargs, 1, "keys")  # (bsz, kvlen, n_kv_heads, head_dim)
    values = _arg(args, kwargs, 2, "values")
    mask = _arg(args, kwargs, 3, "mask")
    if values.shape[1] != keys.shape[1]:
        raise ValueError(f"attention core got {keys.shape[1]} keys but {values.shape[1]} values")
    bsz, seqlen, n_heads, head_dim = (int(d) for d in xq.shape)
    # More than one new token is causally masked: by the mask the model built, or (sdpa without a cached prefix)
    # by the kernel itself (is_causal, no mask tensor). A mask given to a one-token step would be work no row has.
    if mask is not None and seqlen == 1:
        raise ValueError("attention core got a mask for a one-token step")
    return Attn(bsz, seqlen, int(keys.shape[1]), n_heads, int(keys.shape[2]), head_dim, seqlen > 1)


def _attention_bytes(s: Attn, dt: Dtypes) -> Bytes:
    # q in, output out; keys and values of kvlen positions read. The score matrix is not traffic
    # (fused / flash-style attention keeps it on chip).
    q_width = s.n_heads * s.head_dim
    return Bytes(act=2 * s.bsz * s.seqlen * q_width * dt.act,
                 kv_read=2 * s.bsz * s.kvlen * s.n_kv_heads * s.head_dim * dt.kv)


def _attention_macs_causal(s: Attn) -> int:
    # Query i (0-based among the new tokens) sees cached + i + 1 keys.
    cached = s.kvlen - s.seqlen
    useful = s.seqlen * cached + s.seqlen * (s.seqlen + 1) // 2
    return 2 * s.bsz * s.n_heads * useful * s.head_dim


def attention_fused_backward_ops(s: Attn) -> tuple[Op, ...]:
    """The backward of scores -> softmax -> A V as the model defines it (what the math kernel runs): two
    products per forward product, the scale's and the softmax's backward. A fused kernel's backward
    recomputes the scores first (one more product): executed work, not model work."""
    q_rows = s.bsz * s.n_heads * s.seqlen
    k_rows = s.bsz * s.n_heads * s.kvlen
    scores = q_rows * s.kvlen
    return (
        _matmul(k_rows, s.seqlen, s.head_dim),  # dV = A^T dO, per head (kvlen, seqlen) @ (seqlen, head_dim)
        _matmul(q_rows, s.head_dim, s.kvlen),  # dA = dO V^T, per head (seqlen, head_dim) @ (head_dim, kvlen)
        Op("softmax_backward", P.elementwise("softmax_backward", scores)),
        _ew("div", scores),  # the scale's backward; the mask add passes the gradient through
        _matmul(k_rows, s.seqlen, s.head_dim),  # dK = dS^T Q, per head (kvlen, seqlen) @ (seqlen, head_dim)
        _matmul(q_rows, s.kvlen, s.head_dim),  # dQ = dS K, per head (seqlen, kvlen) @ (kvlen, head_dim)
    )


def _attention_backward(s: Attn) -> tuple[Op, ...]:
    ops = attention_fused_backward_ops(s)
    if s.n_heads != s.n_kv_heads:  # repeat_kv's backward: each kv head's gradient summed over its n_rep heads
        n_in, n_out = s.bsz * s.kvlen * s.n_heads * s.head_dim, s.bsz * s.kvlen * s.n_kv_heads * s.head_dim
        ops += (_sum(n_in, n_out), _sum(n_in, n_out))  # keys, values
    return ops


def _attention_read_backward(module, grad_input, grad_output) -> Attn:
    gq, gk = grad_input[0], grad_input[1]  # (bsz, seqlen, n_heads, head_dim), (bsz, kvlen, n_kv_heads, head_dim)
    bsz, seqlen, n_heads, head_dim = (int(d) for d in gq.shape)
    return Attn(bsz, seqlen, int(gk.shape[1]), n_heads, int(gk.shape[2]), head_dim, seqlen > 1)


ATTENTION_CORE = Kind("attention_core", AttentionCore, True, _attention_ops, _attention_read, _attention_bytes,
                      macs_causal=_attention_macs_causal, backward_ops=_attention_backward,
                      read_backward=_attention_read_backward)


# ---------------------------------------------------------------- SwiGLU gate, residual adds
def _gate_ops(s: Elems) -> tuple[Op, ...]:
    n = s.rows * s.width
    return (_ew("silu", n), _ew("mul", n))  # silu(gate) * up


def _output_elems(module, args, kwargs, output) -> Elems:
    return Elems(_rows(output.shape), int(output.shape[-1]))


def _gate_backward(s: Elems) -> tuple[Op, ...]:
    n = s.rows * s.width
    return (_ew("mul", n), _ew("mul", n),  # d(up) = g * silu(gate); d(silu) = g * up
            Op("silu_backward", P.elementwise("silu_backward", n)))


def _grad_elems(module, grad_input, grad_output) -> Elems:
    g = grad_output[0]
    return Elems(_rows(g.shape), int(g.shape[-1]))


GATED_SILU = Kind("gated_silu", GatedSiLU, True, _gate_ops, _output_elems,
                  lambda s, dt: Bytes(act=3 * s.rows * s.width * dt.act),  # gate and up in, product out
                  backward_ops=_gate_backward, read_backward=_grad_elems)


def _residual_ops(s: Elems) -> tuple[Op, ...]:
    n = s.rows * s.width
    return (_ew("add", n), _ew("add", n))  # h = x + attention(...); out = h + feed_forward(...)


RESIDUAL = Kind("residual", TransformerBlock, False, _residual_ops, _output_elems,
                lambda s, dt: Bytes(act=2 * 3 * s.rows * s.width * dt.act))  # each add reads two, writes one


# ---------------------------------------------------------------- embedding and modules with no arithmetic
def _no_ops(s: Any) -> tuple[Op, ...]:
    return ()


def _embedding_read(module, args, kwargs, output) -> Elems:
    # The weight's columns: the output's width, except on a tensor-parallel rank (its columns, then all-gathered).
    return Elems(_rows(output.shape), int(module.weight.shape[1]))


EMBEDDING = Kind("embedding", nn.Embedding, True, _no_ops, _embedding_read,  # a table lookup: 0 MACs
                 lambda s, dt: Bytes(weight=s.rows * s.width * dt.weight,  # only the gathered rows
                                     act=s.rows * TOKEN_ID_BYTES + s.rows * s.width * dt.act),
                 backward_ops=lambda s: (Op("embedding_backward", P.elementwise("embedding_backward",
                                                                                s.rows * s.width)),),
                 read_backward=_grad_elems)
# Own forward: views, dtype casts and the KV-cache write (data movement, no arithmetic).
ATTENTION_OWN = Kind("attention_own", Attention, False, _no_ops, None,
                     lambda s, dt: Bytes(kv_write=2 * s.rows * s.kv_dim * dt.kv))
FEED_FORWARD_OWN = Kind("feed_forward_own", FeedForward, False, _no_ops, None, lambda s, dt: NO_BYTES)
# Own forward: the embedding cast, RoPE-table slicing and causal-mask construction.
MODEL_OWN = Kind("model_own", Llama, False, _no_ops, None, lambda s, dt: NO_BYTES)

# ---------------------------------------------------------------- the training loss (not a module: the step's own work)
def _loss_sum_ops(s: Elems) -> tuple[Op, ...]:
    return (_sum(s.rows * s.width, 1),)  # logits.sum()


def _loss_ce_ops(s: Elems) -> tuple[Op, ...]:
    # cross-entropy of each row's logits against a target id: log_softmax over the vocabulary, then the
    # mean of the targets' negative log-probabilities
    return (Op("log_softmax", P.elementwise("log_softmax", s.rows * s.width)),
            Op("nll_loss", P.reduction("nll_loss", s.rows, 1)))


def _loss_ce_backward(s: Elems) -> tuple[Op, ...]:
    return (Op("nll_loss_backward", P.elementwise("nll_loss_backward", s.rows)),
            Op("log_softmax_backward", P.elementwise("log_softmax_backward", s.rows * s.width)))


LOSS_SUM = Kind("loss_sum", type(None), True, _loss_sum_ops, None, lambda s, dt: NO_BYTES,
                backward_ops=_no_ops)  # the sum's backward is an expand: free
LOSS_CROSS_ENTROPY = Kind("loss_cross_entropy", type(None), True, _loss_ce_ops, None, lambda s, dt: NO_BYTES,
                          backward_ops=_loss_ce_backward)
LOSS_KINDS = {"cross-entropy": LOSS_CROSS_ENTROPY, "sum": LOSS_SUM}

KINDS = (LINEAR, RMSNORM, ROPE, ATTENTION_CORE, GATED_SILU, RESIDUAL, EMBEDDING, ATTENTION_OWN, FEED_FORWARD_OWN,
         MODEL_OWN, LOSS_SUM, LOSS_CROSS_ENTROPY)


# ====================================================================== rows
#: How a row's work is shared by the ranks of a tensor-parallel model (``Row.tp``).
SPLIT = "split"  # divided evenly: summed over the ranks it is the single-process row
REPLICATED = "replicated"  # every rank does all of it: summed over the ranks, N times the single-process row

CollectiveOf = Callable[["Dims", RunShape, Dtypes], Collective]


# The TP plan of Meta's layout: the classes a rank holds at the projection rows (llama_ref.parallel.layers,
# named here, never imported).
COLUMN_PARALLEL = "llama_ref.parallel.layers.ColumnParallelLinear"
ROW_PARALLEL = "llama_ref.parallel.layers.RowParallelLinear"
PARALLEL_EMBEDDING = "llama_ref.parallel.layers.ParallelEmbedding"


@dataclass(frozen=True)
class Row:
    """One row of the table. ``name`` is the row's name in every report; ``path`` the module's path
    relative to the model (top-level rows) or to a decoder layer (block rows), ``""`` for the model or
    layer itself. ``sizes(config, shape, tp)`` are the sizes the analytic counter uses (``sizes_of`` reads
    them from :class:`Dims`); ``params(config)`` the parameters this module holds (counted once per model,
    whatever the schedule).

    ``backward_extra(sizes)``: backward work that belongs to this row because of where the module sits in
    the graph, not to its kind: autograd adds the gradients of a tensor used twice, and the add runs in the
    backward of the use whose gradient arrives second (e.g. ``wq``: ``x`` also feeds ``wk`` and ``wv``).

    Tensor parallelism, this table's own TP plan: ``tp`` is :data:`SPLIT` or :data:`REPLICATED`; ``tp_class``
    the class a rank of a tensor-parallel model holds at this row (``None``: the single-process module), whose
    own ``forward`` is the kind's arithmetic on the rank's slice plus ``collective_op``;
    ``collective(dims, shape, dtypes)`` the collective this row's module runs on every rank (``None``: none)."""

    name: str
    path: str
    kind: Kind
    sizes_of: Callable[[Dims, RunShape], Any]
    params: Callable[[LlamaConfig], int] = lambda c: 0
    backward_extra: Callable[[Any], tuple[Op, ...]] = _no_ops
    tp: str = SPLIT
    collective: Optional[CollectiveOf] = None
    tp_class: Optional[str] = None
    collective_op: Optional[str] = None

    def covers(self, module: nn.Module) -> bool:
        """``module`` runs the arithmetic this row's kind describes: the kind's own class, or exactly the
        tensor-parallel class the plan names here, running that class's own ``forward``."""
        if self.kind.covers(module):
            return True
        cls = type(module)
        return (self.tp_class is not None and f"{cls.__module__}.{cls.__qualname__}" == self.tp_class
                and isinstance(module, self.kind.module) and "forward" in vars(cls))

    def measured_collective(self, module: nn.Module, output: Any, world_size: Optional[int]) -> Optional[Collective]:
        """The collective this row's module sends on a ``world_size``-way rank (per the plan), with the payload
        of the real ``output`` tensor; ``None`` in a single process or for a row that sends none."""
        if world_size is None or self.collective_op is None:
            return None
        return Collective(self.collective_op, int(output.numel()), int(output.element_size()), int(world_size))

    def sizes(self, config: Any, shape: RunShape, tp: Optional[int] = None) -> Any:
        """The sizes this row's kind computes on: of the whole model (``config`` a LlamaConfig), or of one
        rank of a ``tp``-way tensor-parallel one (or ``config`` given as :class:`Dims`)."""
        return self.sizes_of(as_dims(config, tp), shape)

    def collectives(self, config: Any, shape: RunShape, dtypes: Dtypes, tp: Optional[int] = None) -> tuple[Collective, ...]:
        """The collectives one run of this row makes a rank do (none in a single process)."""
        dims = as_dims(config, tp)
        if dims.tp is None or self.collective is None:
            return ()
        return (self.collective(dims, shape, dtypes),)

    def backward_ops(self, sizes: Any) -> tuple[Op, ...]:
        """The kind's backward ops on ``sizes`` plus this row's own (``backward_extra``)."""
        own = self.kind.backward_ops(sizes) if self.kind.backward_ops is not None else ()
        return tuple(own) + tuple(self.backward_extra(sizes))


def _q_width(c) -> int:
    return c.q_dim


def _input_grad_add(s: Mat) -> tuple[Op, ...]:
    # The input's gradient from this projection meets the one already there from a sibling.
    return (_ew("add", s.rows * s.k),)


def _residual_grad_add(s: Norm) -> tuple[Op, ...]:
    # The norm's input also feeds the residual add: the residual stream's gradient is added here.
    return (_ew("add", s.rows * s.dim),)


# The size functions below read a LlamaConfig (parameters, whole model) or Dims (one rank): same names.
def _linear_row(name: str, k: Callable[[Any], int], n: Callable[[Any], int],
                params: Optional[Callable[[LlamaConfig], int]] = None, *, shares_input: bool = False,
                tp_class: str = COLUMN_PARALLEL, collective: Optional[CollectiveOf] = None,
                collective_op: Optional[str] = None, rows: Callable[[RunShape], int] = lambda s: s.rows) -> Row:
    return Row(name, name, LINEAR, lambda d, s: Mat(rows(s), k(d), n(d)),
               params if params is not None else (lambda c: k(c) * n(c)),
               _input_grad_add if shares_input else _no_ops, SPLIT, collective, tp_class, collective_op)


def _norm_row(name: str, *, on_residual: bool = False) -> Row:
    return Row(name, name, RMSNORM, lambda d, s: Norm(s.rows, d.dim), lambda c: c.dim,
               _residual_grad_add if on_residual else _no_ops, REPLICATED)


def _dim(c) -> int:
    return c.dim


def _kv_dim(c) -> int:
    return c.kv_dim


def _hidden(c) -> int:
    return c.hidden_dim


def _output_params(c: LlamaConfig) -> int:
    # A tied head is the embedding tensor itself: its parameters are counted once, under tok_embeddings.
    return 0 if c.tie_word_embeddings else c.dim * c.vocab_size


# The collectives of Meta's layout, per rank and run.

def _gather_embedding(d: Dims, s: RunShape, dt: Dtypes) -> Collective:
    # This rank's looked-up columns, gathered to full vectors in the embedding's (weight) dtype, before the
    # model casts them to its compute dtype.
    return Collective(ALL_GATHER, s.rows * d.dim, dt.weight, d.ranks)


def _reduce_residual(d: Dims, s: RunShape, dt: Dtypes) -> Collective:
    # A row-parallel projection's partial sums (rows, dim), summed over the ranks in the activation dtype.
    return Collective(ALL_REDUCE, s.rows * d.dim, dt.act, d.ranks)


def _gather_logits(d: Dims, s: RunShape, dt: Dtypes) -> Collective:
    # This rank's logits (rows, vocab / N), gathered to (rows, vocab) in the activation dtype.
    return Collective(ALL_GATHER, s.logit_rows * d.full_vocab_size, dt.act, d.ranks)


# Top-level rows before the decoder layers, in execution order.
TOP_ROWS_BEFORE: tuple[Row, ...] = (
    # Own work: the causal mask and the RoPE-table slice, built whole on every rank.
    Row("(root)", "", MODEL_OWN, lambda d, s: Nothing(), tp=REPLICATED),
    Row("tok_embeddings", "tok_embeddings", EMBEDDING, lambda d, s: Elems(s.rows, d.embed_dim),
        lambda c: c.vocab_size * c.dim, collective=_gather_embedding, tp_class=PARALLEL_EMBEDDING,
        collective_op=ALL_GATHER),
)
# The rows of one decoder-layer run, in execution order.
# Training: autograd runs the backward of the projections that share an input in reverse order of their
# forward (wv, wk, wq; w3, w1), so the gradient adds of the shared input run in wk and wq, and in w1.
BLOCK_ROWS: tuple[Row, ...] = (
    _norm_row("attention_norm", on_residual=True),
    _linear_row("attention.wq", _dim, _q_width, shares_input=True),
    _linear_row("attention.wk", _dim, _kv_dim, shares_input=True),
    _linear_row("attention.wv", _dim, _kv_dim),
    Row("attention.rope", "attention.rope", ROPE,
        lambda d, s: Rope(s.batch, s.seqlen, d.n_heads, d.n_kv_heads, d.head_dim)),
    Row("attention.core", "attention.core", ATTENTION_CORE,
        lambda d, s: Attn(s.batch, s.seqlen, s.kvlen, d.n_heads, d.n_kv_heads, d.head_dim, s.seqlen > 1)),
    _linear_row("attention.wo", _q_width, _dim, tp_class=ROW_PARALLEL, collective=_reduce_residual,
                collective_op=ALL_REDUCE),
    Row("attention", "attention", ATTENTION_OWN, lambda d, s: KvWrite(s.rows, d.kv_dim)),
    _norm_row("ffn_norm", on_residual=True),
    _linear_row("feed_forward.w1", _dim, _hidden, shares_input=True),
    _linear_row("feed_forward.w3", _dim, _hidden),
    Row("feed_forward.act", "feed_forward.act", GATED_SILU, lambda d, s: Elems(s.rows, d.hidden_dim)),
    _linear_row("feed_forward.w2", _hidden, _dim, tp_class=ROW_PARALLEL, collective=_reduce_residual,
                collective_op=ALL_REDUCE),
    Row("feed_forward", "feed_forward", FEED_FORWARD_OWN, lambda d, s: Nothing()),
    Row("residual", "", RESIDUAL, lambda d, s: Elems(s.rows, d.dim), tp=REPLICATED),
)
# Top-level rows after the decoder layers.
TOP_ROWS_AFTER: tuple[Row, ...] = (
    _norm_row("norm"),
    _linear_row("output", _dim, lambda c: c.vocab_size, _output_params, collective=_gather_logits,
                collective_op=ALL_GATHER, rows=lambda s: s.logit_rows),
)
#: A training step's loss: the logits' cross-entropy (or sum), computed after the model.
LOSS_ROW_NAME = "(loss)"


def loss_row(loss: str) -> Row:
    if loss not in LOSS_KINDS:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSS_KINDS)}")
    # On the gathered logits: every rank of a tensor-parallel model would compute the whole loss.
    return Row(LOSS_ROW_NAME, "", LOSS_KINDS[loss], lambda d, s: Elems(s.rows, d.full_vocab_size), tp=REPLICATED)


def all_rows() -> tuple[Row, ...]:
    """Every row of one forward's table, top-level and block rows (each once)."""
    return TOP_ROWS_BEFORE + BLOCK_ROWS + TOP_ROWS_AFTER


def tp_world_size(model: nn.Module) -> Optional[int]:
    """The world size of a tensor-parallel rank (its ``tp_group``, set by ``llama_ref.parallel.parallelize``),
    ``None`` for a single-process model."""
    group = getattr(model, "tp_group", None)
    return None if group is None else int(group.world_size)


_BLOCK_BY_PATH = {r.path: r for r in BLOCK_ROWS}
_TOP_BY_PATH = {r.path: r for r in TOP_ROWS_BEFORE + TOP_ROWS_AFTER}
#: The decoder layers' container in the model; a layer's modules live under ``layers.<i>.``.
LAYERS_PATH = "layers"
#: Module paths that hold runtime state, never compute: KV caches (their writes run inside ``attention``).
STATE_PATHS = ("caches",)


def block_row_names() -> tuple[str, ...]:
    return tuple(r.name for r in BLOCK_ROWS)


def timed_block_paths() -> tuple[str, ...]:
    """Leaf modules of a decoder layer that do work: what a per-module timer hooks."""
    return tuple(r.path for r in BLOCK_ROWS if r.kind.leaf)


def row_order(n_positions: int, *, loss: bool = False) -> list[RowKey]:
    """All row keys in execution order for a schedule of ``n_positions`` layer runs (and the loss row
    of a training step)."""
    keys: list[RowKey] = [(None, r.name) for r in TOP_ROWS_BEFORE]
    for pos in range(n_positions):
        keys.extend((pos, r.name) for r in BLOCK_ROWS)
    keys.extend((None, r.name) for r in TOP_ROWS_AFTER)
    if loss:
        keys.append((None, LOSS_ROW_NAME))
    return keys


def row_for_module(fqn: str, position: Optional[int]) -> RowKey:
    """The row of the module at ``fqn`` in the model (``layers.14.attention.wq``) running at schedule
    ``position``. A module below a row's module (none today) belongs to the nearest row above it."""
    parts = fqn.split(".") if fqn else []
    if parts and parts[0] == LAYERS_PATH:
        if len(parts) < 2:
            raise ValueError(f"module {fqn!r} is the layer container, not a compute module")
        if position is None:
            raise ValueError(f"module {fqn!r} ran outside a schedule position")
        rel = parts[2:]
        while ".".join(rel) not in _BLOCK_BY_PATH:
            rel = rel[:-1]
        return (position, _BLOCK_BY_PATH[".".join(rel)].name)
    if parts and parts[0] in STATE_PATHS:
        raise ValueError(f"module {fqn!r} is runtime state (a KV cache), not a compute module")
    while ".".join(parts) not in _TOP_BY_PATH:
        parts = parts[:-1]
    return (None, _TOP_BY_PATH[".".join(parts)].name)
