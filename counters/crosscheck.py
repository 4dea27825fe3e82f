"""Run several counters on one model + input and prove they agree, row by row, exactly.

Counters: ``analytic`` (closed form from the config), ``hooks`` (module hooks on real shapes), ``fvcore``
and ``torch`` (op-level counters over the ops a forward really runs).

For ``start_pos = C > 0`` the model gets a cache for ``C + N`` positions, an *uncounted* prefill of
``C`` tokens fills it, then every counter counts the same ``N``-token step at ``start_pos = C``
(each counted forward rewrites the same cache slots, so the counters see identical state).

With ``training`` every counter counts one training step (forward, loss, backward; see
:mod:`counters.training`) and reports it by phase: ``forward`` and ``backward`` (model work), and the
executed-only ``recompute`` (activation checkpointing) and ``kernel_recompute`` (a fused attention
backward's own recomputation of the scores).

A rank of a tensor-parallel model (``llama_ref.parallel.parallelize``) is counted the same way:
the closed form takes that rank's sizes (``analyze(..., tp=N)``), and every counter's collectives (the
communication each row ran, with its bytes) are compared row by row as well. :mod:`counters.tp` runs
every rank and checks the ranks against each other and against the single process.

Equality is exact integer equality, never a tolerance. Every counter is compared on every
``(phase, quantity)`` it claims (:meth:`CounterResult.claimed`), in every row and in total: a counter that
reports zero where another reports work disagrees. A phase only one counter measures is reported, not
compared.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch


from .analytic import AnalyticReport, TrainingReport, analyze, analyze_training, param_count
from .fvcore_counter import count_fvcore
from .generation import Generation, analyze_generation, count_generation, generation_macs
from .hooks import count_hooks
from .primitives import ZERO
from .result import (
    COUNTER_NAMES,
    EXECUTED_ONLY,
    FORWARD,
    PHASE_ORDER,
    QUANTITIES,
    CounterResult,
    RowKey,
    independent_sources,
)
from .collectives import Collective, format_collective
from .table import LOSS_ROW_NAME, row_order, tp_world_size
from .torch_counter import count_torch
from .training import Training

logger = logging.getLogger(__name__)

#: The counters that run the model; ``analytic`` needs no model run.
COUNTER_FUNCTIONS: dict[str, Callable[..., CounterResult]] = {
    "hooks": count_hooks,
    "fvcore": count_fvcore,
    "torch": count_torch,
}
_LOSS_KEY: RowKey = (None, LOSS_ROW_NAME)


@dataclass(frozen=True)
class Mismatch:
    """One disagreement: ``counter`` reports ``got`` where ``reference`` reports ``expected``."""

    key: RowKey  # (position, module); (None, "TOTAL") for the totals
    quantity: str  # "macs" or "nonmatmul_flops"
    reference: str
    expected: int
    counter: str
    got: int
    phase: str = FORWARD

    def __str__(self) -> str:
        pos, module = self.key
        where = module if pos is None else f"run {pos} {module}"
        phase = "" if self.phase == FORWARD else f" ({self.phase})"
        return (f"{where}: {self.quantity}{phase} {self.counter}={self.got:,} vs {self.reference}={self.expected:,} "
                f"(diff {self.got - self.expected:+,})")


@dataclass
class CrosscheckRow:
    position: Optional[int]
    layer: Optional[int]
    module: str
    # (phase, quantity) -> counter -> value (None: the counter does not claim it)
    values: dict[tuple[str, str], dict[str, Optional[int]]]
    agree: bool
    # (phase, quantity) -> the distinct source labels behind it (see counters.result)
    sources: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    model_phases: tuple[str, ...] = (FORWARD,)
    # a tensor-parallel rank: the collectives this row ran (the reference counter's), collective -> calls
    collectives: dict[Collective, int] = field(default_factory=dict)

    @property
    def key(self) -> RowKey:
        return (self.position, self.module)

    def get(self, quantity: str, phase: Optional[str] = None) -> dict[str, Optional[int]]:
        """counter -> ``quantity`` in ``phase``, or summed over the model phases (None where a counter does
        not claim every one of them)."""
        if phase is not None:
            return self.values.get((phase, quantity), {})
        out: dict[str, Optional[int]] = {}
        for p in self.model_phases:
            for counter, v in self.values.get((p, quantity), {}).items():
                if counter in out and out[counter] is None:
                    continue
                out[counter] = None if v is None else (out.get(counter) or 0) + v
        return out

    @property
    def macs(self) -> dict[str, Optional[int]]:
        return self.get("macs")

    @property
    def nonmatmul_flops(self) -> dict[str, Optional[int]]:
        return self.get("nonmatmul_flops")

    def n_sources(self, quantity: str) -> int:
        """Independent sources behind every model phase of ``quantity`` that has work (the fewest)."""
        counts = [len(self.sources.get((p, quantity), ())) for p in self.model_phases
                  if self.sources.get((p, quantity))]
        return min(counts) if counts else 0


@dataclass
class CrosscheckReport:
    config: object
    schedule: tuple[int, ...]
    batch: int
    seqlen: int
    start_pos: int
    counters: list[str]
    results: dict[str, CounterResult]
    analytic: Optional[AnalyticReport]
    params: int
    rows: list[CrosscheckRow]
    totals: dict[str, dict[str, Optional[int]]]  # counter -> {"macs", "flops", "nonmatmul_flops", per phase ...}
    compared: dict[tuple[str, str], list[str]]  # (phase, quantity) -> counters compared on it
    mismatches: list[Mismatch]
    unknown_ops: dict[str, dict[str, int]]  # counter -> {op: occurrences}
    phases: tuple[str, ...] = (FORWARD,)
    training: Optional[Training] = None
    training_report: Optional[TrainingReport] = None
    generation: Optional[Generation] = None
    device: str = ""
    dtype: str = ""
    attn_kernel: str = ""
    compute_dtype: str = ""  # the activations' dtype, and why (llama_ref.compute_dtype's rule)
    compute_dtype_reason: str = ""
    notes: list[str] = field(default_factory=list)
    tp: Optional[int] = None  # a rank of a tp-way tensor-parallel model
    rank: Optional[int] = None

    @property
    def agree(self) -> bool:
        """Every compared quantity equal across counters, in every row and in total."""
        return not self.mismatches

    @property
    def complete(self) -> bool:
        """No counter met an op or module it has no formula for."""
        return not any(self.unknown_ops.values())

    @property
    def model_phases(self) -> tuple[str, ...]:
        return tuple(p for p in self.phases if p not in EXECUTED_ONLY)

    @property
    def reference(self) -> str:
        """The counter whose numbers a table shows: the first one claiming every model phase."""
        for n in self.counters:
            if all(self.results[n].claimed(p, q) for p in self.model_phases for q in QUANTITIES):
                return n
        return self.counters[0]

    def sources(self) -> dict[str, dict[str, dict[str, int]]]:
        """counter -> quantity -> source label -> amount, over the model work it claims."""
        out = {}
        for n in self.counters:
            r = self.results[n]
            per_q: dict[str, dict[str, int]] = {}
            for q in QUANTITIES:
                amounts: dict[str, int] = {}
                for p in self.model_phases:
                    if not r.claimed(p, q):
                        continue
                    for s, c in r.source_totals(p).items():
                        if getattr(c, q):
                            amounts[s] = amounts.get(s, 0) + getattr(c, q)
                if any(r.claimed(p, q) for p in self.model_phases):
                    per_q[q] = dict(sorted(amounts.items()))
            out[n] = per_q
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
            values: dict[tuple[str, str], dict[str, Optional[int]]] = {}
            sources: dict[tuple[str, str], list[str]] = {}
            for pq in group[0].values:
                values[pq] = {c: (None if any(g.values[pq][c] is None for g in group)
                                  else sum(g.values[pq][c] for g in group)) for c in self.counters}
                sets = [set(g.sources.get(pq, ())) for g in group if g.sources.get(pq)]
                sources[pq] = sorted(set.intersection(*sets)) if sets else []
            merged: dict[Collective, int] = {}
            for g in group:
                for c, k in g.collectives.items():
                    merged[c] = merged.get(c, 0) + k
            out.append(CrosscheckRow(r.position, r.layer, "block", values, all(g.agree for g in group), sources,
                                     self.model_phases, merged))
        return out


def _prefill(model, batch: int, start_pos: int, seqlen: int, device) -> None:
    model.setup_cache(batch, start_pos + seqlen)
    prefill_tokens = torch.zeros((batch, start_pos), dtype=torch.long, device=device)
    with torch.no_grad():
        model(prefill_tokens, 0)


def crosscheck(model, tokens: torch.Tensor, *, start_pos: int = 0, counters: Optional[Sequence[str]] = None,
               strict: bool = False, training: Optional[Training] = None, weight_dtype_bytes: Optional[int] = None,
               act_dtype_bytes: Optional[int] = None) -> CrosscheckReport:
    """Count one forward of ``tokens`` (shape ``(batch, N)``) after ``start_pos`` cached positions - or with
    ``training``, one training step on them - with each of ``counters`` (default: all four) and compare
    them row by row.

    The first counter is the reference the others are compared with. The model's own KV cache (if any)
    is restored afterwards. ``weight_dtype_bytes``/``act_dtype_bytes`` (the closed form's bytes, and the
    itemsize of a tensor-parallel rank's collectives) default to the model's: its embedding's dtype and its
    compute dtype.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError("tokens must be a (batch, seqlen) integer tensor")
    if isinstance(start_pos, bool) or not isinstance(start_pos, int) or start_pos < 0:
        raise ValueError(f"start_pos must be a non-negative int, got {start_pos!r}")
    if training is not None and not isinstance(training, Training):
        raise ValueError(f"training must be a counters.training.Training, got {type(training).__name__}")
    if training is not None and start_pos:
        raise ValueError(f"a training step has no KV cache: start_pos must be 0, got {start_pos}")
    names = list(COUNTER_NAMES if counters is None else counters)
    if not names:
        raise ValueError("no counters to run")
    unknown = [n for n in names if n not in COUNTER_NAMES]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"bad counter list {names}: choose each at most once from {', '.join(COUNTER_NAMES)}")

    if weight_dtype_bytes is None:
        weight_dtype_bytes = model.tok_embeddings.weight.dtype.itemsize
    if act_dtype_bytes is None:
        act_dtype_bytes = model.compute_dtype.itemsize
    tp = tp_world_size(model)
    if tp is not None and training is not None:
        raise ValueError("a training step of a tensor-parallel rank is not counted: its backward all-reduces "
                         "(CopyToTensorParallel) have no row yet; count its forward")
    batch, seqlen = tokens.shape
    config = model.config
    schedule = tuple(model.schedule)
    results: dict[str, CounterResult] = {}
    analytic_report = training_report = None
    if "analytic" in names:
        analytic_report = analyze(config, batch=batch, seqlen=seqlen, start_pos=start_pos, schedule=schedule,
                                  weight_dtype_bytes=weight_dtype_bytes, act_dtype_bytes=act_dtype_bytes, tp=tp)
        if training is None:
            results["analytic"] = analytic_report.as_counter_result()
        else:
            training_report = analyze_training(config, batch=batch, seqlen=seqlen, schedule=schedule,
                                                training=training)
            results["analytic"] = training_report.as_counter_result()

    saved_caches = model.caches
    runs_model = any(n != "analytic" for n in names)
    # The RoPE table grows on demand; grow it now, so that no counted forward builds it.
    if runs_model:
        model.reserve_positions(start_pos + seqlen)
    try:
        if start_pos > 0 and runs_model:
            _prefill(model, batch, start_pos, seqlen, tokens.device)
        elif training is not None:
            model.caches = None
        for name in names:
            if name != "analytic":
                logger.info("counting with %s", name)
                kwargs = {} if training is None else {"training": training}
                results[name] = COUNTER_FUNCTIONS[name](model, tokens, start_pos, strict=strict, **kwargs)
    finally:
        model.caches = saved_caches

    report = compare(results, schedule=schedule, config=config, batch=batch, seqlen=seqlen, start_pos=start_pos,
                     analytic=analytic_report, order=names, loss=training is not None)
    if tp is not None:
        report.tp, report.rank = tp, model.tp_group.rank
    _note_compute_dtype(report, model)
    report.training = training
    report.training_report = training_report
    return report


