"""Run several counters on one model + input and prove they agree, row by row, exactly.

Counters: ``analytic`` (closed form from the config), ``hooks`` (module hooks on real shapes), ``fvcore``
and ``torch`` (op-level counters over the ops a forward really runs).

For ``n_cached = C > 0`` the model gets a cache for ``C + N`` positions, an *uncounted* prefill of
``C`` tokens fills it, then every counter counts the same ``N``-token step at ``start_pos = C``
(each counted forward rewrites the same cache slots, so the counters see identical state).

Equality is exact integer equality, never a tolerance. Every counter is compared on every quantity it
claims to count (:attr:`CounterResult.claims`), in every row and in total: a counter that reports zero
where another reports work disagrees.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .analytic import AnalyticReport, analyze, param_count
from .fvcore_counter import count_fvcore
from .hooks import count_hooks
from .primitives import Count
from .result import COUNTER_NAMES, QUANTITIES, CounterResult, RowKey, independent_sources
from .table import row_order
from .torch_counter import count_torch

logger = logging.getLogger(__name__)

#: The counters that run the model; ``analytic`` needs no model run.
COUNTER_FUNCTIONS: dict[str, Callable[..., CounterResult]] = {
    "hooks": count_hooks,
    "fvcore": count_fvcore,
    "torch": count_torch,
}


@dataclass(frozen=True)
class Mismatch:
    """One disagreement: ``counter`` reports ``got`` where ``reference`` reports ``expected``."""

    key: RowKey  # (position, module); (None, "TOTAL") for the totals
    quantity: str  # "macs" or "nonmatmul_flops"
    reference: str
    expected: int
    counter: str
    got: int

    def __str__(self) -> str:
        pos, module = self.key
        where = module if pos is None else f"run {pos} {module}"
        return (f"{where}: {self.quantity} {self.counter}={self.got:,} vs {self.reference}={self.expected:,} "
                f"(diff {self.got - self.expected:+,})")


@dataclass
class CrosscheckRow:
    position: Optional[int]
    layer: Optional[int]
    module: str
    macs: dict[str, Optional[int]]  # counter -> MACs (None: the counter does not claim MACs)
    nonmatmul_flops: dict[str, Optional[int]]  # counter -> non-matmul FLOPs (None: not claimed)
    agree: bool
    # quantity -> the distinct source labels behind it (see counters.result)
    sources: dict[str, list[str]] = field(default_factory=dict)

    @property
    def key(self) -> RowKey:
        return (self.position, self.module)

    def n_sources(self, quantity: str) -> int:
        return len(self.sources.get(quantity, ()))


@dataclass
class CrosscheckReport:
    config: object
    schedule: tuple[int, ...]
    batch: int
    n_tokens: int
    n_cached: int
    counters: list[str]
    results: dict[str, CounterResult]
    analytic: Optional[AnalyticReport]
    params: int
    rows: list[CrosscheckRow]
    totals: dict[str, dict[str, Optional[int]]]  # counter -> {"macs", "flops", "nonmatmul_flops"}
    compared: dict[str, list[str]]  # quantity -> counters compared on it
    mismatches: list[Mismatch]
    unknown_ops: dict[str, dict[str, int]]  # counter -> {op: occurrences}
    device: str = ""
    dtype: str = ""
    kernel: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def agree(self) -> bool:
        """Every compared quantity equal across counters, in every row and in total."""
        return not self.mismatches

    @property
    def complete(self) -> bool:
        """No counter met an op or module it has no formula for."""
        return not any(self.unknown_ops.values())

    @property
    def reference(self) -> str:
        """The counter whose numbers a table shows (the first one claiming both quantities)."""
        return next((n for n in self.counters if set(QUANTITIES) <= set(self.results[n].claims)), self.counters[0])

    def sources(self) -> dict[str, dict[str, dict[str, int]]]:
        """counter -> quantity -> source label -> amount, over the whole forward."""
        out = {}
        for n in self.counters:
            totals = self.results[n].source_totals()
            out[n] = {q: {s: getattr(c, q) for s, c in totals.items() if getattr(c, q)}
                      for q in self.results[n].claims}
        return out

    def layer_runs(self) -> list[CrosscheckRow]:
        """Rows aggregated per schedule position (``module="block"``), top-level rows kept. A block's
        sources are those behind every one of its rows that has work."""
        out: list[CrosscheckRow] = []
        by_pos: dict[int, list[CrosscheckRow]] = {}
        for r in self.rows:
            if r.position is not None:
                by_pos.setdefault(r.position, []).append(r)
        emitted = set()
        for r in self.rows:
            if r.position is None:
                out.append(r)
                continue
            if r.position in emitted:
                continue
            emitted.add(r.position)
            group = by_pos[r.position]
            sums = {}
            for q in QUANTITIES:
                sums[q] = {c: (None if c not in self.compared[q] else sum(getattr(g, q)[c] for g in group))
                           for c in self.counters}
            sources = {}
            for q in QUANTITIES:
                sets = [set(g.sources.get(q, ())) for g in group if g.sources.get(q)]
                sources[q] = sorted(set.intersection(*sets)) if sets else []
            out.append(CrosscheckRow(r.position, r.layer, "block", sums["macs"], sums["nonmatmul_flops"],
                                     all(g.agree for g in group), sources))
        return out


def _prefill(model, batch: int, n_cached: int, n_tokens: int, device) -> None:
    model.setup_cache(batch, n_cached + n_tokens)
    prefill_tokens = torch.zeros((batch, n_cached), dtype=torch.long, device=device)
    with torch.no_grad():
        model(prefill_tokens, 0)


def crosscheck(model, tokens: torch.Tensor, *, n_cached: int = 0, counters: Optional[Sequence[str]] = None,
               strict: bool = False, weight_dtype_bytes: int = 2, act_dtype_bytes: int = 2) -> CrosscheckReport:
    """Count one forward of ``tokens`` (shape ``(batch, N)``) after ``n_cached`` cached positions with
    each of ``counters`` (default: all four) and compare them row by row.

    The first counter is the reference the others are compared with. The model's own KV cache (if any)
    is restored afterwards.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError("tokens must be a (batch, n_tokens) integer tensor")
    if isinstance(n_cached, bool) or not isinstance(n_cached, int) or n_cached < 0:
        raise ValueError(f"n_cached must be a non-negative int, got {n_cached!r}")
    names = list(COUNTER_NAMES if counters is None else counters)
    if not names:
        raise ValueError("no counters to run")
    unknown = [n for n in names if n not in COUNTER_NAMES]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"bad counter list {names}: choose each at most once from {', '.join(COUNTER_NAMES)}")

    batch, n_tokens = tokens.shape
    config = model.config
    schedule = tuple(model.schedule)
    results: dict[str, CounterResult] = {}
    analytic_report = None
    if "analytic" in names:
        analytic_report = analyze(config, batch=batch, n_tokens=n_tokens, n_cached=n_cached, schedule=schedule,
                                  weight_dtype_bytes=weight_dtype_bytes, act_dtype_bytes=act_dtype_bytes)
        results["analytic"] = analytic_report.as_counter_result()

    saved_caches = model.caches
    # The RoPE table grows on demand; grow it now, so that no counted forward builds it.
    model.reserve_positions(n_cached + n_tokens)
    try:
        if n_cached > 0:
            _prefill(model, batch, n_cached, n_tokens, tokens.device)
        for name in names:
            if name != "analytic":
                logger.info("counting with %s", name)
                results[name] = COUNTER_FUNCTIONS[name](model, tokens, n_cached, strict=strict)
    finally:
        model.caches = saved_caches

    return compare(results, schedule=schedule, config=config, batch=batch, n_tokens=n_tokens, n_cached=n_cached,
                   analytic=analytic_report, order=names)


