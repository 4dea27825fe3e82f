"""Render a :class:`~counters.tp.TPReport` (every rank of a tensor-parallel model) as a table, JSON or CSV.

Units as everywhere: ``macs``, ``flops`` (= 2 x macs), ``nonmatmul_flops``, ``bytes``. A collective is 0
FLOPs; its ``payload_bytes`` (numel x itemsize of the tensor it produces) and ``ring_bytes`` (what each rank
sends with the ring algorithm: 2(N-1)/N x payload for an all-reduce, (N-1)/N x the gathered output for an
all-gather; nccl-tests' bus-bandwidth convention) are per rank and per call.
"""

from __future__ import annotations

import csv
import io
from typing import Any, Optional

from llama_ref.schedule import format_schedule
from llama_ref.shapes import param_count

from .collectives import Collective
from .crosscheck import CrosscheckReport, CrosscheckRow
from .report import CONVENTIONS, fmt
from .result import QUANTITIES
from .tp import TPReport, row_tp

__all__ = ["JSON_SCHEMA_TP", "TP_CONVENTIONS", "render_tp_csv", "render_tp_table", "tp_counted_line", "tp_to_json"]

JSON_SCHEMA_TP = "llama-ref.count/3"

TP_CONVENTIONS = (
    "Tensor parallelism (Meta's layout, llama_ref.parallel): each rank holds n_heads/N query heads, n_kv_heads/N "
    "kv heads, hidden_dim/N FFN channels, vocab_size/N output rows and dim/N embedding columns. Every rank is "
    "counted by every counter. Rows are split (summed over the ranks = the single process) or replicated "
    "(each rank does all of it: RMSNorms, residual adds; summed = N x the single process). Collectives are "
    "communication, 0 FLOPs: payload_bytes = numel x itemsize of the tensor produced (the all-reduced "
    "tensor, the gathered output), ring_bytes = bytes each rank sends with the ring algorithm, 2(N-1)/N x "
    "payload for all-reduce and (N-1)/N x payload for all-gather (nccl-tests' bus-bandwidth convention)."
)


def _ranks_label(n: int) -> str:
    return "rank 0" if n == 1 else f"ranks 0-{n - 1}"


def tp_counted_line(report: TPReport) -> str:
    r0 = report.ranks[0]
    step = "prefill" if r0.start_pos == 0 else "step"
    where = f" on device {report.device}" if report.device else ""
    return (f"Counted: one forward ({step}) of batch {r0.batch} x {r0.seqlen} new tokens after {r0.start_pos} "
            f"cached, {len(report.schedule)} layer runs, on each of {report.tp} tensor-parallel ranks (Meta's "
            f"layout); by {', '.join(report.counters)}{where}.")


def _collectives_cell(row: CrosscheckRow) -> str:
    parts = []
    for c, k in sorted(row.collectives.items()):
        parts.append(f"{c.op}" + (f" x{k}" if k > 1 else ""))
    return ", ".join(parts) or "-"


def _rank_lines(report: CrosscheckReport, detail: bool) -> list[str]:
    ref = report.reference
    rows = report.rows if detail else report.layer_runs()
    header = (f"{'run':>5} {'layer':>5}  {'module':<18} {'tp':<10} {'MACs':>20} {'FLOPs (2xMACs)':>20} "
              f"{'non-matmul FLOPs':>18}  {'check':<8} collectives")
    lines = [header, "-" * len(header)]
    for r in rows:
        if r.module == "(root)" and not r.macs.get(ref) and not r.nonmatmul_flops.get(ref) and not detail:
            continue
        pos = "-" if r.position is None else str(r.position)
        layer = "-" if r.layer is None else str(r.layer)
        tp = "mixed" if r.module == "block" else row_tp(r.module)
        macs = r.macs.get(ref)
        check = "" if len(report.counters) == 1 else (f"ok {len(report.counters)}/{len(report.counters)}"
                                                       if r.agree else "MISMATCH")
        lines.append(f"{pos:>5} {layer:>5}  {r.module:<18} {tp:<10} {fmt(macs):>20} "
                     f"{fmt(None if macs is None else 2 * macs):>20} {fmt(r.nonmatmul_flops.get(ref)):>18}  "
                     f"{check:<8} {_collectives_cell(r)}")
    lines.append("-" * len(header))
    t = report.totals[ref]
    lines.append(f"{'TOTAL':>11}  {'(one rank)':<18} {'':<10} {fmt(t['macs']):>20} {fmt(t['flops']):>20} "
                 f"{fmt(t['nonmatmul_flops']):>18}  ({ref})")
    return lines


