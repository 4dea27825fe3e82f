"""Closed-form counts for any config, batch, token count, cache length and layer schedule.

Everything here is built from :mod:`counters.formulas` (the conventions) and the config's shapes;
no model is built and no tensor is touched, so a 70B model costs the same microseconds as a tiny one.

Prefill and decode are the same formula: ``n_tokens`` new tokens attend to ``n_cached`` cached
positions plus themselves (dense ``n_tokens x (n_cached + n_tokens)`` score matrix per query head).

Bytes moved (a kernel-agnostic, "each tensor crosses memory once per use" model):

* ``weight_bytes`` - every weight a row uses, read once per *run* (a layer repeated in the schedule
  reads its weights again; a skipped layer reads nothing). The embedding reads only the rows it
  gathers (``batch * n_tokens`` rows of ``dim``), not the whole table.
* ``act_bytes`` - activations read and written by the row (for RoPE also the ``freqs_cis`` table
  slice, complex64; for the embedding the int64 token ids). The attention score matrix is *not*
  counted as traffic (fused / flash-style attention keeps it on chip).
* ``kv_read_bytes`` - the attention core reads keys and values of ``n_cached + n_tokens`` positions.
* ``kv_write_bytes`` - the ``attention`` row writes the new ``n_tokens`` keys and values to the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

from llama_ref.config import LlamaConfig
from llama_ref.schedule import ScheduleSpec, format_schedule, resolve_schedule

from . import formulas as F
from .formulas import Count
from .result import BLOCK_ROWS, TOP_ROWS_AFTER, TOP_ROWS_BEFORE, CounterResult, RowKey

# Bytes of one int64 token id, and of one complex64 entry of the RoPE table (fp32 real + fp32 imag).
TOKEN_ID_BYTES = 8
FREQS_CIS_ENTRY_BYTES = 8


@dataclass(frozen=True)
class RowCost:
    """Cost of one row (one module at one schedule position), in explicit units.

    ``flops_exact`` is the exact FLOP count of the row's matrix products (``M*N*(2K-1)``: K
    multiplies and K-1 adds per output); ``macs_causal`` counts only the attention score entries
    a causal mask keeps (equal to ``macs`` for every other row).
    """

    position: Optional[int]
    layer: Optional[int]
    module: str
    macs: int
    nonmatmul_flops: int
    weight_bytes: int = 0
    act_bytes: int = 0
    kv_read_bytes: int = 0
    kv_write_bytes: int = 0
    flops_exact: Optional[int] = None
    macs_causal: Optional[int] = None

    def __post_init__(self) -> None:
        if self.macs_causal is None:
            object.__setattr__(self, "macs_causal", self.macs)
        if self.flops_exact is None:
            if self.macs:
                raise ValueError(f"row {self.module!r} has {self.macs} MACs but no flops_exact")
            object.__setattr__(self, "flops_exact", 0)

    @property
    def key(self) -> RowKey:
        return (self.position, self.module)

    @property
    def count(self) -> Count:
        return Count(macs=self.macs, nonmatmul_flops=self.nonmatmul_flops)

    @property
    def flops(self) -> int:
        """Matrix-product FLOPs, 2 x MACs."""
        return self.count.flops

    @property
    def total_flops(self) -> int:
        """Matrix-product FLOPs plus non-matmul FLOPs."""
        return self.count.total_flops

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.act_bytes + self.kv_read_bytes + self.kv_write_bytes

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, total FLOPs per byte moved (0.0 for a row that does nothing)."""
        if self.bytes == 0:
            return 0.0 if self.total_flops == 0 else math.inf
        return self.total_flops / self.bytes

    def plus(self, other: "RowCost", *, position: Optional[int], layer: Optional[int], module: str) -> "RowCost":
        """Sum of two rows, relabelled."""
        return RowCost(
            position, layer, module,
            macs=self.macs + other.macs,
            nonmatmul_flops=self.nonmatmul_flops + other.nonmatmul_flops,
            weight_bytes=self.weight_bytes + other.weight_bytes,
            act_bytes=self.act_bytes + other.act_bytes,
            kv_read_bytes=self.kv_read_bytes + other.kv_read_bytes,
            kv_write_bytes=self.kv_write_bytes + other.kv_write_bytes,
            flops_exact=self.flops_exact + other.flops_exact,
            macs_causal=self.macs_causal + other.macs_causal,
        )

    def to_dict(self) -> dict:
        return {
            "position": self.position, "layer": self.layer, "module": self.module,
            "macs": self.macs, "flops": self.flops, "nonmatmul_flops": self.nonmatmul_flops,
            "total_flops": self.total_flops, "flops_exact": self.flops_exact, "macs_causal": self.macs_causal,
            "weight_bytes": self.weight_bytes, "act_bytes": self.act_bytes,
            "kv_read_bytes": self.kv_read_bytes, "kv_write_bytes": self.kv_write_bytes, "bytes": self.bytes,
            "intensity_flops_per_byte": self.intensity,
        }