def _note_compute_dtype(report: "CrosscheckReport", model) -> None:
    report.compute_dtype = str(model.compute_dtype).replace("torch.", "")
    report.compute_dtype_reason = getattr(model, "compute_dtype_reason", "")


def crosscheck_generation(model, *, batch: int, generation: Generation, counters: Optional[Sequence[str]] = None,
                          strict: bool = False, seed: int = 0) -> CrosscheckReport:
    """Count a whole inference task - the prefill of ``generation.prompt`` tokens and the decode steps of
    ``generation.new_tokens`` - by running the real generation loop under the hooks and torch counters, beside
    the closed form (``analytic``), per phase and row; then check every counter's phase totals against
    :func:`counters.generation.generation_macs`. fvcore traces one forward and cannot follow the loop."""
    if not isinstance(generation, Generation):
        raise ValueError(f"generation must be a counters.generation.Generation, got {type(generation).__name__}")
    if tp_world_size(model) is not None:
        raise ValueError("a generation task of a tensor-parallel rank is not counted (its decode loop's "
                         "collectives have no phase rows yet): count its forwards with crosscheck")
    names = list(("analytic", "hooks", "torch") if counters is None else counters)
    if "fvcore" in names:
        raise ValueError("fvcore traces one forward and cannot follow a generation loop: count it with "
                         "analytic, hooks and torch")
    bad = [n for n in names if n not in COUNTER_NAMES]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(f"bad counter list {names}: choose each at most once from analytic, hooks, torch")
    config = model.config
    results: dict[str, CounterResult] = {}
    if "analytic" in names:
        results["analytic"] = analyze_generation(config, batch=batch, generation=generation, schedule=model.schedule)
    results.update(count_generation(model, batch=batch, generation=generation,
                                    counters=[n for n in names if n != "analytic"], strict=strict, seed=seed))
    report = compare(results, schedule=model.schedule, config=config, batch=batch, seqlen=generation.prompt,
                     start_pos=0, order=names)
    report.generation = generation
    _note_compute_dtype(report, model)
    closed = generation_macs(config, generation, batch=batch, schedule=model.schedule)
    for phase, macs in closed.items():
        for n in names:
            got = results[n].phase_total(phase).macs
            if got != macs:
                report.mismatches.append(Mismatch((None, "TOTAL"), "macs", "closed form", macs, n, got, phase))
    report.notes.append(f"closed form: prefill {closed['prefill']:,} + decode {closed['decode']:,} MACs "
                        "(counters.generation.generation_macs), checked against every counter")
    return report


