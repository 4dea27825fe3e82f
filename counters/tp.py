"""Counting a tensor-parallel model: every rank counted by every counter, then the ranks checked together.

A rank of a tensor-parallel model (``llama_ref.parallel.parallelize``) is counted like any model (:func:`count_rank`, the
counters of :mod:`counters.crosscheck`; the closed form takes one rank's sizes, ``analyze(..., tp=N)``)
and gives a :class:`~counters.crosscheck.CrosscheckReport` of its own (:func:`rank_report`): every counter
against the others, row by row, counts and collectives. :func:`combine` then checks the ranks together:

* summed over the ranks, every counter's every ``split`` row equals the single-process closed form
  (``analyze(config)``, no ``tp``) exactly, and every ``replicated`` row (norms, residual adds) N times it;
* every rank does exactly 1/N of the single-process matrix-product MACs (all of them are split);
* every rank runs the same collectives (they are collective: each rank takes part in each).

Ranks may be produced anywhere - in this process on the meta device with a fake process group
(``counters.commands.count_tp.count_meta_ranks``: all N ranks of a 70B or 405B layout in seconds), on spawned
gloo processes, or under ``torchrun`` - since a rank's result is plain data (``CounterResult``). This module
builds no rank: it never imports ``llama_ref.parallel``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from llama_ref.config import LlamaConfig

from .analytic import AnalyticReport, analyze
from .collectives import Collective, collectives_total, format_collective
from .crosscheck import CrosscheckReport, Mismatch, compare, crosscheck
from .primitives import ZERO, Count
from .result import COUNTER_NAMES, FORWARD, QUANTITIES, CounterResult, RowKey
from .table import REPLICATED, all_rows, row_order, tp_world_size

__all__ = ["SINGLE_PROCESS", "TPReport", "combine", "count_rank", "rank_report", "row_tp"]

#: The reference name of the cross-rank checks: the single-process closed form.
SINGLE_PROCESS = "single-process analytic"
_TP_OF_ROW = {r.name: r.tp for r in all_rows()}


def row_tp(module: str) -> str:
    """``split`` or ``replicated`` for a row name (see :mod:`counters.table`)."""
    return _TP_OF_ROW[module]


# ---------------------------------------------------------------- one rank
def count_rank(model, tokens: torch.Tensor, *, start_pos: int = 0,
               counters: Optional[Sequence[str]] = None, strict: bool = False) -> dict[str, CounterResult]:
    """Run the model-running counters (``hooks``, ``fvcore``, ``torch``; ``analytic`` needs no model and is
    left to :func:`rank_report`) on this rank: one forward of ``tokens`` after ``start_pos`` cached
    positions, in lockstep with the other ranks (same tokens, same counters, same order)."""
    if tp_world_size(model) is None:
        raise ValueError(f"count_rank counts a rank of a tensor-parallel model (llama_ref.parallel.parallelize), "
                         f"got a single-process {type(model).__name__}")
    names = [n for n in (COUNTER_NAMES if counters is None else counters) if n != "analytic"]
    if not names:
        return {}
    return crosscheck(model, tokens, start_pos=start_pos, counters=names, strict=strict).results


def rank_report(results: dict[str, CounterResult], *, config: LlamaConfig, tp: int, rank: int,
                schedule: Sequence[int], batch: int, seqlen: int, start_pos: int, counters: Sequence[str],
                weight_dtype_bytes: int, act_dtype_bytes: int) -> CrosscheckReport:
    """Rank ``rank``'s cross-check: its counters' ``results`` (from :func:`count_rank`, possibly in another
    process) and, if ``counters`` names it, the closed form of one rank, compared row by row."""
    results = dict(results)
    analytic = None
    if "analytic" in counters:
        analytic = analyze(config, batch=batch, seqlen=seqlen, start_pos=start_pos, schedule=schedule,
                           weight_dtype_bytes=weight_dtype_bytes, act_dtype_bytes=act_dtype_bytes, tp=tp)
        results["analytic"] = analytic.as_counter_result()
    missing = [n for n in counters if n not in results]
    if missing:
        raise ValueError(f"rank {rank}: no results from counter(s) {', '.join(missing)}")
    report = compare({n: results[n] for n in counters}, schedule=schedule, config=config, batch=batch,
                     seqlen=seqlen, start_pos=start_pos, analytic=analytic, order=list(counters))
    report.tp, report.rank = tp, rank
    return report


# ---------------------------------------------------------------- all ranks together
@dataclass
class TPReport:
    """Every rank's cross-check, and the checks of the ranks together."""

    config: LlamaConfig
    tp: int
    ranks: list[CrosscheckReport]
    single: AnalyticReport  # the single-process closed form (whole model, no tp)
    per_rank: AnalyticReport  # the closed form of one rank (every rank the same)
    mismatches: list[tuple[Optional[int], Mismatch]] = field(default_factory=list)  # (rank or None, mismatch)
    identical: bool = False  # every rank's every counter's every row equal to rank 0's (counts and collectives)
    device: str = ""
    dtype: str = ""
    compute_dtype: str = ""  # the ranks' activations' dtype, and why (llama_ref.compute_dtype's rule)
    compute_dtype_reason: str = ""
    attn_kernel: str = ""
    mode: str = ""  # how the ranks ran: "meta (fake process group)", "spawned gloo", "torchrun", ...
    notes: list[str] = field(default_factory=list)

    @property
    def counters(self) -> list[str]:
        return list(self.ranks[0].counters)

    @property
    def schedule(self) -> tuple[int, ...]:
        return self.ranks[0].schedule

    @property
    def agree(self) -> bool:
        return not self.mismatches

    @property
    def complete(self) -> bool:
        return all(r.complete for r in self.ranks)

    @property
    def reference(self) -> str:
        return self.ranks[0].reference

    def totals(self) -> dict[str, dict[str, Optional[int]]]:
        """counter -> ``{"macs", "flops", "nonmatmul_flops"}`` summed over the ranks."""
        out = {}
        for n in self.counters:
            values = [r.totals[n] for r in self.ranks]
            out[n] = {q: (None if any(v[q] is None for v in values) else sum(v[q] for v in values))
                      for q in ("macs", "flops", "nonmatmul_flops")}
        return out

    def row_sum(self, key: RowKey, counter: str, quantity: str) -> Optional[int]:
        """``quantity`` of row ``key`` by ``counter``, summed over the ranks (None: not claimed)."""
        total = 0
        for r in self.ranks:
            res = r.results[counter]
            if not res.claimed(FORWARD, quantity):
                return None
            total += getattr(res.get(key, FORWARD), quantity)
        return total

    def collectives(self) -> dict[RowKey, dict[Collective, int]]:
        """Per row, the collectives one rank runs (rank 0's by the reference counter; every rank runs the
        same ones, checked)."""
        res = self.ranks[0].results[self.reference]
        return {k: dict(v) for k, v in res.collectives.get(FORWARD, {}).items() if v}

    def collectives_total(self) -> dict[str, int]:
        """calls, payload bytes and ring bytes of one rank's collectives in this forward."""
        return collectives_total(self.collectives().values())

    def replicated(self) -> dict[str, int]:
        """The replicated work of one rank (single-process closed form of the replicated rows) and what the
        ranks do together: ``per_rank_*`` and ``all_ranks_* = N x per_rank``; ``redundant_* = (N-1) x``."""
        c = ZERO
        for r in self.single.rows:
            if row_tp(r.module) == REPLICATED:
                c = c + r.count
        n = self.tp
        return {"per_rank_macs": c.macs, "per_rank_nonmatmul_flops": c.nonmatmul_flops,
                "all_ranks_macs": n * c.macs, "all_ranks_nonmatmul_flops": n * c.nonmatmul_flops,
                "redundant_nonmatmul_flops": (n - 1) * c.nonmatmul_flops}