def _sum_rows(rows: list[RowCost], *, position: Optional[int], layer: Optional[int], module: str) -> RowCost:
    total = RowCost(position, layer, module, 0, 0)
    for r in rows:
        total = total.plus(r, position=position, layer=layer, module=module)
    return total


@dataclass
class AnalyticReport:
    """Closed-form costs of one forward of ``n_tokens`` new tokens over ``n_cached`` cached ones."""

    config: LlamaConfig
    schedule: tuple[int, ...]
    batch: int
    n_tokens: int
    n_cached: int
    weight_dtype_bytes: int
    act_dtype_bytes: int
    kv_dtype_bytes: int
    rows: list[RowCost] = field(default_factory=list)

    @property
    def schedule_str(self) -> str:
        return format_schedule(self.schedule)

    @property
    def n_runs(self) -> int:
        """Number of decoder-layer runs (schedule positions)."""
        return len(self.schedule)

    def layer_runs(self) -> list[RowCost]:
        """Top-level rows before the blocks, one aggregated ``"block"`` row per schedule position,
        then the top-level rows after the blocks (execution order)."""
        before = [r for r in self.rows if r.position is None and r.module in TOP_ROWS_BEFORE]
        after = [r for r in self.rows if r.position is None and r.module in TOP_ROWS_AFTER]
        per_pos: dict[int, list[RowCost]] = {}
        for r in self.rows:
            if r.position is not None:
                per_pos.setdefault(r.position, []).append(r)
        blocks = [
            _sum_rows(per_pos[pos], position=pos, layer=self.schedule[pos], module="block")
            for pos in sorted(per_pos)
        ]
        return before + blocks + after

    @property
    def total(self) -> RowCost:
        return _sum_rows(self.rows, position=None, layer=None, module="total")

    # Totals in explicit units (shortcuts into ``total``).
    @property
    def macs(self) -> int:
        return self.total.macs

    @property
    def flops(self) -> int:
        return self.total.flops

    @property
    def nonmatmul_flops(self) -> int:
        return self.total.nonmatmul_flops

    @property
    def macs_causal(self) -> int:
        return self.total.macs_causal

    @property
    def flops_exact(self) -> int:
        return self.total.flops_exact

    @property
    def bytes(self) -> int:
        return self.total.bytes

    @property
    def params(self) -> int:
        """Parameters the model holds (all ``n_layers`` layers, whatever the schedule runs)."""
        return param_count(self.config)

    @property
    def kv_cache_bytes(self) -> int:
        """KV cache holding ``n_cached + n_tokens`` positions: one cache per schedule position
        (a repeated layer keeps separate keys per run, as ``Llama.setup_cache`` allocates)."""
        return kv_cache_bytes(self.config, batch=self.batch, n_positions=self.n_cached + self.n_tokens,
                              n_runs=self.n_runs, kv_dtype_bytes=self.kv_dtype_bytes)

    def as_counter_result(self) -> CounterResult:
        result = CounterResult(name="analytic")
        for r in self.rows:
            result.add(r.key, r.count)
        result.notes.append(
            f"closed form: batch={self.batch} n_tokens={self.n_tokens} n_cached={self.n_cached} "
            f"schedule={self.schedule_str}"
        )
        return result


# ---------------------------------------------------------------- parameters and cache size
def param_breakdown(config: LlamaConfig) -> dict[str, int]:
    """Exact parameter counts by tensor kind (totals over all layers); they sum to :func:`param_count`."""
    c = config
    q_out = c.n_heads * c.head_dim
    per_layer = {
        "attention.wq": c.dim * q_out,
        "attention.wk": c.dim * c.kv_dim,
        "attention.wv": c.dim * c.kv_dim,
        "attention.wo": q_out * c.dim,
        "feed_forward.w1": c.dim * c.hidden_dim,
        "feed_forward.w2": c.hidden_dim * c.dim,
        "feed_forward.w3": c.dim * c.hidden_dim,
        "attention_norm": c.dim,
        "ffn_norm": c.dim,
    }
    out = {"tok_embeddings": c.vocab_size * c.dim}
    out.update({f"layers.*.{name}": n * c.n_layers for name, n in per_layer.items()})
    out["norm"] = c.dim
    out["output"] = c.dim * c.vocab_size
    return out


def param_count(config: LlamaConfig) -> int:
    """Exact number of parameters (equals ``Llama(config, device="meta").num_params()``)."""
    return sum(param_breakdown(config).values())


