"""Run several counters on one model + input and prove they agree, row by row, exactly.

Counters: ``analytic`` (closed form from the config), ``hooks`` (module hooks on real shapes),
``fvcore`` and ``torch`` (op-level counters in :mod:`counters.fvcore_counter` /
:mod:`counters.torch_counter`, imported lazily: a counter whose module is missing is reported as
unavailable, never silently skipped when asked for).

For ``n_cached = C > 0`` the model gets a cache for ``C + N`` positions, an *uncounted* prefill of
``C`` tokens fills it, then every counter counts the same ``N``-token step at ``start_pos = C``
(each counted forward rewrites the same cache slots, so the counters see identical state).

Equality is exact integer equality, never a tolerance. MACs are compared for every counter;
non-matmul FLOPs for every counter that reports any (a counter that reports none does not count
them at all, and is shown as "not counted" rather than as zero).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .analytic import AnalyticReport, analyze, param_count
from .formulas import Count
from .result import COUNTER_NAMES, CounterResult, RowKey, row_order

logger = logging.getLogger(__name__)

# name -> (module, function) of the counters that run the model; "analytic" needs no model run.
COUNTER_FUNCTIONS: dict[str, tuple[str, str]] = {
    "hooks": ("counters.hooks", "count_hooks"),
    "fvcore": ("counters.fvcore_counter", "count_fvcore"),
    "torch": ("counters.torch_counter", "count_torch"),
}
QUANTITIES = ("macs", "nonmatmul_flops")


class CounterUnavailable(ValueError):
    """A requested counter cannot be imported (its module is missing or broken)."""


def load_counter(name: str) -> Callable[..., CounterResult]:
    """The ``count_*(model, tokens, start_pos=0, *, strict=False)`` function of a model-running counter."""
    if name not in COUNTER_FUNCTIONS:
        raise CounterUnavailable(f"unknown counter {name!r}; choose from {', '.join(COUNTER_NAMES)}")
    module_name, func_name = COUNTER_FUNCTIONS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise CounterUnavailable(f"counter {name!r} is unavailable: cannot import {module_name} ({e})") from None
    try:
        return getattr(module, func_name)
    except AttributeError:
        raise CounterUnavailable(f"counter {name!r} is unavailable: {module_name} has no {func_name}()") from None


def available_counters() -> list[str]:
    """Counters that can run here, in the canonical order."""
    names = ["analytic"]
    for name in COUNTER_FUNCTIONS:
        try:
            load_counter(name)
        except CounterUnavailable as e:
            logger.debug("%s", e)
            continue
        names.append(name)
    return [n for n in COUNTER_NAMES if n in names]


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
    macs: dict[str, int]  # counter -> MACs
    nonmatmul_flops: dict[str, Optional[int]]  # counter -> non-matmul FLOPs (None: counter does not count them)
    agree: bool

    @property
    def key(self) -> RowKey:
        return (self.position, self.module)


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
    nonmatmul_compared: list[str]
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

    def layer_runs(self) -> list[CrosscheckRow]:
        """Rows aggregated per schedule position (``module="block"``), top-level rows kept."""
        out: list[CrosscheckRow] = []
        by_pos: dict[int, list[CrosscheckRow]] = {}
        for r in self.rows:
            if r.position is None:
                continue
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
            macs = {c: sum(g.macs[c] for g in group) for c in self.counters}
            nonmm = {c: (None if c not in self.nonmatmul_compared else sum(g.nonmatmul_flops[c] for g in group))
                     for c in self.counters}
            out.append(CrosscheckRow(r.position, r.layer, "block", macs, nonmm, all(g.agree for g in group)))
        return out


def _prefill(model, batch: int, n_cached: int, n_tokens: int, device) -> None:
    model.setup_cache(batch, n_cached + n_tokens)
    prefill_tokens = torch.zeros((batch, n_cached), dtype=torch.long, device=device)
    with torch.no_grad():
        model(prefill_tokens, 0)


def crosscheck(model, tokens: torch.Tensor, *, n_cached: int = 0, counters: Optional[Sequence[str]] = None,
               strict: bool = False, compare_nonmatmul: Optional[Sequence[str]] = None,
               weight_dtype_bytes: int = 2, act_dtype_bytes: int = 2) -> CrosscheckReport:
    """Count one forward of ``tokens`` (shape ``(batch, N)``) after ``n_cached`` cached positions with
    each of ``counters`` (default: every available one) and compare them row by row.

    The first counter is the reference the others are compared with. ``compare_nonmatmul``: the
    counters whose non-matmul FLOPs are compared (default: every counter reporting any).
    Raises :class:`CounterUnavailable` for a requested counter that cannot be imported.
    The model's own KV cache (if any) is restored afterwards.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError("tokens must be a (batch, n_tokens) integer tensor")
    if isinstance(n_cached, bool) or not isinstance(n_cached, int) or n_cached < 0:
        raise ValueError(f"n_cached must be a non-negative int, got {n_cached!r}")
    names = list(available_counters() if counters is None else counters)
    if not names:
        raise ValueError("no counters to run")
    unknown = [n for n in names if n not in COUNTER_NAMES]
    if unknown:
        raise CounterUnavailable(f"unknown counter(s) {', '.join(unknown)}; choose from {', '.join(COUNTER_NAMES)}")
    funcs = {n: load_counter(n) for n in names if n != "analytic"}  # fail before any model work

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
    try:
        if n_cached > 0:
            _prefill(model, batch, n_cached, n_tokens, tokens.device)
        for name, func in funcs.items():
            logger.info("counting with %s", name)
            results[name] = func(model, tokens, n_cached, strict=strict)
    finally:
        model.caches = saved_caches

    return compare(results, schedule=schedule, config=config, batch=batch, n_tokens=n_tokens, n_cached=n_cached,
                   analytic=analytic_report, compare_nonmatmul=compare_nonmatmul, order=names)


