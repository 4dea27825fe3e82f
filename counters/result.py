"""What every counter returns: exact counts keyed by (schedule position, row), each with its source.

Rows are the rows of :mod:`counters.table` (the same keys for every counter, so rows can be compared
key by key); a key missing from a counter's rows means zero for that counter.

**Sources.** Every counted number says where it comes from:

* ``formula`` - our closed form on sizes taken from the config (the ``analytic`` counter);
* ``shapes`` - our formula (a table kind's op decomposition, or an op registry formula built from the
  same primitives) on sizes read from the tensors of the real run;
* ``outside:<tool>`` - the count an outside tool's own code computes: ``outside:fvcore`` for fvcore's
  matrix-product handles, ``outside:torch`` for a formula registered in
  ``torch.utils.flop_counter`` (FlopCounterMode's, including its SDPA formula).

Two numbers from the same source label are not independent evidence; :func:`independent_sources`
counts the distinct labels behind a row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

from .primitives import ZERO, Count
from .table import RowKey, row_order

__all__ = ["COUNTER_NAMES", "CounterResult", "QUANTITIES", "RowKey", "SOURCE_FORMULA", "SOURCE_SHAPES",
           "independent_sources", "outside", "row_order"]

COUNTER_NAMES = ("analytic", "hooks", "fvcore", "torch")
QUANTITIES = ("macs", "nonmatmul_flops")
SOURCE_FORMULA = "formula"
SOURCE_SHAPES = "shapes"


def outside(tool: str) -> str:
    """The source label of a count computed by an outside tool's own code."""
    return f"outside:{tool}"


@dataclass
class CounterResult:
    """Exact per-row counts from one counter, where each came from, and what it met but could not count.

    ``claims``: the quantities this counter measures; the cross-check compares it on exactly these
    (a counter reporting zero where another reports work is a disagreement, never "not counted").
    """

    name: str
    rows: dict[RowKey, Count] = field(default_factory=dict)
    sources: dict[RowKey, dict[str, Count]] = field(default_factory=dict)
    # op name -> number of occurrences that no formula and no free-list entry covers (never counted as zero silently)
    unknown_ops: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    claims: tuple[str, ...] = QUANTITIES

    def add(self, key: RowKey, count: Count, source: str) -> None:
        if count == ZERO:
            self.rows.setdefault(key, ZERO)
            return
        self.rows[key] = self.rows.get(key, ZERO) + count
        per_row = self.sources.setdefault(key, {})
        per_row[source] = per_row.get(source, ZERO) + count

    def get(self, key: RowKey) -> Count:
        return self.rows.get(key, ZERO)

    @property
    def total(self) -> Count:
        total = ZERO
        for c in self.rows.values():
            total = total + c
        return total

    def source_totals(self) -> dict[str, Count]:
        """Source label -> everything this counter counted from that source."""
        out: dict[str, Count] = {}
        for per_row in self.sources.values():
            for source, c in per_row.items():
                out[source] = out.get(source, ZERO) + c
        return dict(sorted(out.items()))

    def position_total(self, position: Optional[int]) -> Count:
        total = ZERO
        for (pos, _), c in self.rows.items():
            if pos == position:
                total = total + c
        return total


def independent_sources(results: Iterable[CounterResult], key: RowKey, quantity: str) -> list[str]:
    """The distinct source labels behind ``quantity`` of row ``key`` among ``results`` (only sources that
    contributed a non-zero amount, and only counters that claim the quantity)."""
    labels = set()
    for r in results:
        if quantity not in r.claims:
            continue
        for source, c in r.sources.get(key, {}).items():
            if getattr(c, quantity):
                labels.add(source)
    return sorted(labels)