def compare(results: dict[str, CounterResult], *, schedule: Sequence[int], config, batch: int, n_tokens: int,
            n_cached: int, analytic: Optional[AnalyticReport] = None,
            order: Optional[Sequence[str]] = None) -> CrosscheckReport:
    """Build the per-row table of ``results`` and list every disagreement (pure, no model work).

    Each quantity is compared across every counter that claims it: the first such counter is the
    reference, and any other value, zero included, is a mismatch."""
    names = list(order or results)
    schedule = tuple(schedule)
    compared = {q: [n for n in names if q in results[n].claims] for q in QUANTITIES}
    notes = [f"{n}: does not measure {q} (not compared)" for q in QUANTITIES for n in names if n not in compared[q]]

    keys = row_order(len(schedule))
    known = set(keys)
    extra = sorted({k for r in results.values() for k in r.rows if k not in known},
                   key=lambda k: (-1 if k[0] is None else k[0], k[1]))
    for k in extra:
        notes.append(f"row {k} is outside the standard row set")
    mismatches: list[Mismatch] = []
    rows: list[CrosscheckRow] = []
    for key in keys + extra:
        counts = {n: results[n].get(key) for n in names}
        values = {q: {n: (getattr(counts[n], q) if n in compared[q] else None) for n in names} for q in QUANTITIES}
        row_ok = True
        for q in QUANTITIES:
            if not compared[q]:
                continue
            ref = compared[q][0]
            for n in compared[q][1:]:
                if values[q][n] != values[q][ref]:
                    row_ok = False
                    mismatches.append(Mismatch(key, q, ref, values[q][ref], n, values[q][n]))
        pos, module = key
        layer = schedule[pos] if pos is not None and 0 <= pos < len(schedule) else None
        sources = {q: independent_sources(results.values(), key, q) for q in QUANTITIES}
        rows.append(CrosscheckRow(pos, layer, module, values["macs"], values["nonmatmul_flops"], row_ok, sources))

    totals: dict[str, dict[str, Optional[int]]] = {}
    for n in names:
        t: Count = results[n].total
        claims = results[n].claims
        totals[n] = {"macs": t.macs if "macs" in claims else None,
                     "flops": t.flops if "macs" in claims else None,
                     "nonmatmul_flops": t.nonmatmul_flops if "nonmatmul_flops" in claims else None}
    for q in QUANTITIES:
        for n in compared[q][1:]:
            ref = compared[q][0]
            if totals[n][q] != totals[ref][q]:
                mismatches.append(Mismatch((None, "TOTAL"), q, ref, totals[ref][q], n, totals[n][q]))
    for n in names:
        notes.extend(f"{n}: {note}" for note in results[n].notes)
    return CrosscheckReport(
        config=config, schedule=schedule, batch=batch, n_tokens=n_tokens, n_cached=n_cached, counters=names,
        results=results, analytic=analytic, params=param_count(config), rows=rows, totals=totals,
        compared=compared, mismatches=mismatches,
        unknown_ops={n: dict(results[n].unknown_ops) for n in names}, notes=notes,
    )