def compare(results: dict[str, CounterResult], *, schedule: Sequence[int], config, batch: int, seqlen: int,
            start_pos: int, analytic: Optional[AnalyticReport] = None, order: Optional[Sequence[str]] = None,
            loss: bool = False) -> CrosscheckReport:
    """Build the per-row table of ``results`` and list every disagreement (pure, no model work).

    Each ``(phase, quantity)`` is compared across every counter that claims it: the first such counter
    is the reference, and any other value, zero included, is a mismatch."""
    names = list(order or results)
    schedule = tuple(schedule)
    seen = {p for r in results.values() for p in r.phases}
    phases = tuple(p for p in PHASE_ORDER if p in seen) + tuple(sorted(seen - set(PHASE_ORDER)))
    compared = {(p, q): [n for n in names if results[n].claimed(p, q)] for p in phases for q in QUANTITIES}
    notes = []
    for n in names:
        missing = [f"{q} ({p})" for p in phases for q in QUANTITIES
                   if not results[n].claimed(p, q) and p not in EXECUTED_ONLY]
        if missing:
            notes.append(f"{n}: does not measure {', '.join(missing)} (not compared)")
    for p in phases:
        if p in EXECUTED_ONLY and len(compared[(p, "macs")]) == 1:
            notes.append(f"{p}: measured by {compared[(p, 'macs')][0]} only (executed work, not compared)")

    keys = row_order(len(schedule), loss=loss)
    known = set(keys)
    extra = sorted({k for r in results.values() for p in r.phases for k in r.counts[p] if k not in known},
                   key=lambda k: (-1 if k[0] is None else k[0], k[1]))
    for k in extra:
        notes.append(f"row {k} is outside the standard row set")
    model_phases = tuple(p for p in phases if p not in EXECUTED_ONLY)
    mismatches: list[Mismatch] = []
    rows: list[CrosscheckRow] = []
    for key in keys + extra:
        values: dict[tuple[str, str], dict[str, Optional[int]]] = {}
        sources: dict[tuple[str, str], list[str]] = {}
        row_ok = True
        for p in phases:
            for q in QUANTITIES:
                vals = {n: (getattr(results[n].get(key, p), q) if results[n].claimed(p, q) else None) for n in names}
                values[(p, q)] = vals
                sources[(p, q)] = independent_sources(results.values(), key, q, p)
                comp = compared[(p, q)]
                for n in comp[1:]:
                    if vals[n] != vals[comp[0]]:
                        row_ok = False
                        mismatches.append(Mismatch(key, q, comp[0], vals[comp[0]], n, vals[n], p))
        ref_collectives: dict[Collective, int] = {}
        for p in phases:
            claiming = compared[(p, "macs")]
            for i, n in enumerate(claiming):
                got = results[n].row_collectives(key, p)
                if i == 0:
                    ref_collectives = got if p == FORWARD else ref_collectives
                    ref_name, expected = n, got
                    continue
                for c in sorted(set(expected) | set(got)):
                    if expected.get(c, 0) != got.get(c, 0):
                        row_ok = False
                        mismatches.append(Mismatch(key, f"collective {format_collective(c)}", ref_name,
                                                   expected.get(c, 0), n, got.get(c, 0), p))
        pos, module = key
        layer = schedule[pos] if pos is not None and 0 <= pos < len(schedule) else None
        rows.append(CrosscheckRow(pos, layer, module, values, row_ok, sources, model_phases, ref_collectives))

    totals = {n: _totals(results[n], phases, model_phases) for n in names}
    for p in phases:
        for q in QUANTITIES:
            comp = compared[(p, q)]
            for n in comp[1:]:
                a, b = results[comp[0]].phase_total(p), results[n].phase_total(p)
                if getattr(a, q) != getattr(b, q):
                    mismatches.append(Mismatch((None, "TOTAL"), q, comp[0], getattr(a, q), n, getattr(b, q), p))
    for n in names:
        notes.extend(f"{n}: {note}" for note in results[n].notes)
    return CrosscheckReport(
        config=config, schedule=schedule, batch=batch, seqlen=seqlen, start_pos=start_pos, counters=names,
        results=results, analytic=analytic, params=param_count(config), rows=rows, totals=totals,
        compared=compared, mismatches=mismatches,
        unknown_ops={n: dict(results[n].unknown_ops) for n in names}, phases=phases, notes=notes,
    )


