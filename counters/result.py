"""What every counter returns: exact counts keyed by (schedule position, module).

Row naming (the same for all counters, so rows can be compared key by key):

* top-level modules: ``(None, "tok_embeddings")``, ``(None, "norm")``, ``(None, "output")``;
  ops run directly in ``Llama.forward`` (mask building, RoPE table slicing) go to ``(None, "(root)")``.
* decoder-layer runs: ``(position, name)`` where ``position`` indexes the schedule (a layer run
  twice has two positions) and ``name`` is one of :data:`BLOCK_ROWS`. Ops run directly in a
  block's forward (the residual adds) go to ``"residual"``; ops run directly in ``Attention`` /
  ``FeedForward`` (views, cache writes) go to ``"attention"`` / ``"feed_forward"``.

A key missing from a counter's rows means zero for that counter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .formulas import ZERO, Count

RowKey = tuple[Optional[int], str]

BLOCK_ROWS = (
    "attention_norm",
    "attention.wq",
    "attention.wk",
    "attention.wv",
    "attention.rope",
    "attention.core",
    "attention.wo",
    "attention",
    "ffn_norm",
    "feed_forward.w1",
    "feed_forward.w3",
    "feed_forward.act",
    "feed_forward.w2",
    "feed_forward",
    "residual",
)
TOP_ROWS_BEFORE = ("(root)", "tok_embeddings")
TOP_ROWS_AFTER = ("norm", "output")
COUNTER_NAMES = ("analytic", "hooks", "fvcore", "torch")


def row_order(n_positions: int) -> list[RowKey]:
    """All row keys in execution order for a schedule of ``n_positions`` layer runs."""
    keys: list[RowKey] = [(None, n) for n in TOP_ROWS_BEFORE]
    for pos in range(n_positions):
        keys.extend((pos, n) for n in BLOCK_ROWS)
    keys.extend((None, n) for n in TOP_ROWS_AFTER)
    return keys


def row_for_module(fqn: str, position: Optional[int]) -> RowKey:
    """Row of a module given its name in the model (``layers.14.attention.wq``) and the schedule
    position it is running at. Names below a leaf row (none today) fold into that row."""
    if fqn == "":
        return (None, "(root)")
    parts = fqn.split(".")
    if parts[0] == "layers":
        if position is None:
            raise ValueError(f"module {fqn!r} ran outside a schedule position")
        rel = parts[2:]
        if not rel:
            return (position, "residual")
        name = ".".join(rel[:2])
        return (position, name if name in BLOCK_ROWS else rel[0])
    if parts[0] == "caches":
        raise ValueError(f"KV-cache module {fqn!r} is not a compute module")
    return (None, parts[0])


@dataclass
class CounterResult:
    """Exact per-row counts from one counter, plus what it met and could not count."""

    name: str
    rows: dict[RowKey, Count] = field(default_factory=dict)
    # op name -> number of occurrences that no formula and no free-list entry covers (never counted as zero silently)
    unknown_ops: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, key: RowKey, count: Count) -> None:
        self.rows[key] = self.rows.get(key, ZERO) + count

    def get(self, key: RowKey) -> Count:
        return self.rows.get(key, ZERO)

    @property
    def total(self) -> Count:
        total = ZERO
        for c in self.rows.values():
            total = total + c
        return total

    def position_total(self, position: Optional[int]) -> Count:
        total = ZERO
        for (pos, _), c in self.rows.items():
            if pos == position:
                total = total + c
        return total