def _collective_groups(report: TPReport) -> list[tuple[str, Collective, int, int]]:
    """(row label, collective, calls per forward, rows it runs in), grouping a block row's layer runs."""
    groups: dict[tuple[str, Collective], list[int]] = {}
    for (pos, module), per_row in report.collectives().items():
        label = module if pos is None else f"layers.*.{module}"
        for c, k in per_row.items():
            entry = groups.setdefault((label, c), [0, 0])
            entry[0] += k
            entry[1] += 1
    order = {name: i for i, name in enumerate(["tok_embeddings"])}
    return sorted(((label, c, calls, runs) for (label, c), (calls, runs) in groups.items()),
                  key=lambda g: (0 if g[0] in order else 2 if g[0] == "output" else 1, g[0]))


def _collective_lines(report: TPReport) -> list[str]:
    groups = _collective_groups(report)
    if not groups:
        return ["collectives: none"]
    lines = ["Collectives of one rank per forward (each rank runs every one; 0 FLOPs; bytes per rank; ring = "
             "bytes each rank sends, nccl-tests bus convention):",
             f"  {'row':<26} {'op':<11} {'calls':>6} {'elements':>14} {'B/elt':>5} {'payload B/call':>15} "
             f"{'ring B/call':>15} {'payload B total':>17} {'ring B total':>17}"]
    for label, c, calls, runs in groups:
        lines.append(f"  {label:<26} {c.op:<11} {calls:>6} {c.numel:>14,} {c.itemsize:>5} {c.payload_bytes:>15,} "
                     f"{c.ring_bytes:>15,} {calls * c.payload_bytes:>17,} {calls * c.ring_bytes:>17,}")
    t = report.collectives_total()
    lines.append(f"  {'total per forward':<26} {'':<11} {t['calls']:>6} {'':>14} {'':>5} {'':>15} {'':>15} "
                 f"{t['payload_bytes']:>17,} {t['ring_bytes']:>17,}")
    return lines


