"""Closed-form counts for any config, batch, token count, cache length and layer schedule.

Every row of :mod:`counters.table` evaluated on sizes from the config (source ``formula``): no model is
built and no tensor is touched, so a 70B model costs the same microseconds as a tiny one.

Prefill and decode are the same formula: ``seqlen`` new tokens attend to ``start_pos`` cached
positions plus themselves (dense ``seqlen x (start_pos + seqlen)`` score matrix per query head).

Bytes moved (a kernel-agnostic, "each tensor crosses memory once per use" model):

* ``weight_bytes`` - every weight a row uses, read once per *run* (a layer repeated in the schedule
  reads its weights again; a skipped layer reads nothing). For the embedding this is only the rows it
  gathers (``batch * seqlen`` rows of ``dim``), not the whole table.
* ``act_bytes`` - activations read and written by the row (for RoPE also the ``freqs_cis`` table
  slice, complex64; for the embedding the int64 token ids). The attention score matrix is *not*
  counted as traffic (fused / flash-style attention keeps it on chip).
* ``kv_read_bytes`` - the attention core reads keys and values of ``start_pos + seqlen`` positions.
* ``kv_write_bytes`` - the ``attention`` row writes the new ``seqlen`` keys and values to the cache.

Tensor parallelism (``tp=N``): the same rows with one rank's sizes (:class:`counters.table.Dims`; every
rank of Meta's layout has the same), and the collectives each rank runs per row (``collectives``: 0 FLOPs,
their bytes in :class:`counters.collectives.Collective`). Bytes are per rank: its weight shards, its
activations, its share of the KV cache; communication is not in them (it crosses a link, not memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

from llama_ref.config import LlamaConfig
from llama_ref.shapes import kv_cache_bytes, param_count  # noqa: F401  (the shape algebra's, re-exported)
from llama_ref.schedule import ScheduleSpec, format_schedule, resolve_schedule

from . import table as T
from .collectives import Collective
from .primitives import ZERO, Count, matmul_exact_flops
from .result import BACKWARD, FORWARD, RECOMPUTE, SOURCE_FORMULA, CounterResult, RowKey
from .training import Training


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

    def to_dict(self) -> dict:
        return {
            "position": self.position, "layer": self.layer, "module": self.module,
            "macs": self.macs, "flops": self.flops, "nonmatmul_flops": self.nonmatmul_flops,
            "total_flops": self.total_flops, "flops_exact": self.flops_exact, "macs_causal": self.macs_causal,
            "weight_bytes": self.weight_bytes, "act_bytes": self.act_bytes,
            "kv_read_bytes": self.kv_read_bytes, "kv_write_bytes": self.kv_write_bytes, "bytes": self.bytes,
            "intensity_flops_per_byte": self.intensity,
        }


_SUMMED = ("macs", "nonmatmul_flops", "weight_bytes", "act_bytes", "kv_read_bytes", "kv_write_bytes",
           "flops_exact", "macs_causal")


def sum_rows(rows: list[RowCost], *, position: Optional[int], layer: Optional[int], module: str) -> RowCost:
    """The sum of ``rows``, labelled as one row."""
    return RowCost(position, layer, module, **{f: sum(getattr(r, f) for r in rows) for f in _SUMMED})


def row_cost(row: T.Row, config, shape: T.RunShape, dtypes: T.Dtypes) -> RowCost:
    """One table row evaluated on sizes from the config, or from one rank's :class:`~counters.table.Dims`
    (position and layer filled in by the caller)."""
    sizes = row.sizes(config, shape)
    ops = row.kind.ops(sizes)
    count = ZERO
    for op in ops:
        count = count + op.count
    nbytes = row.kind.bytes(sizes, dtypes)
    exact = sum(matmul_exact_flops(*op.mm) for op in ops if op.mm is not None)
    causal = row.kind.macs_causal(sizes) if row.kind.macs_causal is not None else None
    return RowCost(None, None, row.name, macs=count.macs, nonmatmul_flops=count.nonmatmul_flops,
                   weight_bytes=nbytes.weight, act_bytes=nbytes.act, kv_read_bytes=nbytes.kv_read,
                   kv_write_bytes=nbytes.kv_write, flops_exact=exact, macs_causal=causal)


@dataclass
class AnalyticReport:
    """Closed-form costs of one forward of ``seqlen`` new tokens over ``start_pos`` cached ones."""

    config: LlamaConfig
    schedule: tuple[int, ...]
    batch: int
    seqlen: int
    start_pos: int
    weight_dtype_bytes: int
    act_dtype_bytes: int
    kv_dtype_bytes: int
    rows: list[RowCost] = field(default_factory=list)
    tp: Optional[int] = None  # a rank of a tp-way tensor-parallel model (None: one process, the whole model)
    collectives: dict[RowKey, dict[Collective, int]] = field(default_factory=dict)  # per rank

    @property
    def dims(self) -> T.Dims:
        return T.Dims(self.config, self.tp)

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
        per_pos: dict[int, list[RowCost]] = {}
        for r in self.rows:
            if r.position is not None:
                per_pos.setdefault(r.position, []).append(r)
        before = [r for r in self.rows if r.position is None and r.module in _BEFORE]
        after = [r for r in self.rows if r.position is None and r.module not in _BEFORE]
        blocks = [sum_rows(per_pos[pos], position=pos, layer=self.schedule[pos], module="block")
                  for pos in sorted(per_pos)]
        return before + blocks + after

    @property
    def total(self) -> RowCost:
        return sum_rows(self.rows, position=None, layer=None, module="total")

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
        """KV cache holding ``start_pos + seqlen`` positions: one cache per schedule position
        (a repeated layer keeps separate keys per run, as ``Llama.setup_cache`` allocates); a rank's share
        (its kv heads) under tensor parallelism."""
        return kv_cache_bytes(self.config, batch=self.batch, n_positions=self.start_pos + self.seqlen,
                              n_runs=self.n_runs, kv_dtype_bytes=self.kv_dtype_bytes, n_kv_heads=self.dims.n_kv_heads)

    def as_counter_result(self) -> CounterResult:
        result = CounterResult(name="analytic")
        for r in self.rows:
            result.add(r.key, r.count, SOURCE_FORMULA)
        for key, per_row in self.collectives.items():
            for c, calls in per_row.items():
                result.add_collective(key, c, calls=calls)
        result.notes.append(
            f"closed form: batch={self.batch} seqlen={self.seqlen} start_pos={self.start_pos} "
            f"schedule={self.schedule_str}" + ("" if self.tp is None else f" tp={self.tp} (one rank's share)")
        )
        return result


_BEFORE = frozenset(r.name for r in T.TOP_ROWS_BEFORE)


# ---------------------------------------------------------------- parameters and cache size
def param_breakdown(config: LlamaConfig) -> dict[str, int]:
    """Exact parameter counts by tensor kind (totals over all layers), from the table's rows; they sum to
    :func:`param_count`. A tied output head holds no parameters of its own (it is the embedding)."""
    out = {r.name: r.params(config) for r in T.TOP_ROWS_BEFORE if r.params(config)}
    out.update({f"layers.*.{r.name}": r.params(config) * config.n_layers for r in T.BLOCK_ROWS if r.params(config)})
    out.update({r.name: r.params(config) for r in T.TOP_ROWS_AFTER if r.params(config)})
    return out


# ---------------------------------------------------------------- the forward
def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def analyze(config: LlamaConfig, *, batch: int = 1, seqlen: int, start_pos: int = 0,
            schedule: ScheduleSpec = None, weight_dtype_bytes: int = 2, act_dtype_bytes: int = 2,
            kv_dtype_bytes: Optional[int] = None, tp: Optional[int] = None, last_only: bool = False) -> AnalyticReport:
    """Closed-form per-row costs of one forward of ``seqlen`` new tokens (per sequence, ``batch``
    sequences) after ``start_pos`` cached positions, running the layers of ``schedule``; ``last_only``: the
    output head on each sequence's last position only (``Llama.forward(..., last_only=True)``).

    ``kv_dtype_bytes`` defaults to ``act_dtype_bytes`` (the model caches in its compute dtype).
    Positions beyond ``config.max_seq_len`` are not refused: the formulas hold for any length.

    ``tp=N``: the costs of one rank of an N-way tensor-parallel model (Meta's layout; every rank the same)
    and its collectives; a world size that does not divide the model raises ``TPLayout``'s ValueError.
    """
    if not isinstance(config, LlamaConfig):
        raise ValueError(f"config must be a LlamaConfig, got {type(config).__name__}")
    _check_int("batch", batch, 1)
    _check_int("seqlen", seqlen, 1)
    _check_int("start_pos", start_pos, 0)
    _check_int("weight_dtype_bytes", weight_dtype_bytes, 1)
    _check_int("act_dtype_bytes", act_dtype_bytes, 1)
    kv_dtype_bytes = act_dtype_bytes if kv_dtype_bytes is None else _check_int("kv_dtype_bytes", kv_dtype_bytes, 1)
    order = resolve_schedule(schedule, config.n_layers)
    dims = T.Dims(config, tp)
    shape = T.RunShape(batch, seqlen, start_pos, bool(last_only))
    dtypes = T.Dtypes(weight_dtype_bytes, act_dtype_bytes, kv_dtype_bytes)
    block = [row_cost(r, dims, shape, dtypes) for r in T.BLOCK_ROWS]  # every run costs the same
    rows = [row_cost(r, dims, shape, dtypes) for r in T.TOP_ROWS_BEFORE]
    for pos, layer in enumerate(order):
        rows.extend(replace(r, position=pos, layer=layer) for r in block)
    rows.extend(row_cost(r, dims, shape, dtypes) for r in T.TOP_ROWS_AFTER)
    collectives: dict[RowKey, dict[Collective, int]] = {}
    for key, row in _keyed_rows(len(order)):
        for c in row.collectives(dims, shape, dtypes):
            per_row = collectives.setdefault(key, {})
            per_row[c] = per_row.get(c, 0) + 1
    return AnalyticReport(config, order, batch, seqlen, start_pos, weight_dtype_bytes, act_dtype_bytes,
                          kv_dtype_bytes, rows, tp, collectives)


def _keyed_rows(n_positions: int) -> list[tuple[RowKey, T.Row]]:
    """(row key, table row) of one forward, in execution order."""
    out: list[tuple[RowKey, T.Row]] = [((None, r.name), r) for r in T.TOP_ROWS_BEFORE]
    for pos in range(n_positions):
        out.extend(((pos, r.name), r) for r in T.BLOCK_ROWS)
    out.extend(((None, r.name), r) for r in T.TOP_ROWS_AFTER)
    return out


def macs_polynomial(config: LlamaConfig, schedule: ScheduleSpec = None) -> tuple[int, int]:
    """``(a, b)`` with MACs of one forward of N tokens (batch 1, empty cache) = ``a*N + b*N**2`` exactly.

    ``a`` is the linear part (projections, MLP, output head) per token; ``b`` the dense attention
    (QK^T and attention x V over the N x N score matrix of every query head) per token squared.
    Both come from the table: MACs at N=1 and N=2 (with ``M(N) = a*N + b*N^2``) determine them.
    """
    order = resolve_schedule(schedule, config.n_layers)
    m1 = analyze(config, seqlen=1, schedule=order).macs
    m2 = analyze(config, seqlen=2, schedule=order).macs
    # m1 = a + b, m2 = 2a + 4b  ->  b = (m2 - 2 m1) / 2
    b, rem = divmod(m2 - 2 * m1, 2)
    a = m1 - b
    m3 = analyze(config, seqlen=3, schedule=order).macs
    if rem or m3 != 3 * a + 9 * b:  # pragma: no cover - a row's MACs would not be of the form a*N + b*N^2
        raise ArithmeticError(f"MACs {m1}, {m2}, {m3} (N=1, 2, 3) are not of the form a*N + b*N^2")
    return a, b


# ---------------------------------------------------------------- a training step
@dataclass(frozen=True)
class TrainingRow:
    """One row of a training step: the model work of its forward and backward, and the work executed again
    by activation checkpointing (``recompute``)."""

    position: Optional[int]
    layer: Optional[int]
    module: str
    forward: Count
    backward: Count
    recompute: Count = ZERO

    @property
    def key(self) -> RowKey:
        return (self.position, self.module)

    @property
    def model(self) -> Count:
        return self.forward + self.backward


@dataclass
class TrainingReport:
    """Closed-form costs of one training step (forward + loss + backward) of ``batch`` sequences of
    ``seqlen`` tokens, running the layers of ``schedule``."""

    config: LlamaConfig
    schedule: tuple[int, ...]
    batch: int
    seqlen: int
    training: Training
    rows: list[TrainingRow]

    def phase_total(self, phase: str) -> Count:
        total = ZERO
        for r in self.rows:
            total = total + getattr(r, phase)
        return total

    @property
    def total(self) -> Count:
        """Model work: forward + backward (the loss row included)."""
        return self.phase_total(FORWARD) + self.phase_total(BACKWARD)

    def as_counter_result(self) -> CounterResult:
        result = CounterResult(name="analytic")
        phases = (FORWARD, BACKWARD) + ((RECOMPUTE,) if self.training.recompute else ())
        for phase in phases:
            for r in self.rows:
                result.add(r.key, getattr(r, phase), SOURCE_FORMULA, phase)
        result.notes.append(f"closed form of a training step: batch={self.batch} seqlen={self.seqlen} "
                            f"loss={self.training.loss} recompute={self.training.recompute} "
                            f"schedule={format_schedule(self.schedule)}")
        return result


def _param_owner(row: T.Row, layer: Optional[int], config: LlamaConfig):
    """Which parameters a row's module uses (None: it has none): one key per distinct weight tensor."""
    if not row.params(config) and not (row.name == "output" and config.tie_word_embeddings):
        return None
    if row.name == "output" and config.tie_word_embeddings:
        return (None, "tok_embeddings")  # the tied head is the embedding's matrix
    return (layer, row.name)


def analyze_training(config: LlamaConfig, *, batch: int = 1, seqlen: int, schedule: ScheduleSpec = None,
                     training: Training = Training()) -> TrainingReport:
    """Closed-form per-row costs of one training step: every row's forward (as :func:`analyze`), its
    backward as autograd runs it (the table's backward ops and each row's own gradient adds), the loss,
    and with ``training.recompute`` one more forward of every decoder-layer run.

    A weight used more than once in a step (a layer the schedule repeats; a tied embedding/head) has its
    gradients added: one add of its size per use but the last, in the backward of that use (autograd's
    backward runs the last use first)."""
    if not isinstance(training, Training):
        raise ValueError(f"training must be a Training, got {type(training).__name__}")
    forward = analyze(config, batch=batch, seqlen=seqlen, schedule=schedule)
    order = forward.schedule
    shape = T.RunShape(batch, seqlen, 0)
    uses: list[tuple[RowKey, Optional[tuple], T.Row]] = []  # (row key, param owner, row), forward order
    for r in T.TOP_ROWS_BEFORE:
        uses.append(((None, r.name), _param_owner(r, None, config), r))
    for pos, layer in enumerate(order):
        for r in T.BLOCK_ROWS:
            uses.append(((pos, r.name), _param_owner(r, layer, config), r))
    for r in T.TOP_ROWS_AFTER:
        uses.append(((None, r.name), _param_owner(r, None, config), r))
    last_use = {owner: i for i, (_, owner, _) in enumerate(uses) if owner is not None}
    param_size = {r.name: r.params(config) for r in T.TOP_ROWS_BEFORE + T.BLOCK_ROWS + T.TOP_ROWS_AFTER}
    by_key = {r.key: r for r in forward.rows}
    rows = []
    for i, (key, owner, row) in enumerate(uses):
        sizes = row.sizes(config, shape)
        backward = T.sum_ops(row.backward_ops(sizes))
        if owner is not None and last_use[owner] > i:
            backward = backward + T.sum_ops((T._ew("add", param_size[owner[1]]),))
        f = by_key[key]
        recompute = f.count if (training.recompute and key[0] is not None) else ZERO
        rows.append(TrainingRow(f.position, f.layer, f.module, f.count, backward, recompute))
    loss = T.loss_row(training.loss)
    sizes = loss.sizes(config, shape)
    rows.append(TrainingRow(None, None, loss.name, loss.kind.count(sizes), T.sum_ops(loss.backward_ops(sizes))))
    return TrainingReport(config, order, batch, seqlen, training, rows)