def _totals(result: CounterResult, phases: tuple[str, ...], model_phases: tuple[str, ...]) -> dict[str, Optional[int]]:
    """A counter's totals: ``macs``/``flops``/``nonmatmul_flops`` of the model work (None unless it claims
    every model phase); with more than one phase also ``<phase>_macs`` and ``<phase>_nonmatmul_flops``, and
    ``executed_macs`` (model + executed-only work). A training step's loss is reported apart
    (``loss_nonmatmul_flops``), not in the model totals."""
    out: dict[str, Optional[int]] = {}

    def phase_sum(p: str, q: str) -> Optional[int]:
        if not result.claimed(p, q):
            return None
        c = result.phase_total(p)
        loss = result.get(_LOSS_KEY, p) if _LOSS_KEY in result.counts.get(p, {}) else ZERO
        return getattr(c, q) - getattr(loss, q)

    for q in QUANTITIES:
        parts = [phase_sum(p, q) for p in model_phases]
        out[q] = None if any(v is None for v in parts) else sum(parts)
    out = {"macs": out["macs"], "flops": None if out["macs"] is None else 2 * out["macs"],
           "nonmatmul_flops": out["nonmatmul_flops"]}
    if len(phases) > 1:
        for p in phases:
            for q in QUANTITIES:
                out[f"{p}_{q}"] = phase_sum(p, q)
        executed = [phase_sum(p, "macs") for p in phases if result.claimed(p, "macs")]
        out["executed_macs"] = None if out["macs"] is None else sum(executed)
    if any(_LOSS_KEY in result.counts.get(p, {}) for p in phases):
        out["loss_nonmatmul_flops"] = (None if not all(result.claimed(p, "nonmatmul_flops") for p in model_phases)
                                       else sum(result.get(_LOSS_KEY, p).nonmatmul_flops for p in model_phases))
    return out
