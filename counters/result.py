"""What every counter returns: exact counts keyed by phase and (schedule position, row), each with its source.

Rows are the rows of :mod:`counters.table` (the same keys for every counter, so rows can be compared
key by key); a key missing from a counter's rows means zero for that counter.

**Phases.** One forward is one phase, ``forward``. A training step has ``forward`` and ``backward`` (the
*model* work) and, with activation checkpointing or a kernel that recomputes attention scores in its
backward, ``recompute``: work the hardware executes on top of the model work. A generation task has
``prefill`` and ``decode``.

**Sources.** Every counted number says where it comes from:

* ``formula`` - our closed form on sizes taken from the config (the ``analytic`` counter);
* ``shapes`` - our formula (a table kind's op decomposition, or an op registry formula built from the
  same primitives) on sizes read from the tensors of the real run;
* ``outside:<tool>`` - the count an outside tool's own code computes: ``outside:fvcore`` for fvcore's
  matrix-product handles, ``outside:torch`` for a formula registered in
  ``torch.utils.flop_counter`` (FlopCounterMode's, including its SDPA formulas).

Two numbers from the same source label are not independent evidence; :func:`independent_sources`
counts the distinct labels behind a row.

**Collectives.** A rank of a tensor-parallel model also communicates: ``collectives`` holds, per phase and
row, every :class:`counters.collectives.Collective` the counter saw and how many times (0 FLOPs; compared
across counters like the counts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

from .collectives import Collective
from .primitives import ZERO, Count
from .table import RowKey, row_order

__all__ = ["BACKWARD", "COUNTER_NAMES", "CounterResult", "DECODE", "EXECUTED_ONLY", "FORWARD", "KERNEL_RECOMPUTE",
           "PHASE_ORDER", "PREFILL", "QUANTITIES", "RECOMPUTE", "RowKey", "SOURCE_FORMULA", "SOURCE_SHAPES", "independent_sources",
           "outside", "row_order"]

COUNTER_NAMES = ("analytic", "hooks", "fvcore", "torch")
QUANTITIES = ("macs", "nonmatmul_flops")
SOURCE_FORMULA = "formula"
SOURCE_SHAPES = "shapes"
FORWARD, BACKWARD, RECOMPUTE = "forward", "backward", "recompute"
# A fused attention kernel's backward recomputes the scores QK^T (flash-style): seen only by a counter that
# sees the kernel's own formula (torch), and never model work.
KERNEL_RECOMPUTE = "kernel_recompute"
PREFILL, DECODE = "prefill", "decode"
#: Phases that are executed work but not model work (hardware FLOPs only).
EXECUTED_ONLY = frozenset({RECOMPUTE, KERNEL_RECOMPUTE})
#: Canonical phase order in reports.
PHASE_ORDER = (FORWARD, PREFILL, DECODE, BACKWARD, RECOMPUTE, KERNEL_RECOMPUTE)


def outside(tool: str) -> str:
    """The source label of a count computed by an outside tool's own code."""
    return f"outside:{tool}"