def _sum_results(reports: Sequence[CrosscheckReport], counter: str) -> dict[RowKey, Count]:
    out: dict[RowKey, Count] = {}
    for r in reports:
        for key, c in r.results[counter].counts.get(FORWARD, {}).items():
            out[key] = out.get(key, ZERO) + c
    return out


def combine(reports: Sequence[CrosscheckReport], *, weight_dtype_bytes: Optional[int] = None,
            act_dtype_bytes: Optional[int] = None) -> TPReport:
    """The checks of all ranks together (see the module docstring); ``reports[r]`` is rank r's."""
    if not reports:
        raise ValueError("no rank reports to combine")
    first = reports[0]
    tp = first.tp
    if tp is None or len(reports) != tp or [r.rank for r in reports] != list(range(tp)):
        raise ValueError(f"expected the reports of ranks 0..{(tp or 0) - 1} of a {tp}-way model in order, got ranks "
                         f"{[r.rank for r in reports]}")
    for r in reports[1:]:
        same = (r.config == first.config and r.tp == tp and r.schedule == first.schedule and r.batch == first.batch
                and r.seqlen == first.seqlen and r.start_pos == first.start_pos and r.counters == first.counters)
        if not same:
            raise ValueError(f"rank {r.rank} counted a different model or task than rank 0")
    config, schedule = first.config, first.schedule
    wb = weight_dtype_bytes if weight_dtype_bytes is not None else (first.analytic.weight_dtype_bytes if first.analytic else 2)
    ab = act_dtype_bytes if act_dtype_bytes is not None else (first.analytic.act_dtype_bytes if first.analytic else 2)
    kw = dict(batch=first.batch, seqlen=first.seqlen, start_pos=first.start_pos, schedule=schedule,
              weight_dtype_bytes=wb, act_dtype_bytes=ab)
    single = analyze(config, **kw)
    per_rank = analyze(config, tp=tp, **kw)
    out = TPReport(config, tp, list(reports), single, per_rank)
    for r in reports:
        out.mismatches.extend((r.rank, m) for m in r.mismatches)

    # Summed over the ranks: split rows = single process, replicated rows = N x single process.
    single_rows = {row.key: row.count for row in single.rows}
    keys = row_order(len(schedule))
    for n in first.counters:
        if not first.results[n].claimed(FORWARD, "macs"):
            continue
        summed = _sum_results(reports, n)
        for key in keys:
            factor = tp if row_tp(key[1]) == REPLICATED else 1
            want, got = single_rows[key] * factor, summed.get(key, ZERO)
            for q in QUANTITIES:
                if first.results[n].claimed(FORWARD, q) and getattr(got, q) != getattr(want, q):
                    label = f"{q} summed over {tp} ranks" + (f" ({tp} x a replicated row)" if factor > 1 else "")
                    out.mismatches.append((None, Mismatch(key, label, SINGLE_PROCESS, getattr(want, q), n,
                                                          getattr(got, q))))
        # Every rank: exactly 1/N of the single-process MACs (all of them are in split rows).
        for r in reports:
            macs = r.results[n].phase_total(FORWARD).macs
            if macs * tp != single.macs:
                out.mismatches.append((r.rank, Mismatch((None, "TOTAL"), f"macs x {tp} ranks", SINGLE_PROCESS,
                                                        single.macs, n, macs * tp)))

    # Every rank runs the same collectives, and (identical) the same counts, as rank 0.
    identical = True
    for r in reports[1:]:
        for n in first.counters:
            a, b = first.results[n], r.results[n]
            if a.counts != b.counts:
                identical = False
            ca, cb = a.collectives.get(FORWARD, {}), b.collectives.get(FORWARD, {})
            for key in sorted(set(ca) | set(cb), key=lambda k: (-1 if k[0] is None else k[0], k[1])):
                x, y = {c: k for c, k in ca.get(key, {}).items() if k}, {c: k for c, k in cb.get(key, {}).items() if k}
                if x != y:
                    identical = False
                    for c in sorted(set(x) | set(y)):
                        if x.get(c, 0) != y.get(c, 0):
                            out.mismatches.append((r.rank, Mismatch(key, f"collective {format_collective(c)}",
                                                                    f"{n} on rank 0", x.get(c, 0), n, y.get(c, 0))))
    out.identical = identical
    return out