def render_tp_table(report: TPReport, *, detail: bool = False, title: Optional[str] = None,
                    max_mismatches: int = 20) -> str:
    lines: list[str] = []
    if title:
        lines.append(title)
    lines.append(tp_counted_line(report))
    if report.mode:
        lines.append(f"Ranks: {report.mode}.")
    n = report.tp
    counted = f"each counted by {len(report.counters)} counter(s)"
    if report.identical:
        lines.append(f"Per rank: {_ranks_label(n)} identical ({counted}, compared with rank 0 row by row: equal "
                     "counts and collectives on every counter), shown once:")
        lines.extend(_rank_lines(report.ranks[0], detail))
    else:
        lines.append(f"Per rank ({counted}; the ranks differ, each shown):")
        for r in report.ranks:
            lines.append(f"rank {r.rank}:")
            lines.extend(_rank_lines(r, detail))
    lines.append("")
    lines.append(f"Summed over the {n} ranks, per counter, against the single process (closed form, no tp):")
    lines.append(f"{'counter':<18} {'MACs':>22} {'FLOPs':>22} {'non-matmul FLOPs':>20}  unknown ops")
    totals = report.totals()
    for name, t in totals.items():
        unknown: dict[str, int] = {}
        for r in report.ranks:
            for op, k in (r.unknown_ops.get(name) or {}).items():
                unknown[op] = unknown.get(op, 0) + k
        lines.append(f"{name:<18} {fmt(t['macs']):>22} {fmt(t['flops']):>22} {fmt(t['nonmatmul_flops']):>20}  "
                     + (", ".join(f"{op} x{k}" for op, k in sorted(unknown.items())) or "none"))
    s = report.single
    lines.append(f"{'single process':<18} {fmt(s.macs):>22} {fmt(s.flops):>22} {fmt(s.nonmatmul_flops):>20}")
    rep = report.replicated()
    lines.append(f"Split rows summed over the ranks = the single process; each rank does exactly 1/{n} of the "
                 f"{fmt(s.macs)} MACs ({fmt(s.macs // n)}).")
    lines.append(f"Replicated rows (RMSNorms, residual adds: every rank does all of it): "
                 f"{fmt(rep['per_rank_nonmatmul_flops'])} non-matmul FLOPs per rank, {n} x = "
                 f"{fmt(rep['all_ranks_nonmatmul_flops'])} over the ranks ({fmt(rep['redundant_nonmatmul_flops'])} "
                 "more than one process).")
    lines.append(f"params {fmt(param_count(report.config, n))} per rank ({fmt(report.single.params)} in the model)"
                 f" | KV cache {fmt(report.per_rank.kv_cache_bytes)} bytes per rank")
    lines.append("")
    lines.extend(_collective_lines(report))
    lines.append("")
    if report.agree:
        lines.append(f"AGREE: on every one of {n} ranks {len(report.counters)} counter(s) equal exactly (counts and "
                     f"collectives, every row); summed over the ranks every counter equals the single process "
                     f"(split rows) or {n} x it (replicated rows).")
    else:
        lines.append(f"DISAGREE: {len(report.mismatches)} mismatch(es):")
        for rank, m in report.mismatches[:max_mismatches]:
            lines.append(f"  {'all ranks' if rank is None else f'rank {rank}'}: {m}")
        if len(report.mismatches) > max_mismatches:
            lines.append(f"  ... {len(report.mismatches) - max_mismatches} more (see --format json)")
    for note in report.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


# ---------------------------------------------------------------- JSON
def _collectives_list(row_collectives: dict[Collective, int]) -> list[dict]:
    return [{**c.to_dict(), "calls": k} for c, k in sorted(row_collectives.items())]


def _rank_row(report: CrosscheckReport, r: CrosscheckRow) -> dict:
    return {"position": r.position, "layer": r.layer, "module": r.module,
            "tp": "mixed" if r.module == "block" else row_tp(r.module),
            "macs": dict(r.macs), "nonmatmul_flops": dict(r.nonmatmul_flops), "agree": r.agree,
            "collectives": _collectives_list(r.collectives)}


def _mismatch_dict(rank: Optional[int], m) -> dict:
    return {"rank": rank, "position": m.key[0], "module": m.key[1], "phase": m.phase, "quantity": m.quantity,
            "reference": m.reference, "expected": m.expected, "counter": m.counter, "got": m.got}