def compare(results: dict[str, CounterResult], *, schedule: Sequence[int], config, batch: int, n_tokens: int,
            n_cached: int, analytic: Optional[AnalyticReport] = None,
            compare_nonmatmul: Optional[Sequence[str]] = None, order: Optional[Sequence[str]] = None) -> CrosscheckReport:
    """Build the per-row table of ``results`` and list every disagreement (pure, no model work)."""
    names = list(order or results)
    schedule = tuple(schedule)
    if compare_nonmatmul is None:
        compare_nonmatmul = [n for n in names if any(c.nonmatmul_flops for c in results[n].rows.values())]
    nonmm = [n for n in names if n in compare_nonmatmul]
    notes = [f"{n}: does not count non-matmul FLOPs (not compared)" for n in names if n not in nonmm]

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
        macs = {n: counts[n].macs for n in names}
        nonmatmul = {n: (counts[n].nonmatmul_flops if n in nonmm else None) for n in names}
        row_ok = True
        for quantity, values, compared in (("macs", macs, names), ("nonmatmul_flops", nonmatmul, nonmm)):
            if not compared:
                continue
            qref = compared[0]
            for n in compared[1:]:
                if values[n] != values[qref]:
                    row_ok = False
                    mismatches.append(Mismatch(key, quantity, qref, values[qref], n, values[n]))
        pos, module = key
        layer = schedule[pos] if pos is not None and 0 <= pos < len(schedule) else None
        rows.append(CrosscheckRow(pos, layer, module, macs, nonmatmul, row_ok))

    totals: dict[str, dict[str, Optional[int]]] = {}
    for n in names:
        t: Count = results[n].total
        totals[n] = {"macs": t.macs, "flops": t.flops, "nonmatmul_flops": t.nonmatmul_flops if n in nonmm else None}
    for quantity, compared in (("macs", names), ("nonmatmul_flops", nonmm)):
        for n in compared[1:]:
            if totals[n][quantity] != totals[compared[0]][quantity]:
                mismatches.append(Mismatch((None, "TOTAL"), quantity, compared[0], totals[compared[0]][quantity],
                                           n, totals[n][quantity]))
    for n in names:
        notes.extend(f"{n}: {note}" for note in results[n].notes)
    return CrosscheckReport(
        config=config, schedule=schedule, batch=batch, n_tokens=n_tokens, n_cached=n_cached, counters=names,
        results=results, analytic=analytic, params=param_count(config), rows=rows, totals=totals,
        nonmatmul_compared=nonmm, mismatches=mismatches,
        unknown_ops={n: dict(results[n].unknown_ops) for n in names}, notes=notes,
    )