def kv_cache_bytes(config: LlamaConfig, *, batch: int, n_positions: int, n_runs: Optional[int] = None,
                   kv_dtype_bytes: int = 2) -> int:
    """Keys + values: ``2 * batch * n_positions * n_kv_heads * head_dim`` elements per layer run."""
    n_runs = config.n_layers if n_runs is None else n_runs
    return 2 * batch * n_positions * config.kv_dim * kv_dtype_bytes * n_runs


# ---------------------------------------------------------------- rows
def _linear_row(name: str, rows: int, k: int, n: int, wb: int, ab: int) -> RowCost:
    return RowCost(
        None, None, name,
        macs=F.linear(rows, k, n).macs, nonmatmul_flops=0,
        weight_bytes=k * n * wb, act_bytes=(rows * k + rows * n) * ab,
        flops_exact=F.linear_exact_flops(rows, k, n),
    )


def _norm_row(name: str, rows: int, dim: int, wb: int, ab: int) -> RowCost:
    return RowCost(None, None, name, macs=0, nonmatmul_flops=F.rmsnorm(rows, dim).nonmatmul_flops,
                   weight_bytes=dim * wb, act_bytes=2 * rows * dim * ab)


def _block_template(c: LlamaConfig, batch: int, n: int, cached: int, wb: int, ab: int, kb: int) -> list[RowCost]:
    """The rows of one decoder-layer run (position/layer filled in by the caller), in BLOCK_ROWS order."""
    rows = batch * n
    kvlen = cached + n
    q_out = c.n_heads * c.head_dim
    core = F.attention_core(batch, c.n_heads, n, kvlen, c.head_dim)
    qk_rows = batch * c.n_heads * n  # one row of the score matrix per query head per token
    out = {
        "attention_norm": _norm_row("attention_norm", rows, c.dim, wb, ab),
        "attention.wq": _linear_row("attention.wq", rows, c.dim, q_out, wb, ab),
        "attention.wk": _linear_row("attention.wk", rows, c.dim, c.kv_dim, wb, ab),
        "attention.wv": _linear_row("attention.wv", rows, c.dim, c.kv_dim, wb, ab),
        "attention.rope": RowCost(
            None, None, "attention.rope", macs=0,
            nonmatmul_flops=F.rope(rows, c.n_heads, c.n_kv_heads, c.head_dim).nonmatmul_flops,
            act_bytes=2 * rows * (c.n_heads + c.n_kv_heads) * c.head_dim * ab
            + n * (c.head_dim // 2) * FREQS_CIS_ENTRY_BYTES,
        ),
        "attention.core": RowCost(
            None, None, "attention.core", macs=core.macs, nonmatmul_flops=core.nonmatmul_flops,
            act_bytes=2 * rows * q_out * ab,  # q in, attention output out
            kv_read_bytes=2 * batch * kvlen * c.kv_dim * kb,
            # QK^T: (qk_rows x head_dim) @ (head_dim x kvlen); A V: (qk_rows x kvlen) @ (kvlen x head_dim)
            flops_exact=F.linear_exact_flops(qk_rows, c.head_dim, kvlen) + F.linear_exact_flops(qk_rows, kvlen, c.head_dim),
            macs_causal=F.attention_core_causal_macs(batch, c.n_heads, n, cached, c.head_dim),
        ),
        "attention.wo": _linear_row("attention.wo", rows, q_out, c.dim, wb, ab),
        # Ops run directly in Attention.forward: views and the KV-cache write.
        "attention": RowCost(None, None, "attention", macs=0, nonmatmul_flops=0,
                             kv_write_bytes=2 * rows * c.kv_dim * kb),
        "ffn_norm": _norm_row("ffn_norm", rows, c.dim, wb, ab),
        "feed_forward.w1": _linear_row("feed_forward.w1", rows, c.dim, c.hidden_dim, wb, ab),
        "feed_forward.w3": _linear_row("feed_forward.w3", rows, c.dim, c.hidden_dim, wb, ab),
        "feed_forward.act": RowCost(
            None, None, "feed_forward.act", macs=0,
            nonmatmul_flops=F.gated_silu(rows, c.hidden_dim).nonmatmul_flops,
            act_bytes=3 * rows * c.hidden_dim * ab,  # gate and up in, product out
        ),
        "feed_forward.w2": _linear_row("feed_forward.w2", rows, c.hidden_dim, c.dim, wb, ab),
        "feed_forward": RowCost(None, None, "feed_forward", macs=0, nonmatmul_flops=0),
        # Two residual adds, each reading two (rows x dim) tensors and writing one.
        "residual": RowCost(None, None, "residual", macs=0, nonmatmul_flops=F.residuals(rows, c.dim).nonmatmul_flops,
                            act_bytes=2 * 3 * rows * c.dim * ab),
    }
    if tuple(out) != BLOCK_ROWS:
        raise AssertionError(f"analytic block rows {tuple(out)} out of sync with result.BLOCK_ROWS {BLOCK_ROWS}")
    return list(out.values())


def _top_rows(c: LlamaConfig, batch: int, n: int, wb: int, ab: int) -> tuple[list[RowCost], list[RowCost]]:
    rows = batch * n
    before = {
        # Mask building and RoPE-table slicing in Llama.forward: no arithmetic.
        "(root)": RowCost(None, None, "(root)", macs=0, nonmatmul_flops=0),
        # A table lookup: 0 MACs by convention (formulas.embedding); it gathers `rows` rows of the table.
        "tok_embeddings": RowCost(
            None, None, "tok_embeddings", macs=F.embedding(rows, c.dim).macs,
            nonmatmul_flops=F.embedding(rows, c.dim).nonmatmul_flops,
            weight_bytes=rows * c.dim * wb, act_bytes=rows * TOKEN_ID_BYTES + rows * c.dim * ab,
        ),
    }
    after = {
        "norm": _norm_row("norm", rows, c.dim, wb, ab),
        "output": _linear_row("output", rows, c.dim, c.vocab_size, wb, ab),
    }
    if tuple(before) != TOP_ROWS_BEFORE or tuple(after) != TOP_ROWS_AFTER:
        raise AssertionError("analytic top-level rows out of sync with result.TOP_ROWS_BEFORE/AFTER")
    return list(before.values()), list(after.values())


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def analyze(config: LlamaConfig, *, batch: int = 1, n_tokens: int, n_cached: int = 0,
            schedule: ScheduleSpec = None, weight_dtype_bytes: int = 2, act_dtype_bytes: int = 2,
            kv_dtype_bytes: Optional[int] = None) -> AnalyticReport:
    """Closed-form per-row costs of one forward of ``n_tokens`` new tokens (per sequence, ``batch``
    sequences) after ``n_cached`` cached positions, running the layers of ``schedule``.

    ``kv_dtype_bytes`` defaults to ``act_dtype_bytes`` (the model caches in its compute dtype).
    Positions beyond ``config.max_seq_len`` are not refused: the formulas hold for any length.
    """
    if not isinstance(config, LlamaConfig):
        raise ValueError(f"config must be a LlamaConfig, got {type(config).__name__}")
    _check_int("batch", batch, 1)
    _check_int("n_tokens", n_tokens, 1)
    _check_int("n_cached", n_cached, 0)
    _check_int("weight_dtype_bytes", weight_dtype_bytes, 1)
    _check_int("act_dtype_bytes", act_dtype_bytes, 1)
    kv_dtype_bytes = act_dtype_bytes if kv_dtype_bytes is None else _check_int("kv_dtype_bytes", kv_dtype_bytes, 1)
    order = resolve_schedule(schedule, config.n_layers)
    template = _block_template(config, batch, n_tokens, n_cached, weight_dtype_bytes, act_dtype_bytes, kv_dtype_bytes)
    before, after = _top_rows(config, batch, n_tokens, weight_dtype_bytes, act_dtype_bytes)
    rows = list(before)
    for pos, layer in enumerate(order):
        rows.extend(replace(r, position=pos, layer=layer) for r in template)
    rows.extend(after)
    return AnalyticReport(config, order, batch, n_tokens, n_cached, weight_dtype_bytes, act_dtype_bytes,
                          kv_dtype_bytes, rows)


def macs_polynomial(config: LlamaConfig, schedule: ScheduleSpec = None) -> tuple[int, int]:
    """``(a, b)`` with MACs of one forward of N tokens (batch 1, empty cache) = ``a*N + b*N**2`` exactly.

    ``a`` is the linear part (projections, MLP, output head) per token; ``b`` the dense attention
    (QK^T and attention x V over the N x N score matrix of every query head) per token squared.
    """
    c = config
    order = resolve_schedule(schedule, c.n_layers)
    q_out = c.n_heads * c.head_dim
    per_run_linear = (
        F.linear(1, c.dim, q_out) + F.linear(1, c.dim, c.kv_dim) + F.linear(1, c.dim, c.kv_dim)
        + F.linear(1, q_out, c.dim) + F.linear(1, c.dim, c.hidden_dim) + F.linear(1, c.dim, c.hidden_dim)
        + F.linear(1, c.hidden_dim, c.dim)
    ).macs
    per_run_attention = F.attention_core(1, c.n_heads, 1, 1, c.head_dim).macs  # coefficient of N^2
    a = len(order) * per_run_linear + F.linear(1, c.dim, c.vocab_size).macs + F.embedding(1, c.dim).macs
    b = len(order) * per_run_attention
    return a, b