def tp_to_json(report: TPReport, *, extra: Optional[dict] = None) -> dict:
    """One JSON-ready object (schema ``llama-ref.count/3``): ``tp``; ``totals`` (per counter, summed over the
    ranks); ``single_process`` (the closed form without tp); ``layers`` (per row, summed over the ranks, with
    ``tp`` split/replicated and the single-process value); ``ranks`` (N objects: ``rank``, ``totals``,
    ``agree``, ``mismatches``, ``unknown_ops``, ``layers`` with each row's ``collectives``);
    ``collectives`` (per row one rank runs: op, calls, numel, itemsize, payload_bytes, ring_bytes) and
    ``collectives_total``; ``replicated``; ``agree``; ``mismatches`` (each with its rank, null for the
    cross-rank checks)."""
    cfg = report.config
    r0 = report.ranks[0]
    names = report.counters
    single_rows = {row.key: row for row in report.single.rows}
    layers = []
    for row in r0.rows:
        key = row.key
        s = single_rows.get(key)
        layers.append({
            "position": row.position, "layer": row.layer, "module": row.module, "tp": row_tp(row.module),
            "macs": {n: report.row_sum(key, n, "macs") for n in names},
            "nonmatmul_flops": {n: report.row_sum(key, n, "nonmatmul_flops") for n in names},
            "single_process_macs": None if s is None else s.macs,
            "single_process_nonmatmul_flops": None if s is None else s.nonmatmul_flops,
        })
    collectives = []
    for (pos, module), per_row in report.collectives().items():
        for c, k in sorted(per_row.items()):
            collectives.append({"position": pos, "layer": None if pos is None else report.schedule[pos],
                                "module": module, **c.to_dict(), "calls": k})
    s = report.single
    doc: dict[str, Any] = {
        "schema": JSON_SCHEMA_TP,
        "model": getattr(cfg, "name", None),
        "config": cfg.to_dict() if hasattr(cfg, "to_dict") else None,
        "task": "forward",
        "tp": report.tp,
        "mode": report.mode,
        "schedule": format_schedule(report.schedule),
        "schedule_layers": list(report.schedule),
        "layer_runs_count": len(report.schedule),
        "tokens": r0.seqlen, "cached": r0.start_pos, "batch": r0.batch,
        "device": report.device, "dtype": report.dtype, "compute_dtype": report.compute_dtype,
        "compute_dtype_reason": report.compute_dtype_reason, "kernel": report.attn_kernel,
        "counters": list(names),
        "phases": ["forward"],
        "conventions": CONVENTIONS + " " + TP_CONVENTIONS,
        "counted": tp_counted_line(report),
        "params": report.single.params,
        "params_per_rank": param_count(cfg, report.tp),
        "totals": report.totals(),
        "single_process": {"macs": s.macs, "flops": s.flops, "nonmatmul_flops": s.nonmatmul_flops,
                           "flops_exact": s.flops_exact, "macs_causal": s.macs_causal},
        "per_rank_closed_form": {"macs": report.per_rank.macs, "flops": report.per_rank.flops,
                                 "nonmatmul_flops": report.per_rank.nonmatmul_flops, "bytes": report.per_rank.bytes,
                                 "weight_bytes": report.per_rank.total.weight_bytes,
                                 "kv_cache_bytes": report.per_rank.kv_cache_bytes},
        "replicated": report.replicated(),
        "agree": report.agree,
        "complete": report.complete,
        "ranks_identical": report.identical,
        "mismatches": [_mismatch_dict(rank, m) for rank, m in report.mismatches],
        "layers": layers,
        "ranks": [{"rank": r.rank, "totals": {n: dict(t) for n, t in r.totals.items()}, "agree": r.agree,
                   "complete": r.complete, "unknown_ops": {n: dict(u) for n, u in r.unknown_ops.items()},
                   "mismatches": [_mismatch_dict(r.rank, m) for m in r.mismatches],
                   "layers": [_rank_row(r, row) for row in r.rows],
                   "notes": list(r.notes)}
                  for r in report.ranks],
        "collectives": collectives,
        "collectives_total": report.collectives_total(),
        "notes": list(report.notes),
    }
    if extra:
        doc.update(extra)
    return doc


# ---------------------------------------------------------------- CSV
def render_tp_csv(report: TPReport) -> str:
    """One line per rank and row: rank, position, layer, module, tp, ``macs_<counter>``,
    ``nonmatmul_flops_<counter>``, collectives (``op:numel:itemsize:calls`` joined by ``;``), agree."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    names = report.counters
    w.writerow(["rank", "position", "layer", "module", "tp", *(f"{q}_{n}" for q in QUANTITIES for n in names),
                "collectives", "agree"])
    for rr in report.ranks:
        for r in rr.rows:
            cells = [r.get(q).get(n) for q in QUANTITIES for n in names]
            coll = ";".join(f"{c.op}:{c.numel}:{c.itemsize}:{k}" for c, k in sorted(r.collectives.items()))
            w.writerow([rr.rank, "" if r.position is None else r.position, "" if r.layer is None else r.layer,
                        r.module, row_tp(r.module), *("" if v is None else v for v in cells), coll, int(r.agree)])
    return buf.getvalue()