@dataclass
class CounterResult:
    """Exact per-phase, per-row counts from one counter, where each came from, and what it met but could
    not count.

    ``claims``: the ``(phase, quantity)`` pairs this counter measures; the cross-check compares it on
    exactly these (a counter reporting zero where another reports work is a disagreement, never "not
    counted"). ``None``: every phase it reports, both quantities.
    """

    name: str
    counts: dict[str, dict[RowKey, Count]] = field(default_factory=dict)  # phase -> row -> count
    sources: dict[str, dict[RowKey, dict[str, Count]]] = field(default_factory=dict)  # phase -> row -> source -> count
    # op name -> number of occurrences that no formula and no free-list entry covers (never counted as zero silently)
    unknown_ops: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    claims: Optional[frozenset] = None
    # phase -> row -> collective -> calls (a tensor-parallel rank's communication)
    collectives: dict[str, dict[RowKey, dict[Collective, int]]] = field(default_factory=dict)

    # ------------------------------------------------------------ filling
    def add(self, key: RowKey, count: Count, source: str, phase: str = FORWARD) -> None:
        rows = self.counts.setdefault(phase, {})
        rows[key] = rows.get(key, ZERO) + count
        if count != ZERO:
            per_row = self.sources.setdefault(phase, {}).setdefault(key, {})
            per_row[source] = per_row.get(source, ZERO) + count

    def add_collective(self, key: RowKey, collective: Collective, phase: str = FORWARD, calls: int = 1) -> None:
        per_row = self.collectives.setdefault(phase, {}).setdefault(key, {})
        per_row[collective] = per_row.get(collective, 0) + calls

    def row_collectives(self, key: RowKey, phase: str = FORWARD) -> dict[Collective, int]:
        return dict(self.collectives.get(phase, {}).get(key, {}))

    def ensure_rows(self, keys: Iterable[RowKey], phase: str = FORWARD) -> None:
        """Make every key present (at zero), in the given order, so reports list rows in execution order."""
        rows = self.counts.setdefault(phase, {})
        ordered = {k: rows.get(k, ZERO) for k in keys}
        ordered.update(rows)
        self.counts[phase] = ordered

    # ------------------------------------------------------------ reading
    @property
    def phases(self) -> tuple[str, ...]:
        return tuple(self.counts)

    @property
    def model_phases(self) -> tuple[str, ...]:
        return tuple(p for p in self.counts if p not in EXECUTED_ONLY)

    def claimed(self, phase: str, quantity: str) -> bool:
        if self.claims is None:
            return phase in self.counts
        return (phase, quantity) in self.claims

    def get(self, key: RowKey, phase: Optional[str] = None) -> Count:
        """One row: in ``phase``, or the model work (every phase but the executed-only ones)."""
        phases = self.model_phases if phase is None else (phase,)
        total = ZERO
        for p in phases:
            total = total + self.counts.get(p, {}).get(key, ZERO)
        return total

    @property
    def rows(self) -> dict[RowKey, Count]:
        """Row -> model work (all model phases summed), in the order rows were first reported."""
        keys = dict.fromkeys(k for p in self.model_phases for k in self.counts[p])
        return {k: self.get(k) for k in keys}

    def phase_total(self, phase: str) -> Count:
        total = ZERO
        for c in self.counts.get(phase, {}).values():
            total = total + c
        return total

    @property
    def total(self) -> Count:
        """The model work of every row."""
        total = ZERO
        for p in self.model_phases:
            total = total + self.phase_total(p)
        return total

    def source_totals(self, phase: Optional[str] = None) -> dict[str, Count]:
        """Source label -> everything this counter counted from that source (in ``phase``, or all model phases)."""
        out: dict[str, Count] = {}
        for p in (self.model_phases if phase is None else (phase,)):
            for per_row in self.sources.get(p, {}).values():
                for source, c in per_row.items():
                    out[source] = out.get(source, ZERO) + c
        return dict(sorted(out.items()))

    def position_total(self, position: Optional[int], phase: Optional[str] = None) -> Count:
        total = ZERO
        for p in (self.model_phases if phase is None else (phase,)):
            for (pos, _), c in self.counts.get(p, {}).items():
                if pos == position:
                    total = total + c
        return total


def independent_sources(results: Iterable[CounterResult], key: RowKey, quantity: str,
                        phase: str = FORWARD) -> list[str]:
    """The distinct source labels behind ``quantity`` of row ``key`` in ``phase`` among ``results`` (only
    sources that contributed a non-zero amount, and only counters that claim it)."""
    labels = set()
    for r in results:
        if not r.claimed(phase, quantity):
            continue
        for source, c in r.sources.get(phase, {}).get(key, {}).items():
            if getattr(c, quantity):
                labels.add(source)
    return sorted(labels)
